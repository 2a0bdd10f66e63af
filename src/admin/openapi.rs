//! The OpenAPI 3.1 description of `/admin/v1`, served at
//! `/admin/v1/openapi.json`. [`ROUTES`] lists every endpoint the router
//! answers; a test calls each one and checks that no other method on those
//! paths is answered, so the document and the router cannot drift apart.

use serde_json::{json, Map, Value};

/// One documented endpoint.
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    /// Operator token only (org tokens get 403).
    pub operator_only: bool,
}

const fn route(method: &'static str, path: &'static str, summary: &'static str) -> RouteDoc {
    RouteDoc { method, path, summary, operator_only: false }
}

const fn operator(method: &'static str, path: &'static str, summary: &'static str) -> RouteDoc {
    RouteDoc { method, path, summary, operator_only: true }
}

pub const ROUTES: &[RouteDoc] = &[
    route("get", "/admin/v1/openapi.json", "This document"),
    route("get", "/admin/v1/whoami", "The caller's scope: the operator, or one organization"),
    operator("get", "/admin/v1/prices", "The price table in force and the last reload"),
    operator("get", "/admin/v1/prices/table", "Every model and tool with its prices in force now"),
    operator("post", "/admin/v1/prices/reload", "Reload the price file; 422 with every problem if invalid"),
    route("get", "/admin/v1/orgs", "Organizations (an org token sees its own)"),
    operator(
        "post",
        "/admin/v1/orgs",
        "Create an organization, optionally with its first contract (an Idempotency-Key header makes a retry safe)",
    ),
    route("get", "/admin/v1/orgs/{org}", "One organization and its contracts"),
    route("post", "/admin/v1/orgs/{org}/contracts", "Add a contract term (renewal)"),
    route("get", "/admin/v1/orgs/{org}/users", "Users"),
    route(
        "post",
        "/admin/v1/orgs/{org}/users",
        "Create a Pro or Lite user (an Idempotency-Key header makes a retry safe)",
    ),
    route("patch", "/admin/v1/orgs/{org}/users/{user}", "Change plan, Lite allowance or limits"),
    route("get", "/admin/v1/orgs/{org}/apps", "Applications"),
    route("post", "/admin/v1/orgs/{org}/apps", "Create an application"),
    route("put", "/admin/v1/orgs/{org}/apps/{app}/limits", "Set an application's and its end users' limits"),
    route("get", "/admin/v1/orgs/{org}/keys", "API keys, without secrets"),
    route("post", "/admin/v1/orgs/{org}/keys", "Create a key; the secret is returned once"),
    route("post", "/admin/v1/orgs/{org}/keys/{key}/revoke", "Revoke a key"),
    route("put", "/admin/v1/orgs/{org}/keys/{key}/limits", "Set a key's limits"),
    route("put", "/admin/v1/orgs/{org}/keys/{key}/scope", "Restrict a key to some routes and models"),
    route("post", "/admin/v1/orgs/{org}/purchases", "Buy credits (Idempotency-Key header required)"),
    route("post", "/admin/v1/orgs/{org}/adjustments", "Correct a wallet (Idempotency-Key header required)"),
    route("get", "/admin/v1/orgs/{org}/balances", "Pool and Lite wallets: balance, lots, holds"),
    route(
        "get",
        "/admin/v1/orgs/{org}/summary",
        "Time zone, this contract year's allocation consumed, recent 402s by wallet and reason",
    ),
    route("get", "/admin/v1/orgs/{org}/ledger", "Ledger entries: cursor paging and filters"),
    route("get", "/admin/v1/orgs/{org}/usage", "Usage totals grouped by dimensions, JSON or CSV"),
    route("get", "/admin/v1/orgs/{org}/alerts", "Alert rules (secrets never shown)"),
    route("post", "/admin/v1/orgs/{org}/alerts", "Add an alert rule: a signed webhook to a public address"),
    route("get", "/admin/v1/orgs/{org}/alerts/deliveries", "Webhook deliveries and their status"),
];

