//! The `/admin/v1` resources: organizations, contracts, users, applications,
//! keys, purchases, adjustments and balances. Request bodies are strict
//! (JSON objects only, never arrays read by position; unknown fields
//! rejected; amounts as decimal strings) and errors name the field. Every `/orgs/{org}/...` route checks the caller's scope first; an
//! organization token asking for another organization gets 404.

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use http::{HeaderMap, Method, StatusCode};
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::AdminError;
use super::strict::Objects;
use super::Scope;
use crate::alerts::{AlertError, Alerts, Condition, Rule};
use crate::demo::new_secret;

use crate::ledger::contract::ContractTerm;
use crate::ledger::entity::{ApiKey, KeyHash, KeyScope, Plan, User};
use crate::ledger::ids::{AppId, KeyId, OrgId, Owner, UserId, WalletId};
use crate::ledger::limit::Limits;
use crate::ledger::{
    too_fine, AdjustmentRequest, Ledger, NewApp, NewKey, NewOrg, NewUser, PurchaseRequest, MAX_AMOUNT_SCALE,
};

/// An admin answer: status and JSON body.
pub type Answer = Result<(StatusCode, Value), AdminError>;

/// Longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 200;

/// Parse a strict JSON body: exactly one value, structures only from JSON
/// objects (never arrays by position), no unknown fields. The error names
/// the field that is wrong.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, AdminError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(Objects(&mut deserializer)).map_err(|error| {
        let field = error.path().to_string();
        let field = if field == "." { "body".to_owned() } else { field };
        AdminError::bad(field, error.inner().to_string())
    })?;
    deserializer.end().map_err(|error| AdminError::bad("body", error.to_string()))?;
    Ok(value)
}

/// A money amount: a decimal string such as "12.50", never a JSON number
/// (which would have passed through binary floating point).
#[derive(Debug, Clone, Copy)]
pub struct Amount(pub Decimal);

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)
            .map_err(|_| serde::de::Error::custom("amounts are decimal strings, e.g. \"12.50\""))?;
        if !is_amount_text(&text) {
            return Err(serde::de::Error::custom(format!(
                "{text:?} is not an amount: digits with an optional sign and at most \
                 {MAX_AMOUNT_SCALE} decimal places, e.g. \"12.50\""
            )));
        }
        let amount = text
            .parse::<Decimal>()
            .map_err(|_| serde::de::Error::custom(format!("{text:?} is not a decimal amount")))?;
        if too_fine(amount) {
            return Err(serde::de::Error::custom(format!(
                "{text:?} has more than {MAX_AMOUNT_SCALE} decimal places (a nano-dollar); round it"
            )));
        }
        Ok(Amount(amount))
    }
}

/// Whether `text` is written as the OpenAPI document says an amount is
/// (`openapi::AMOUNT_PATTERN`): `-?digits(.digits)?`, at most 13 whole digits
/// (the largest amount is 1e12) and 9 decimal places; no spaces, no exponent.
fn is_amount_text(text: &str) -> bool {
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (whole, fraction) = unsigned.split_once('.').map_or((unsigned, None), |(w, f)| (w, Some(f)));
    let digits =
        |part: &str, max: usize| (1..=max).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit());
    digits(whole, 13) && fraction.is_none_or(|f| digits(f, MAX_AMOUNT_SCALE as usize))
}