/// The methods documented for a concrete path (`/admin/v1/orgs/3/keys`),
/// matching `{param}` segments to any segment; empty if no path matches.
pub fn methods_for(path: &str) -> Vec<&'static str> {
    let path = path.trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').collect();
    let matches = |template: &str| {
        let parts: Vec<&str> = template.split('/').collect();
        parts.len() == segments.len()
            && parts.iter().zip(&segments).all(|(part, segment)| part.starts_with('{') || part == segment)
    };
    ROUTES.iter().filter(|route| matches(route.path)).map(|route| route.method).collect()
}

/// A money amount: a decimal string with at most 9 places.
fn amount() -> Value {
    json!({"type": "string", "pattern": AMOUNT_PATTERN, "examples": ["12.50"]})
}

/// An amount of at least zero (alert thresholds).
fn non_negative_amount() -> Value {
    json!({"type": "string", "pattern": AMOUNT_PATTERN.replacen("-?", "", 1), "examples": ["100"]})
}

/// A share in percent, at most 100 with at most 9 places (zero is refused
/// as a rule: 422).
fn percent() -> Value {
    json!({"type": "string", "pattern": "^(100(\\.0{1,9})?|[0-9]{1,2}(\\.[0-9]{1,9})?)$", "examples": ["80"]})
}

/// An amount or null (left unset).
fn optional_amount() -> Value {
    json!({"type": ["string", "null"], "pattern": AMOUNT_PATTERN})
}

/// What the admin API reads as an amount (see `api::Amount`).
pub const AMOUNT_PATTERN: &str = "^-?[0-9]{1,13}(\\.[0-9]{1,9})?$";

fn object(properties: Value, required: &[&str]) -> Value {
    json!({"type": "object", "additionalProperties": false, "properties": properties, "required": required})
}

fn limits() -> Value {
    object(
        json!({"per_request": optional_amount(), "daily": optional_amount(), "monthly": optional_amount(), "contract_yearly": optional_amount()}),
        &[],
    )
}

fn contract() -> Value {
    object(
        json!({
            "start": {"type": "string", "format": "date"},
            "years": {"type": "integer", "minimum": 0, "maximum": u32::MAX},
            "platform_allocation_per_year": amount(),
            "pro_seats": {"type": "integer", "minimum": 0, "maximum": u32::MAX},
            "seat_allocation_per_year": optional_amount(),
        }),
        &["start", "years", "platform_allocation_per_year"],
    )
}

fn wallet() -> Value {
    json!({"oneOf": [
        {"type": "string", "enum": ["pool"]},
        object(json!({"lite_user": {"type": "integer", "minimum": 0, "maximum": u64::MAX}}), &["lite_user"]),
    ]})
}

/// An IANA time zone name, as chrono-tz knows them.
fn time_zone() -> Value {
    let mut names: Vec<Value> = chrono_tz::TZ_VARIANTS.iter().map(|tz| json!(tz.name())).collect();
    names.push(Value::Null);
    json!({
        "enum": names,
        "examples": ["Europe/Berlin"],
        "description": "The zone of the org's calendar (Lite resets on the 1st, contract years, limit periods, \
                        reports); UTC when absent or null; fixed once the org is created."
    })
}

/// A time, or empty (the same as leaving the parameter out).
fn query_time() -> Value {
    json!({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "string", "maxLength": 0}]})
}

fn plan() -> Value {
    json!({"type": "string", "enum": ["pro", "lite"]})
}

fn condition() -> Value {
    let tagged = |kind: &str, properties: Value, required: &[&str]| {
        let mut properties = properties;
        properties["type"] = json!({"type": "string", "const": kind});
        let mut all = vec!["type"];
        all.extend_from_slice(required);
        object(properties, &all)
    };
    json!({"oneOf": [
        tagged("consumed_share", json!({"percent": percent()}), &["percent"]),
        tagged("balance_below", json!({"amount": non_negative_amount()}), &["amount"]),
        tagged("lite_wallet_empty", json!({}), &[]),
        tagged("spend_limit_reached", json!({}), &[]),
        tagged("usage_over_hold", json!({}), &[]),
    ]})
}

/// The request body an endpoint reads, if any. Bodies are strict: JSON
/// objects only, unknown fields refused, amounts as decimal strings.
fn request_schema(method: &str, path: &str) -> Option<Value> {
    let schema = match (method, path.trim_start_matches("/admin/v1")) {
        ("post", "/orgs") => object(
            json!({"name": text(), "time_zone": time_zone(), "contract": {"anyOf": [contract(), {"type": "null"}]}}),
            &["name"],
        ),
        ("post", "/orgs/{org}/contracts") => contract(),
        ("post", "/orgs/{org}/users") => object(
            json!({"name": text(), "plan": plan(), "lite_monthly_allowance": optional_amount(), "prorate_on_downgrade": {"type": "boolean"}, "limits": limits()}),
            &["name", "plan"],
        ),
        ("patch", "/orgs/{org}/users/{user}") => object(
            json!({"plan": {"anyOf": [plan(), {"type": "null"}]}, "lite_monthly_allowance": optional_amount(), "prorate_on_downgrade": {"type": ["boolean", "null"]}, "limits": {"anyOf": [limits(), {"type": "null"}]}}),
            &[],
        ),
        ("post", "/orgs/{org}/apps") => {
            object(json!({"name": text(), "limits": limits(), "end_user_limits": limits()}), &["name"])
        }
        ("put", "/orgs/{org}/apps/{app}/limits") => {
            object(json!({"limits": limits(), "end_user_limits": limits()}), &[])
        }
        ("post", "/orgs/{org}/keys") => object(
            json!({"user": {"type": ["integer", "null"], "minimum": 0, "maximum": u64::MAX}, "app": {"type": ["integer", "null"], "minimum": 0, "maximum": u64::MAX}, "label": text(), "limits": limits()}),
            &[],
        ),
        ("put", "/orgs/{org}/keys/{key}/limits") => limits(),
        ("put", "/orgs/{org}/keys/{key}/scope") => object(
            json!({"routes": {"type": "array", "items": text()}, "models": {"type": "array", "items": text()}}),
            &[],
        ),
        ("post", "/orgs/{org}/purchases") => object(
            json!({"amount": amount(), "expires_at": {"type": ["string", "null"], "format": "date-time"}, "reference": {"anyOf": [prose(), {"type": "null"}]}}),
            &["amount"],
        ),
        ("post", "/orgs/{org}/adjustments") => object(
            json!({"wallet": wallet(), "amount": amount(), "reason": prose(), "expires_at": {"type": ["string", "null"], "format": "date-time"}}),
            &["wallet", "amount", "reason"],
        ),
        ("post", "/orgs/{org}/alerts") => object(
            json!({"wallet": wallet(), "condition": condition(), "webhook_url": {"type": "string", "format": "uri", "maxLength": crate::alerts::MAX_WEBHOOK_URL_BYTES}, "secret": {"type": "string", "minLength": 16, "maxLength": crate::alerts::MAX_SECRET_CHARS}}),
            &["wallet", "condition", "webhook_url", "secret"],
        ),
        _ => return None,
    };
    Some(schema)
}

/// Properties every one of which an answer has; others may follow.
fn has(properties: Value, required: &[&str]) -> Value {
    json!({"type": "object", "properties": properties, "required": required})
}

/// An amount in an answer: a decimal string.
fn decimal() -> Value {
    json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?$"})
}

fn id() -> Value {
    json!({"type": "integer", "minimum": 0})
}

fn time() -> Value {
    json!({"type": "string", "format": "date-time"})
}