fn amount(value: Option<Amount>) -> Option<Decimal> {
    value.map(|a| a.0)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsIn {
    per_request: Option<Amount>,
    daily: Option<Amount>,
    monthly: Option<Amount>,
    contract_yearly: Option<Amount>,
}

impl From<LimitsIn> for Limits {
    fn from(raw: LimitsIn) -> Self {
        Limits {
            per_request: amount(raw.per_request),
            daily: amount(raw.daily),
            monthly: amount(raw.monthly),
            contract_yearly: amount(raw.contract_yearly),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContractIn {
    start: NaiveDate,
    years: u32,
    platform_allocation_per_year: Amount,
    #[serde(default)]
    pro_seats: u32,
    seat_allocation_per_year: Option<Amount>,
}

impl From<ContractIn> for ContractTerm {
    fn from(raw: ContractIn) -> Self {
        ContractTerm {
            start: raw.start,
            years: raw.years,
            platform_allocation_per_year: raw.platform_allocation_per_year.0,
            pro_seats: raw.pro_seats,
            seat_allocation_per_year: amount(raw.seat_allocation_per_year).unwrap_or(Decimal::ZERO),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrgIn {
    name: String,
    time_zone: Option<String>,
    contract: Option<ContractIn>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum PlanIn {
    Pro,
    Lite,
}

impl From<PlanIn> for Plan {
    fn from(plan: PlanIn) -> Self {
        match plan {
            PlanIn::Pro => Plan::Pro,
            PlanIn::Lite => Plan::Lite,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserIn {
    name: String,
    plan: PlanIn,
    lite_monthly_allowance: Option<Amount>,
    #[serde(default)]
    prorate_on_downgrade: bool,
    #[serde(default)]
    limits: LimitsIn,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserPatch {
    plan: Option<PlanIn>,
    lite_monthly_allowance: Option<Amount>,
    prorate_on_downgrade: Option<bool>,
    limits: Option<LimitsIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppIn {
    name: String,
    #[serde(default)]
    limits: LimitsIn,
    #[serde(default)]
    end_user_limits: LimitsIn,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyIn {
    user: Option<u64>,
    app: Option<u64>,
    #[serde(default)]
    label: String,
    #[serde(default)]
    limits: LimitsIn,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurchaseIn {
    amount: Amount,
    expires_at: Option<DateTime<Utc>>,
    reference: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum WalletIn {
    Pool,
    LiteUser(u64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdjustmentIn {
    wallet: WalletIn,
    amount: Amount,
    reason: String,
    expires_at: Option<DateTime<Utc>>,
}

/// Key record as shown: never the hash, never the secret.
pub fn key_view(key: &ApiKey) -> Value {
    json!({
        "id": key.id, "org": key.org, "owner": key.owner, "label": key.label,
        "limits": key.limits, "scope": key.scope, "revoked": key.revoked, "created_at": key.created_at,
    })
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, AdminError> {
    optional_idempotency_key(headers)?.ok_or(AdminError::MissingHeader("Idempotency-Key"))
}

/// The `Idempotency-Key` of a create that takes one if given (orgs, users).
fn optional_idempotency_key(headers: &HeaderMap) -> Result<Option<String>, AdminError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value.to_str().ok().map(str::trim).filter(|k| !k.is_empty()).ok_or_else(|| {
        AdminError::bad("Idempotency-Key", format!("1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII bytes"))
    })?;
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(AdminError::bad("Idempotency-Key", format!("at most {MAX_IDEMPOTENCY_KEY_LEN} bytes")));
    }
    Ok(Some(key.to_owned()))
}

/// An org or a user as the API shows it: the `Idempotency-Key` it was
/// created under stays in the books (an org token must not read the
/// operator's, and nobody needs it back).
pub(super) fn shown(value: &impl serde::Serialize) -> Value {
    let mut value = json!(value);
    if let Some(fields) = value.as_object_mut() {
        fields.remove("idempotency_key");
    }
    value
}

fn id(segment: &str, what: &str) -> Result<u64, AdminError> {
    segment.parse().map_err(|_| AdminError::NotFound(format!("no {what} {segment}")))
}

/// `POST /admin/v1/orgs` and `GET /admin/v1/orgs`.
pub fn orgs(
    ledger: &Ledger,
    scope: Scope,
    method: &Method,
    headers: &HeaderMap,
    body: &[u8],
    now: DateTime<Utc>,
) -> Answer {
    match *method {
        Method::GET => {
            let orgs: Vec<_> = ledger.orgs().iter().filter(|o| scope.sees(o.id)).map(shown).collect();
            Ok((StatusCode::OK, json!({ "orgs": orgs })))
        }
        Method::POST => {
            if scope != Scope::Operator {
                return Err(AdminError::OperatorOnly);
            }
            let raw: OrgIn = parse(body)?;
            let time_zone = match raw.time_zone.as_deref() {
                None => chrono_tz::UTC,
                Some(name) => name.parse::<Tz>().map_err(|_| {
                    AdminError::bad(
                        "time_zone",
                        format!("{name:?} is not an IANA time zone, e.g. \"Europe/Berlin\""),
                    )
                })?,
            };
            let new = NewOrg { name: raw.name, time_zone, contract: raw.contract.map(Into::into) };
            let key = optional_idempotency_key(headers)?;
            Ok((StatusCode::CREATED, shown(&ledger.create_org_once(new, key, now)?)))
        }
        _ => Err(no_route(method, "/admin/v1/orgs")),
    }
}

pub fn no_route(method: &Method, path: &str) -> AdminError {
    AdminError::NoRoute { method: method.to_string(), path: path.to_owned() }
}

/// Who calls `/admin/v1/orgs/{org}/...`, for which org, and when.
pub struct OrgCall<'a> {
    pub ledger: &'a Ledger,
    pub org: OrgId,
    pub scope: Scope,
    pub headers: &'a HeaderMap,
    pub now: DateTime<Utc>,
}

/// Everything under `/admin/v1/orgs/{org}/`.
pub fn org_resource(call: &OrgCall<'_>, method: &Method, rest: &[&str], body: &[u8]) -> Answer {
    let OrgCall { ledger, org, scope, headers, now } = *call;
    let get = |value: Value| Ok((StatusCode::OK, value));
    match (method, rest) {
        (&Method::GET, []) => {
            get(shown(&ledger.org(org).ok_or_else(|| AdminError::NotFound(format!("no org {}", org.0)))?))
        }
        (&Method::POST, ["contracts"]) => {
            scope.require_finance()?;
            let raw: ContractIn = parse(body)?;
            Ok((StatusCode::CREATED, shown(&ledger.renew_contract(org, raw.into(), now)?)))
        }
        (&Method::POST, ["users"]) => create_user(call, body),
        (&Method::PATCH, ["users", user]) => patch_user(call, UserId(id(user, "user")?), body),
        (&Method::POST, ["apps"]) => {
            let raw: AppIn = parse(body)?;
            let new = NewApp {
                name: raw.name,
                limits: raw.limits.into(),
                end_user_limits: raw.end_user_limits.into(),
            };
            Ok((StatusCode::CREATED, json!(ledger.create_app(org, new, now)?)))
        }
        (&Method::POST, ["keys"]) => create_key(call, body),
        (&Method::POST, ["keys", key, "revoke"]) => {
            get(key_view(&ledger.revoke_key(org, KeyId(id(key, "key")?))?))
        }
        (&Method::PUT, ["keys", key, "scope"]) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct ScopeIn {
                #[serde(default)]
                routes: Vec<String>,
                #[serde(default)]
                models: Vec<String>,
            }
            let raw: ScopeIn = parse(body)?;
            let key_scope = KeyScope { routes: raw.routes, models: raw.models };
            get(key_view(&ledger.set_key_scope(org, KeyId(id(key, "key")?), key_scope)?))
        }
        (&Method::PUT, ["keys", key, "limits"]) => {
            let raw: LimitsIn = parse(body)?;
            get(key_view(&ledger.set_key_limits(org, KeyId(id(key, "key")?), raw.into())?))
        }
        (&Method::PUT, ["apps", app, "limits"]) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct AppLimits {
                #[serde(default)]
                limits: LimitsIn,
                #[serde(default)]
                end_user_limits: LimitsIn,
            }
            let raw: AppLimits = parse(body)?;
            let app = AppId(id(app, "app")?);
            get(json!(ledger.set_app_limits(org, app, raw.limits.into(), raw.end_user_limits.into())?))
        }
        (&Method::POST, ["purchases"]) => {
            scope.require_finance()?;
            let raw: PurchaseIn = parse(body)?;
            let request = PurchaseRequest {
                org,
                amount: raw.amount.0,
                expires_at: raw.expires_at,
                reference: raw.reference,
                idempotency_key: idempotency_key(headers)?,
            };
            let receipt =
                ledger.purchase(request, now).map_err(|e| AdminError::money_write("purchase", e))?;
            Ok((StatusCode::CREATED, json!(receipt)))
        }
        (&Method::POST, ["adjustments"]) => {
            scope.require_finance()?;
            let raw: AdjustmentIn = parse(body)?;
            let wallet = match raw.wallet {
                WalletIn::Pool => WalletId::Pool(org),
                WalletIn::LiteUser(user) => WalletId::Lite(UserId(user)),
            };
            let request = AdjustmentRequest {
                org,
                wallet,
                amount: raw.amount.0,
                reason: raw.reason,
                expires_at: raw.expires_at,
                idempotency_key: idempotency_key(headers)?,
            };
            let receipt =
                ledger.adjust(request, now).map_err(|e| AdminError::money_write("adjustment", e))?;
            Ok((StatusCode::CREATED, json!(receipt)))
        }
        (&Method::GET, ["balances"]) => {
            let balances = ledger
                .wallets_of(org)
                .into_iter()
                .map(|wallet| ledger.balance(wallet, now))
                .collect::<Result<Vec<_>, _>>()?;
            get(json!({ "balances": balances }))
        }
        _ => Err(no_route(method, &format!("/admin/v1/orgs/{}/{}", org.0, rest.join("/")))),
    }
}

fn create_user(call: &OrgCall<'_>, body: &[u8]) -> Answer {
    let OrgCall { ledger, org, scope, headers, now } = *call;
    let raw: UserIn = parse(body)?;
    let plan: Plan = raw.plan.into();
    let allowance = amount(raw.lite_monthly_allowance).unwrap_or(Decimal::ZERO);
    if plan == Plan::Lite && raw.lite_monthly_allowance.is_none() {
        return Err(AdminError::rule("lite_monthly_allowance", "required for a Lite user, e.g. \"10.00\""));
    }
    // A Lite user is granted their allowance at once and every month; an
    // allowance or pro-rating set now is granted on a later downgrade.
    if !allowance.is_zero() || raw.prorate_on_downgrade {
        scope.require_finance()?;
    }
    let new = NewUser {
        name: raw.name,
        plan,
        lite_monthly_allowance: allowance,
        prorate_on_downgrade: raw.prorate_on_downgrade,
        limits: raw.limits.into(),
    };
    let key = optional_idempotency_key(headers)?;
    Ok((StatusCode::CREATED, shown(&ledger.create_user_once(org, new, key, now)?)))
}

fn patch_user(call: &OrgCall<'_>, user: UserId, body: &[u8]) -> Answer {
    let OrgCall { ledger, org, scope, now, .. } = *call;
    let raw: UserPatch = parse(body)?;
    let current = ledger
        .user(user)
        .filter(|u| u.org == org)
        .ok_or_else(|| AdminError::NotFound(format!("no user {}", user.0)))?;
    if grants_credit(&raw, &current) {
        scope.require_finance()?;
    }
    // Each part is its own durable change: all are checked before the first,
    // so a refused part leaves nothing of the patch recorded.
    let allowance = amount(raw.lite_monthly_allowance).unwrap_or(current.lite_monthly_allowance);
    crate::ledger::check_amount("lite_monthly_allowance", allowance)?;
    let limits: Option<Limits> = raw.limits.map(Into::into);
    if let Some(limits) = &limits {
        limits.validate().map_err(crate::ledger::LedgerError::from)?;
    }
    if raw.lite_monthly_allowance.is_some() || raw.prorate_on_downgrade.is_some() {
        let prorate = raw.prorate_on_downgrade.unwrap_or(current.prorate_on_downgrade);
        ledger.set_lite_allowance(org, user, allowance, prorate, now)?;
    }
    if let Some(limits) = limits {
        ledger.set_user_limits(org, user, limits)?;
    }
    if let Some(plan) = raw.plan {
        let plan: Plan = plan.into();
        if plan != current.plan {
            ledger.set_user_plan(org, user, plan, now)?;
        }
    }
    let updated = ledger.user(user).ok_or_else(|| AdminError::NotFound(format!("no user {}", user.0)))?;
    Ok((StatusCode::OK, shown(&updated)))
}

/// What a change would take from a wallet's credit, so that in cluster mode
/// it is first taken out of reach of the replicas' leases
/// ([`crate::cluster::ClusterNode::reserve`]).
pub enum CreditTaken {
    /// A negative adjustment: exactly this much, or it is refused.
    Adjustment(WalletId, Decimal),
    /// A Lite user's upgrade writes the Lite wallet off: whatever it holds.
    WriteOff(WalletId, Decimal),
}

/// The credit a change would take: a negative adjustment by a finance scope
/// of a wallet of the caller's organization (not a replay of one already
/// made), or a Lite user's upgrade. `None` for anything else, including a
/// body that does not parse: the change itself refuses what it must.
pub fn credit_taken(call: &OrgCall<'_>, method: &Method, rest: &[&str], body: &[u8]) -> Option<CreditTaken> {
    let OrgCall { ledger, org, scope, headers, now } = *call;
    match (method, rest) {
        (&Method::POST, ["adjustments"]) => {
            scope.require_finance().ok()?;
            let key = idempotency_key(headers).ok()?;
            if ledger.idempotency_key_used(org, &key) {
                return None; // A replay: it answers the first result.
            }
            // Read as the change reads it (`7.0` is the id 7): a body
            // this read could not take would reserve nothing for a change
            // that goes through.
            let raw: AdjustmentIn = parse(body).ok()?;
            let wallet = match raw.wallet {
                WalletIn::Pool => WalletId::Pool(org),
                WalletIn::LiteUser(user) => {
                    let user = ledger.user(UserId(user)).filter(|u| u.org == org)?;
                    WalletId::Lite(user.id)
                }
            };
            (raw.amount.0 < Decimal::ZERO).then(|| CreditTaken::Adjustment(wallet, -raw.amount.0))
        }
        (&Method::PATCH, ["users", user]) => {
            let raw: UserPatch = parse(body).ok()?;
            let user = ledger.user(UserId(user.parse().ok()?)).filter(|u| u.org == org)?;
            let upgrade =
                user.plan == Plan::Lite && raw.plan.is_some_and(|plan| Plan::from(plan) != Plan::Lite);
            let wallet = WalletId::Lite(user.id);
            let left = ledger.balance(wallet, now).ok()?.balance;
            (upgrade && left > Decimal::ZERO).then_some(CreditTaken::WriteOff(wallet, left))
        }
        _ => None,
    }
}

/// Whether a user change can grant credit: a new allowance or pro-rating
/// setting, or a downgrade to Lite (granted its allowance, pro-rated or from
/// the next month; never twice in one month, however often it cycles).
fn grants_credit(patch: &UserPatch, current: &User) -> bool {
    let allowance = amount(patch.lite_monthly_allowance).unwrap_or(current.lite_monthly_allowance);
    let prorate = patch.prorate_on_downgrade.unwrap_or(current.prorate_on_downgrade);
    let downgrade = matches!(patch.plan, Some(PlanIn::Lite)) && current.plan != Plan::Lite;
    allowance != current.lite_monthly_allowance
        || prorate != current.prorate_on_downgrade
        || (downgrade && !allowance.is_zero())
}

fn create_key(call: &OrgCall<'_>, body: &[u8]) -> Answer {
    let OrgCall { ledger, org, now, .. } = *call;
    let raw: KeyIn = parse(body)?;
    let owner = match (raw.user, raw.app) {
        (Some(user), None) => Owner::User(UserId(user)),
        (None, Some(app)) => Owner::App(AppId(app)),
        _ => return Err(AdminError::rule("user", "name exactly one owner: \"user\": ID or \"app\": ID")),
    };
    let secret = new_secret();
    let new =
        NewKey { owner, hash: KeyHash::of_secret(&secret), label: raw.label, limits: raw.limits.into() };
    let key = ledger.create_key(org, new, now)?;
    let mut view = key_view(&key);
    // Shown once: only its hash is kept.
    view["secret"] = json!(secret);
    Ok((StatusCode::CREATED, view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertIn {
    wallet: WalletIn,
    condition: Condition,
    webhook_url: String,
    secret: String,
}

/// `/admin/v1/orgs/{org}/alerts[/deliveries]`.
pub async fn alert_resource(
    call: &OrgCall<'_>,
    alerts: &Alerts,
    method: &Method,
    rest: &[&str],
    body: &[u8],
) -> Answer {
    let OrgCall { ledger, org, scope, .. } = *call;
    match (method, rest) {
        (&Method::GET, ["alerts"]) => {
            let rules: Vec<Value> =
                alerts.rules_of(org).await.map_err(alert_error)?.iter().map(Rule::view).collect();
            Ok((StatusCode::OK, json!({ "rules": rules })))
        }
        (&Method::GET, ["alerts", "deliveries"]) => {
            let mut deliveries = alerts.deliveries_of(org).await.map_err(alert_error)?;
            // What a connection attempt ran into (refused, reset, timed out)
            // would map the network behind an address: org tokens see only
            // that it failed; the operator sees why.
            if scope != Scope::Operator {
                for delivery in &mut deliveries {
                    if delivery.last_error.is_some() {
                        delivery.last_error = Some("not delivered".to_owned());
                    }
                }
            }
            Ok((StatusCode::OK, json!({ "deliveries": deliveries })))
        }
        (&Method::POST, ["alerts"]) => {
            let raw: AlertIn = parse(body)?;
            let wallet = match raw.wallet {
                WalletIn::Pool => WalletId::Pool(org),
                WalletIn::LiteUser(user) => {
                    // Only this organization's users: another org's do not exist here.
                    ledger
                        .user(UserId(user))
                        .filter(|u| u.org == org)
                        .ok_or_else(|| AdminError::NotFound(format!("no user {user}")))?;
                    WalletId::Lite(UserId(user))
                }
            };
            let rule = alerts
                .add_rule(org, wallet, raw.condition, raw.webhook_url, raw.secret)
                .await
                .map_err(alert_error)?;
            Ok((StatusCode::CREATED, rule.view()))
        }
        _ => Err(no_route(method, &format!("/admin/v1/orgs/{}/{}", org.0, rest.join("/")))),
    }
}

pub(super) fn alert_error(error: AlertError) -> AdminError {
    match error {
        // A URL of the documented form to an address the policy refuses, or
        // a share of the documented form that is zero ("00"), is a rule;
        // anything else is the wrong shape.
        AlertError::Invalid { field: field @ ("webhook_url" | "condition.percent"), reason } => {
            AdminError::rule(field, reason)
        }
        AlertError::Invalid { field, reason } => AdminError::bad(field, reason),
        AlertError::TooMany { .. } => AdminError::rule("body", error.to_string()),
        AlertError::Save { .. } | AlertError::Load { .. } | AlertError::Cluster(_) => {
            AdminError::Store(error.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_read_exactly_as_documented() {
        // Proves the reader and the document's pattern agree on what an amount is.
        for good in ["0", "12.50", "-0.5", "1000000000000", "0.000000001"] {
            assert!(is_amount_text(good), "{good}");
        }
        for bad in
            ["", " 1", "1 ", "+1", "1.", ".5", "1e3", "0x10", "1.0000000001", "12345678901234", "--1", "1,5"]
        {
            assert!(!is_amount_text(bad), "{bad:?}");
        }
    }

    #[test]
    fn money_inputs_keep_the_cost_scale() {
        // Proves the input cap and the price engine's cost scale cannot drift apart.
        assert_eq!(MAX_AMOUNT_SCALE, crate::pricing::COST_SCALE);
    }
}