fn organization() -> Value {
    has(
        json!({"id": id(), "name": {"type": "string"}, "time_zone": {"type": "string"},
               "contracts": {"type": "array", "items": {"type": "object"}}, "created_at": time()}),
        &["id", "name", "time_zone", "contracts", "created_at"],
    )
}

/// An entry's kind: a debit's also shows the price the customer paid (the
/// amount debited) and, to the operator's token only, what it cost the
/// operator before markup.
fn entry_kind() -> Value {
    json!({
        "type": "object",
        "properties": {"type": {"type": "string"}},
        "required": ["type"],
        "if": {"properties": {"type": {"const": "debit"}}},
        "then": has(
            json!({"operator_cost": decimal(), "price": decimal(), "held": decimal(), "overrun": decimal()}),
            &["price", "held", "overrun"],
        ),
    })
}

/// A usage row's totals; `operator_cost` is shown to the operator's token only.
fn usage_totals() -> Value {
    let count = json!({"type": "integer", "minimum": 0});
    let required: Vec<&str> =
        super::reports::TOTALS_FIELDS.into_iter().filter(|field| *field != "operator_cost").collect();
    has(
        json!({"requests": count, "charged": decimal(), "operator_cost": decimal(), "input_tokens": count,
               "cached_input_tokens": count, "output_tokens": count, "tool_units": count}),
        &required,
    )
}

/// Limits as the API shows them: each an amount or null.
fn shown_limits() -> Value {
    let amount = json!({"anyOf": [decimal(), {"type": "null"}]});
    has(
        json!({"per_request": amount, "daily": amount, "monthly": amount, "contract_yearly": amount}),
        &["per_request", "daily", "monthly", "contract_yearly"],
    )
}

fn user() -> Value {
    has(
        json!({"id": id(), "org": id(), "name": {"type": "string"}, "plan": plan(),
               "lite_monthly_allowance": decimal(), "prorate_on_downgrade": {"type": "boolean"},
               "limits": shown_limits(), "created_at": time()}),
        &[
            "id",
            "org",
            "name",
            "plan",
            "lite_monthly_allowance",
            "prorate_on_downgrade",
            "limits",
            "created_at",
        ],
    )
}

fn application() -> Value {
    has(
        json!({"id": id(), "org": id(), "name": {"type": "string"}, "limits": shown_limits(),
               "end_user_limits": shown_limits(), "created_at": time()}),
        &["id", "org", "name", "limits", "end_user_limits", "created_at"],
    )
}

/// A key record: never its hash; the secret only in the answer that created it.
fn key(with_secret: bool) -> Value {
    let owner =
        json!({"oneOf": [has(json!({"user": id()}), &["user"]), has(json!({"app": id()}), &["app"])]});
    let strings = json!({"type": "array", "items": {"type": "string"}});
    let mut properties = json!({"id": id(), "org": id(), "owner": owner, "label": {"type": "string"},
        "limits": shown_limits(), "scope": has(json!({"routes": strings, "models": strings}), &["routes", "models"]),
        "revoked": {"type": "boolean"}, "created_at": time()});
    let mut required = vec!["id", "org", "owner", "label", "limits", "scope", "revoked", "created_at"];
    if with_secret {
        properties["secret"] = json!({"type": "string", "minLength": 16});
        required.push("secret");
    }
    let mut schema = has(properties, &required);
    schema["not"] = json!({"required": ["hash"]});
    schema
}

fn alert_rule() -> Value {
    has(
        json!({"id": id(), "org": id(), "wallet": {"type": "object"}, "condition": {"type": "object"},
               "webhook_url": {"type": "string"}}),
        &["id", "org", "wallet", "condition", "webhook_url"],
    )
}

fn price_status() -> Value {
    let count = json!({"type": "integer", "minimum": 0});
    has(
        json!({"file": {"type": "string"}, "version": {"type": "string"}, "label": {"type": "string"},
               "content_hash": {"type": "string"},
               "as_of": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
               "age_days": {"type": ["integer", "null"]}, "markup_percent": decimal(),
               "loaded_at": time(), "last_reload_at": time(),
               "last_reload_error": {"type": ["string", "null"]}, "reloads_ok": count, "reloads_failed": count,
               "replicas_asked": {"type": ["boolean", "string"],
                   "description": "cluster mode, after a reload: true once every other replica was asked to \
                                   re-read its own price file, else why it was not"}}),
        &[
            "file",
            "version",
            "label",
            "content_hash",
            "markup_percent",
            "loaded_at",
            "reloads_ok",
            "reloads_failed",
        ],
    )
}

fn price_table() -> Value {
    let markup = decimal();
    let model = has(
        json!({"name": {"type": "string"}, "input_per_mtok": decimal(), "cached_input_per_mtok": decimal(),
               "output_per_mtok": decimal(), "per_request": decimal(), "markup_percent": markup}),
        &[
            "name",
            "input_per_mtok",
            "cached_input_per_mtok",
            "output_per_mtok",
            "per_request",
            "markup_percent",
        ],
    );
    let tool = has(
        json!({"name": {"type": "string"}, "per_call": decimal(), "per_unit": decimal(),
               "unit": {"type": ["string", "null"]}, "markup_percent": decimal()}),
        &["name", "per_call", "per_unit", "unit", "markup_percent"],
    );
    has(
        json!({"version": {"type": "string"}, "models": {"type": "array", "items": model},
               "tools": {"type": "array", "items": tool}}),
        &["version", "models", "tools"],
    )
}

/// What the dashboard's overview reads beside balances: the org's zone,
/// the contract year in force (null outside any term) and recent 402s.
fn org_summary() -> Value {
    let count = json!({"type": "integer", "minimum": 0});
    let year = has(
        json!({"term": count, "year": count, "start": time(), "end": time(), "allocated": decimal(),
               "remaining": decimal(), "consumed": decimal()}),
        &["term", "year", "start", "end", "allocated", "remaining", "consumed"],
    );
    let refusal = has(
        json!({"wallet": {"type": "object"},
               "reason": {"type": "string", "enum": ["insufficient_credits", "spend_limit_reached"]},
               "total": count, "last_day": count, "last_day_capped": {"type": "boolean"},
               "last_at": {"anyOf": [time(), {"type": "null"}]}}),
        &["wallet", "reason", "total", "last_day", "last_day_capped", "last_at"],
    );
    has(
        json!({"org": id(), "time_zone": {"type": "string"}, "now": time(),
               "contract_year": {"anyOf": [year, {"type": "null"}]},
               "refusals": has(json!({"since": time(), "counts": {"type": "array", "items": refusal}}),
                               &["since", "counts"])}),
        &["org", "time_zone", "now", "contract_year", "refusals"],
    )
}

/// The JSON each endpoint answers on success.
fn response_schema(method: &str, path: &str) -> Value {
    match (method, path.trim_start_matches("/admin/v1")) {
        ("get", "/prices") | ("post", "/prices/reload") => price_status(),
        ("get", "/prices/table") => price_table(),
        ("get", "/whoami") => has(
            json!({"scope": {"type": "string", "enum": ["operator", "org"]},
                   "org": {"anyOf": [id(), {"type": "null"}]}, "finance": {"type": "boolean"}}),
            &["scope", "org", "finance"],
        ),
        ("get", "/orgs/{org}/summary") => org_summary(),
        ("post", "/orgs/{org}/contracts") => organization(),
        ("get", "/orgs/{org}/users") => has(
            json!({"users": {"type": "array", "items": user()}, "next_cursor": {"anyOf": [id(), {"type": "null"}]}}),
            &["users", "next_cursor"],
        ),
        ("post", "/orgs/{org}/users") | ("patch", "/orgs/{org}/users/{user}") => user(),
        ("get", "/orgs/{org}/apps") => has(
            json!({"apps": {"type": "array", "items": application()},
                       "next_cursor": {"anyOf": [id(), {"type": "null"}]}}),
            &["apps", "next_cursor"],
        ),
        ("post", "/orgs/{org}/apps") | ("put", "/orgs/{org}/apps/{app}/limits") => application(),
        ("get", "/orgs/{org}/keys") => has(
            json!({"keys": {"type": "array", "items": key(false)},
                       "next_cursor": {"anyOf": [id(), {"type": "null"}]}}),
            &["keys", "next_cursor"],
        ),
        ("post", "/orgs/{org}/keys") => key(true),
        ("post", "/orgs/{org}/keys/{key}/revoke")
        | ("put", "/orgs/{org}/keys/{key}/limits")
        | ("put", "/orgs/{org}/keys/{key}/scope") => key(false),
        ("get", "/orgs/{org}/alerts") => {
            has(json!({"rules": {"type": "array", "items": alert_rule()}}), &["rules"])
        }
        ("post", "/orgs/{org}/alerts") => alert_rule(),
        ("get", "/orgs/{org}/alerts/deliveries") => has(
            json!({"deliveries": {"type": "array", "items": has(
                json!({"id": id(), "rule": id(), "org": id(), "event": {"type": "object"},
                       "status": {"type": "string", "enum": ["pending", "delivered", "failed"]},
                       "attempts": {"type": "integer", "minimum": 0},
                       "last_error": {"type": ["string", "null"]}, "created_at": time()}),
                &["id", "rule", "org", "event", "status", "attempts", "created_at"],
            )}}),
            &["deliveries"],
        ),
        ("get", "/orgs") => has(json!({"orgs": {"type": "array", "items": organization()}}), &["orgs"]),
        ("post", "/orgs") | ("get", "/orgs/{org}") => organization(),
        ("post", "/orgs/{org}/purchases") => has(
            json!({"entry": id(), "lot": id(), "wallet": {"type": "object"}, "amount": decimal(),
                   "expires_at": time(), "balance_after": decimal()}),
            &["entry", "lot", "wallet", "amount", "expires_at", "balance_after"],
        ),
        ("post", "/orgs/{org}/adjustments") => has(
            json!({"entry": id(), "lot": {"anyOf": [id(), {"type": "null"}]}, "wallet": {"type": "object"},
                   "amount": decimal(), "balance_after": decimal()}),
            &["entry", "wallet", "amount", "balance_after"],
        ),
        ("get", "/orgs/{org}/balances") => has(
            json!({"balances": {"type": "array", "items": has(
                json!({"wallet": {"type": "object"}, "balance": decimal()}),
                &["wallet", "balance"],
            )}}),
            &["balances"],
        ),
        ("get", "/orgs/{org}/ledger") => has(
            json!({
                "entries": {"type": "array", "items": has(
                    json!({"id": id(), "at": time(), "wallet": {"type": "object"}, "org": id(),
                           "kind": entry_kind(), "amount": decimal(), "balance_after": decimal()}),
                    &["id", "at", "wallet", "org", "kind", "amount", "balance_after"],
                )},
                "next_cursor": {"anyOf": [id(), {"type": "null"}]},
                "history": {
                    "type": "object",
                    "description": "Where history older than the store's retained window lives: records up to \
                        retained_after were exported (one file per UTC day) to export_dir and pruned.",
                    "properties": {
                        "retained_after": id(),
                        "export_dir": {"type": ["string", "null"]},
                        "exported_through": {"type": ["string", "null"]},
                        "checkpoint_seq": id(),
                        "checkpoint_at": {"anyOf": [time(), {"type": "null"}]},
                    },
                },
            }),
            &["entries", "next_cursor"],
        ),
        ("get", "/orgs/{org}/usage") => has(
            json!({"group_by": {"type": "array", "items": {"type": "string"}},
                   "rows": {"type": "array", "items": usage_totals()}, "total": usage_totals()}),
            &["group_by", "rows", "total"],
        ),
        _ => json!({"type": "object"}),
    }
}

/// Query parameters of the read endpoints. An empty value (`?limit=`) is
/// the same as leaving the parameter out.
fn query_parameters(path: &str) -> Vec<Value> {
    let names: &[(&str, Value)] = &match path {
        "/admin/v1/orgs/{org}/ledger" => vec![
            ("after", json!({"type": "string", "pattern": "^[0-9]*$"})),
            ("limit", json!({"type": "string", "pattern": "^[0-9]*$"})),
            ("wallet", json!({"type": "string", "pattern": "^(pool|lite:[0-9]{1,19})?$"})),
            (
                "kind",
                json!({"type": "string", "enum": ["", "grant", "purchase", "adjustment", "debit", "write_off", "write_off_reversed"]}),
            ),
            ("key", json!({"type": "string", "pattern": "^[0-9]*$"})),
            ("user", json!({"type": "string", "pattern": "^[0-9]*$"})),
            ("from", query_time()),
            ("to", query_time()),
        ],
        // Pages of at most 1,000, by id.
        "/admin/v1/orgs/{org}/users" | "/admin/v1/orgs/{org}/apps" | "/admin/v1/orgs/{org}/keys" => vec![
            ("after", json!({"type": "string", "pattern": "^[0-9]*$"})),
            ("limit", json!({"type": "string", "pattern": "^[0-9]*$"})),
        ],
        "/admin/v1/orgs/{org}/usage" => vec![
            ("group_by", json!({"type": "string", "pattern": group_by_pattern(), "examples": ["model,day"]})),
            ("from", query_time()),
            ("to", query_time()),
            ("format", json!({"type": "string", "enum": ["json", "csv"]})),
        ],
        _ => vec![],
    };
    names
        .iter()
        .map(|(name, schema)| {
            json!({"name": name, "in": "query", "required": false, "schema": schema,
                   "description": "An empty value is the same as leaving the parameter out."})
        })
        .collect()
}

fn path_parameters(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|segment| segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "integer", "minimum": 0}}))
        .collect()
}

/// The characters a name or label may not hold: control characters and
/// the invisible formatting ones `crate::ledger::admin` refuses.
const UNPRINTABLE: &str = "\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u061c\\u180e\\u200b\\u200e\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u206f\\ufeff\\ufff9-\\ufffb";

/// `group_by`: dimensions joined by commas, spaces around them.
fn group_by_pattern() -> String {
    let dimension = format!("({})", super::reports::DIMENSIONS.join("|"));
    format!("^ *{dimension}? *(, *{dimension}? *)*$")
}

/// A name, label or scope entry.
fn text() -> Value {
    json!({"type": "string", "pattern": format!("^[^{UNPRINTABLE}]*$")})
}

/// A reason or reference: as [`text`], with line breaks.
fn prose() -> Value {
    json!({"type": "string", "pattern": format!("^([^{UNPRINTABLE}]|[\\n\\r])*$")})
}

fn error(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

/// The answers an endpoint can give, success first.
fn responses(route: &RouteDoc) -> Value {
    let success =
        if route.method == "post" && !route.path.ends_with("/revoke") && !route.path.ends_with("/reload") {
            ("201", "Created")
        } else {
            ("200", "OK")
        };
    let schema = response_schema(route.method, route.path);
    let body = if route.path.ends_with("/usage") {
        json!({"application/json": {"schema": schema}, "text/csv": {"schema": {"type": "string"}}})
    } else {
        json!({"application/json": {"schema": schema}})
    };
    let mut answers = json!({
        success.0: {"description": success.1, "content": body},
        "400": error("The request is invalid; `field` names what is wrong"),
        "401": error("No valid token"),
        "403": error("Operator-only or finance-only for this token, or the admin API is off"),
        "404": error("No such resource (or it belongs to another organization)"),
        "405": error("The path exists but not with this method (see `Allow`)"),
        "503": error("The ledger store is unavailable"),
    });
    if route.path.ends_with("/purchases") || route.path.ends_with("/adjustments") {
        answers["409"] = error(
            "`idempotency_conflict`: the Idempotency-Key was used for a different request; `message` names \
             the field. `credit_leased` (cluster mode, a negative adjustment): replicas have that credit \
             leased; retry with the same key in a few seconds",
        );
        answers["503"] = error(
            "`outcome_unknown`: the store failed, so the write may or may not have been recorded; \
             retry with the same Idempotency-Key once /readyz answers 200 (the retry answers the \
             original result and never credits twice)",
        );
    }
    if takes_optional_idempotency_key(route) {
        answers["409"] = error(
            "`idempotency_conflict`: the Idempotency-Key was used for a different request (or for a user \
             changed since, or an org created without a contract that has one since); `message` names \
             the field",
        );
    }
    if route.path.ends_with("/usage") {
        answers["422"] = error(
            "`rule_refused`: `group_by` names a dimension twice, or the report would have more groups \
             than `[admin] max_report_groups`; narrow the range (`from`, `to`) or the grouping",
        );
    }
    if route.method == "patch" && route.path.ends_with("/users/{user}") {
        answers["409"] = error(
            "`credit_leased` (cluster mode, an upgrade from Lite): replicas have the Lite wallet's credit \
             leased; retry in a few seconds",
        );
    }
    // Counted before the route's own checks: an org token's write to an
    // operator-only route can meet the cap before its 403.
    if route.method != "get" {
        answers["429"] = error(
            "`admin_rate_limited`: this organization token made `[admin] org_writes_per_minute` \
             writes within the last minute; retry after `Retry-After` seconds",
        );
    }
    if route.path.ends_with("/reload") {
        answers["422"] = error("The price file is invalid; the previous table stays in force");
    } else if request_schema(route.method, route.path).is_some() {
        answers["422"] = error(
            "`rule_refused`: the body has the documented shape but a rule refuses it (no contract in \
             force, an expiry already past, an overlapping term, an unknown time zone, a webhook to a \
             private address, ...); `field` names what",
        );
    }
    answers
}

/// Creates that take an `Idempotency-Key` if given: a retry answers what the
/// first call created.
fn takes_optional_idempotency_key(route: &RouteDoc) -> bool {
    route.method == "post" && (route.path == "/admin/v1/orgs" || route.path.ends_with("/users"))
}

fn operation(route: &RouteDoc) -> Value {
    let mut parameters = path_parameters(route.path);
    if route.method == "get" {
        parameters.extend(query_parameters(route.path));
    }
    if route.path.ends_with("/purchases") || route.path.ends_with("/adjustments") {
        parameters.push(json!({"name": "Idempotency-Key", "in": "header", "required": true, "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[\\x21-\\x7e]+$"}}));
    }
    if takes_optional_idempotency_key(route) {
        parameters.push(json!({"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[\\x21-\\x7e]+$"}}));
    }
    let mut op = json!({"summary": route.summary, "parameters": parameters, "responses": responses(route)});
    if route.operator_only {
        op["description"] = json!("Operator token only; organization tokens get 403.");
    }
    if let Some(schema) = request_schema(route.method, route.path) {
        op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": schema}}});
    }
    op
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let entry = paths.entry(route.path).or_insert_with(|| json!({}));
        entry[route.method] = operation(route);
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "creditgate admin API", "version": env!("CARGO_PKG_VERSION")},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {
                    "type": "object",
                    "required": ["type", "code", "message"],
                    "properties": {
                        "type": {"type": "string"}, "code": {"type": "string"},
                        "message": {"type": "string"}, "field": {"type": "string"},
                    },
                }},
            }},
        },
    })
}
