//! Balance alerts: rules per wallet, evaluated off the request path, each
//! firing once per funding period per threshold as a signed webhook (a
//! period runs from one credit to the wallet to the next: a contract year's
//! grant, a month's Lite allowance, a purchase).
//!
//! Conditions: a share of the current allocation consumed (e.g. 80 %), the
//! balance below an amount, a Lite wallet that ran empty (a 402 on it), and a
//! spending limit reached. The proxy only drops a wallet id into a bounded
//! queue after each settle or refusal; a background task evaluates the rules.
//!
//! Webhooks go only to public addresses unless the operator allows more
//! (see `destination`). They are `POST`s of a JSON event with `x-creditgate-timestamp` (Unix
//! seconds) and `x-creditgate-signature: v1=<hex HMAC-SHA256 of
//! "{timestamp}.{body}" under the rule's secret>`, retried with exponential
//! backoff.
//!
//! On a single node, rules persist in `<data-dir>/alerts.json` and which
//! thresholds have fired is kept in memory, so after a restart a threshold
//! still crossed may fire once more. In cluster mode ([`cluster`]) rules,
//! firings and deliveries are in the shared books: a rule added through any
//! replica is in force on all of them, every replica evaluates it on the
//! spending its view of the books shows (all replicas' debits), and a
//! threshold fires once for the cluster, restarts included.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use http::Request;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parking_lot::{Mutex, RwLock};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub mod cluster;
mod destination;
pub mod refusals;

pub use destination::{DestinationPolicy, REFUSED as REFUSED_DESTINATION};

use crate::clock::Clock;
use crate::ledger::ids::{OrgId, RequestId, WalletId};
use crate::ledger::lot::Lot;
use crate::ledger::{too_fine, Ledger};
use destination::GuardedResolver;
use refusals::{RefusalCount, RefusalLog, RefusalReason};

/// Wallet signals waiting for evaluation; beyond this they are dropped (and
/// counted): a later settle on the same wallet signals again.
const QUEUE_CAPACITY: usize = 10_000;
/// Delivery records kept for the admin API.
const MAX_DELIVERIES: usize = 10_000;
/// Attempts per webhook before it is marked failed.
const MAX_ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Alert rules one organization may keep: each can send webhooks, so an org
/// token must not be able to add them without end.
pub const MAX_RULES_PER_ORG: usize = 50;
/// Longest signing secret a rule may have, in characters.
pub const MAX_SECRET_CHARS: usize = 256;
/// Longest webhook URL a rule may have.
pub const MAX_WEBHOOK_URL_BYTES: usize = 2048;
/// Periods remembered per rule as fired: enough for a rule fed by limits of
/// several periods at once (a daily and a monthly cap), never growing.
const FIRED_PERIODS_PER_RULE: usize = 4;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "type", deny_unknown_fields)]
pub enum Condition {
    /// `percent` of the live allocation consumed (e.g. "80"). Strings only:
    /// a JSON number would reach the Decimal through a float.
    ConsumedShare {
        #[serde(with = "rust_decimal::serde::str")]
        percent: Decimal,
    },
    /// Balance below `amount` dollars (a decimal string, never a number).
    BalanceBelow {
        #[serde(with = "rust_decimal::serde::str")]
        amount: Decimal,
    },
    /// A Lite wallet refused a request for lack of credits.
    LiteWalletEmpty,
    /// A spending limit refused a request.
    SpendLimitReached,
    /// An upstream billed a request past what was held for it (it ignored
    /// the cap it was sent): charged in full, and worth a look every time.
    UsageOverHold,
}

impl Condition {
    /// Refuses thresholds that can never be met exactly or at all.
    fn validate(&self) -> Result<(), AlertError> {
        let invalid = |field, reason: &str| Err(AlertError::Invalid { field, reason: reason.into() });
        match self {
            Condition::ConsumedShare { percent } => {
                if *percent <= Decimal::ZERO || *percent > Decimal::ONE_HUNDRED || too_fine(*percent) {
                    return invalid("condition.percent", "above 0 and at most 100, e.g. \"80\"");
                }
            }
            Condition::BalanceBelow { amount } => {
                if amount.is_sign_negative() || too_fine(*amount) {
                    return invalid(
                        "condition.amount",
                        "a dollar amount of at least 0 with at most 9 decimal places",
                    );
                }
            }
            Condition::LiteWalletEmpty | Condition::SpendLimitReached | Condition::UsageOverHold => {}
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rule {
    pub id: u64,
    pub org: OrgId,
    pub wallet: WalletId,
    pub condition: Condition,
    pub webhook_url: String,
    /// Signs deliveries; never shown back.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub secret: String,
}

impl Rule {
    /// The rule as the admin API shows it (no secret).
    pub fn view(&self) -> Value {
        json!({"id": self.id, "org": self.org, "wallet": self.wallet, "condition": self.condition, "webhook_url": self.webhook_url})
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub id: u64,
    pub rule: u64,
    pub org: OrgId,
    pub event: Value,
    /// pending, delivered or failed.
    pub status: &'static str,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// What the proxy reports.
#[derive(Debug, Clone, Copy)]
pub enum Signal {
    /// The wallet's balance changed.
    Changed(WalletId),
    /// A request was refused for lack of credits on this wallet.
    Empty(WalletId),
    /// A request was refused by a spending limit paid from this wallet;
    /// `period` tells one limit period from the next.
    LimitReached(WalletId, Option<DateTime<Utc>>),
    /// A debit on this wallet exceeded its request's hold (the request's
    /// id makes each such event a period of its own).
    OverHold(WalletId, RequestId),
}

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("cannot save alert rules to {path}: {reason}")]
    Save { path: String, reason: String },
    #[error("cannot read alert rules from {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("`{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("an organization keeps at most {max} alert rules")]
    TooMany { max: usize },
    #[error("the cluster's books (alert rules, deliveries, recent 402s) cannot be reached: {0}")]
    Cluster(String),
}

/// Where rules, firings and deliveries are kept.
enum Keeping {
    /// This gateway's own file; firings and deliveries in memory.
    File(PathBuf),
    /// The cluster's shared books, as `replica` (boxed: a pool is large).
    Cluster { books: Box<crate::cluster::Books>, replica: String },
}

pub struct Alerts {
    rules: Mutex<Vec<Rule>>,
    /// Wallets some rule watches: signals about any other wallet are not
    /// queued at all, so a gateway with no rule on a wallet pays nothing per
    /// request (no queue send, no wakeup of the evaluating task).
    watched: RwLock<HashSet<WalletId>>,
    /// Per rule, the latest periods it fired in (at most
    /// [`FIRED_PERIODS_PER_RULE`], oldest first).
    fired: Mutex<HashMap<u64, VecDeque<String>>>,
    /// Per watched wallet, the lots seen live and not yet expired: the
    /// ledger drops a lot once it is empty, and an allocation consumed in
    /// full must still count as allocated (100 % consumed, not 0 %).
    allocations: Mutex<HashMap<WalletId, Vec<Lot>>>,
    deliveries: Mutex<VecDeque<Delivery>>,
    next_id: AtomicU64,
    keeping: Keeping,
    queue: mpsc::Sender<Signal>,
    receiver: Mutex<Option<mpsc::Receiver<Signal>>>,
    pub dropped: AtomicU64,
    /// Where webhooks may go; the client's resolver enforces it too.
    policy: Arc<DestinationPolicy>,
    http: Client<HttpsConnector<HttpConnector<GuardedResolver>>, Full<Bytes>>,
    /// Recent 402s per wallet and reason, counted from the refusal signals.
    pub refusals: RefusalLog,
    /// When a refusal happened (the gateway's injectable clock).
    clock: Arc<dyn Clock>,
}

impl Alerts {
    /// Load the rules saved in `path` (none if the file does not exist);
    /// webhooks go only where `policy` allows.
    pub fn load(path: PathBuf, policy: DestinationPolicy) -> Result<Arc<Alerts>, AlertError> {
        Self::load_with_clock(path, policy, Arc::new(crate::clock::SystemClock))
    }

    /// As [`Alerts::load`], reading `clock` for when refusals happen.
    pub fn load_with_clock(
        path: PathBuf,
        policy: DestinationPolicy,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Alerts>, AlertError> {
        let rules = read_rules_file(&path)?;
        Ok(Self::with_rules(rules, Keeping::File(path), policy, clock))
    }

    /// Alerts kept in the cluster's shared `books` (see [`cluster`]), for
    /// the replica named `replica`: its rules read from them now.
    pub async fn in_cluster(
        books: crate::cluster::Books,
        replica: String,
        policy: DestinationPolicy,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Alerts>, AlertError> {
        let rules = cluster::read_rules(&books).await?;
        Ok(Self::with_rules(rules, Keeping::Cluster { books: Box::new(books), replica }, policy, clock))
    }

    fn with_rules(
        rules: Vec<Rule>,
        keeping: Keeping,
        policy: DestinationPolicy,
        clock: Arc<dyn Clock>,
    ) -> Arc<Alerts> {
        let next = rules.iter().map(|r| r.id).max().unwrap_or(0) + 1;
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let watched = rules.iter().map(|r| r.wallet).collect();
        let policy = Arc::new(policy);
        let refusals = match keeping {
            Keeping::File(_) => RefusalLog::new(clock.now()),
            Keeping::Cluster { .. } => RefusalLog::for_cluster(clock.now()),
        };
        Arc::new(Alerts {
            watched: RwLock::new(watched),
            rules: Mutex::new(rules),
            fired: Mutex::new(HashMap::new()),
            allocations: Mutex::new(HashMap::new()),
            deliveries: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(next),
            keeping,
            queue,
            receiver: Mutex::new(Some(receiver)),
            dropped: AtomicU64::new(0),
            http: webhook_client(policy.clone()),
            policy,
            refusals,
            clock,
        })
    }

    /// Report a signal without waiting; a full queue drops it (counted).
    pub fn notify(&self, signal: Signal) {
        // Counted whether or not a rule watches the wallet: the dashboard
        // shows every wallet's recent 402s.
        match signal {
            Signal::Empty(wallet) => {
                self.refusals.record(wallet, RefusalReason::InsufficientCredits, self.clock.now())
            }
            Signal::LimitReached(wallet, _) => {
                self.refusals.record(wallet, RefusalReason::SpendLimitReached, self.clock.now());
            }
            Signal::Changed(_) | Signal::OverHold(..) => {}
        }
        let wallet = signal.wallet();
        if !self.watched.read().contains(&wallet) {
            return;
        }
        if self.queue.try_send(signal).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Add a rule and save it (in the file, or in the cluster's books)
    /// before answering.
    pub async fn add_rule(
        &self,
        org: OrgId,
        wallet: WalletId,
        condition: Condition,
        webhook_url: String,
        secret: String,
    ) -> Result<Rule, AlertError> {
        // Bounded: each settle of a watched wallet copies its rules.
        if webhook_url.len() > MAX_WEBHOOK_URL_BYTES {
            return Err(AlertError::Invalid {
                field: "webhook_url",
                reason: format!("at most {MAX_WEBHOOK_URL_BYTES} bytes"),
            });
        }
        self.policy
            .check_url(&webhook_url)
            .map_err(|reason| AlertError::Invalid { field: "webhook_url", reason: reason.into() })?;
        // Characters, as the OpenAPI document's `minLength` counts them.
        if !(16..=MAX_SECRET_CHARS).contains(&secret.chars().count()) {
            return Err(AlertError::Invalid {
                field: "secret",
                reason: format!("16 to {MAX_SECRET_CHARS} characters"),
            });
        }
        condition.validate()?;
        let mut rule = Rule { id: 0, org, wallet, condition, webhook_url, secret };
        let path = match &self.keeping {
            Keeping::File(path) => path,
            Keeping::Cluster { books, .. } => {
                rule.id = cluster::add_rule(books, &rule).await?;
                // In force here at once; the others reload when told.
                self.rules.lock().push(rule.clone());
                self.watched.write().insert(rule.wallet);
                return Ok(rule);
            }
        };
        rule.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut rules = self.rules.lock();
        if rules.iter().filter(|r| r.org == org).count() >= MAX_RULES_PER_ORG {
            return Err(AlertError::TooMany { max: MAX_RULES_PER_ORG });
        }
        // Saved first: a rule the file does not hold is not in force either.
        let mut saved = rules.clone();
        saved.push(rule.clone());
        save_rules_file(path, &saved)?;
        *rules = saved;
        self.watched.write().insert(rule.wallet);
        Ok(rule)
    }

    /// `org`'s rules (in cluster mode, as the shared books hold them now).
    pub async fn rules_of(&self, org: OrgId) -> Result<Vec<Rule>, AlertError> {
        match &self.keeping {
            Keeping::File(_) => Ok(self.rules.lock().iter().filter(|r| r.org == org).cloned().collect()),
            Keeping::Cluster { books, .. } => cluster::rules_of(books, org).await,
        }
    }

    /// `org`'s deliveries, oldest first (in cluster mode, every replica's).
    pub async fn deliveries_of(&self, org: OrgId) -> Result<Vec<Delivery>, AlertError> {
        match &self.keeping {
            Keeping::File(_) => Ok(self.deliveries.lock().iter().filter(|d| d.org == org).cloned().collect()),
            Keeping::Cluster { books, .. } => cluster::deliveries_of(books, org).await,
        }
    }

    /// The recent 402s of `wallets` as of `now`, and since when they are
    /// counted: this gateway's, or in a cluster every replica's.
    pub async fn refusal_counts(
        &self,
        wallets: &[WalletId],
        now: DateTime<Utc>,
    ) -> Result<(DateTime<Utc>, Vec<RefusalCount>), AlertError> {
        match &self.keeping {
            Keeping::File(_) => Ok((self.refusals.since(), self.refusals.counts(wallets, now))),
            Keeping::Cluster { books, .. } => cluster::refusal_counts(books, wallets, now).await,
        }
    }

    /// Replaces the rules in force (a cluster replica's reload).
    fn replace_rules(&self, rules: Vec<Rule>) {
        *self.watched.write() = rules.iter().map(|r| r.wallet).collect();
        *self.rules.lock() = rules;
    }

    /// Evaluate signals until shutdown.
    pub async fn run(
        self: Arc<Self>,
        ledger: Arc<Ledger>,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) {
        let Some(mut receiver) = self.receiver.lock().take() else { return };
        loop {
            let signal = tokio::select! {
                signal = receiver.recv() => match signal { Some(s) => s, None => return },
                () = shutdown.cancelled() => return,
            };
            for (rule, period, facts) in self.due(&ledger, signal, clock.now()) {
                let alerts = self.clone();
                tokio::spawn(async move { alerts.fire(rule, period, facts).await });
            }
        }
    }

    /// The rules this signal makes fire now, each marked as fired.
    fn due(&self, ledger: &Ledger, signal: Signal, now: DateTime<Utc>) -> Vec<(Rule, String, Value)> {
        let wallet = signal.wallet();
        let rules: Vec<Rule> = self.rules.lock().iter().filter(|r| r.wallet == wallet).cloned().collect();
        if rules.is_empty() {
            return Vec::new();
        }
        let Ok(balance) = ledger.balance(wallet, now) else { return Vec::new() };
        let allocated = self.allocated(wallet, &balance.lots, now);
        // A period runs from one credit to the wallet to the next (a
        // contract year's grant, a month's Lite allowance, a purchase): the
        // wallet's lifetime credit names it. It is the same on every
        // replica and after a restart, which a cluster's once-only firing
        // needs.
        let period = format!("granted:{}", balance.totals.granted.normalize());
        let remaining: Decimal = balance.lots.iter().map(|l| l.remaining).sum();
        let consumed_percent = if allocated > Decimal::ZERO {
            (allocated - remaining) * Decimal::ONE_HUNDRED / allocated
        } else if balance.totals.granted > Decimal::ZERO && remaining.is_zero() {
            // Every lot was emptied before this wallet was first looked at.
            Decimal::ONE_HUNDRED
        } else {
            Decimal::ZERO
        };
        let facts = json!({
            "balance": balance.balance.normalize().to_string(),
            "available": balance.available.normalize().to_string(),
            "allocated": allocated.normalize().to_string(),
            "consumed_percent": consumed_percent.round_dp(2).normalize().to_string(),
        });
        let mut due = Vec::new();
        let mut fired = self.fired.lock();
        for rule in rules {
            let (holds, period) = match (&rule.condition, signal) {
                (Condition::ConsumedShare { percent }, _) => (consumed_percent >= *percent, period.clone()),
                (Condition::BalanceBelow { amount }, _) => (balance.balance < *amount, period.clone()),
                (Condition::LiteWalletEmpty, Signal::Empty(WalletId::Lite(_))) => (true, period.clone()),
                // A per-request cap has no period of its own: it alerts once
                // per (UTC) day, not once per process.
                (Condition::SpendLimitReached, Signal::LimitReached(_, resets)) => {
                    (true, resets.map_or_else(|| format!("request:{}", now.date_naive()), |r| r.to_rfc3339()))
                }
                // Every overrun is its own event.
                (Condition::UsageOverHold, Signal::OverHold(_, request)) => {
                    (true, format!("over_hold:{request}"))
                }
                _ => (false, String::new()),
            };
            if holds && first_time(&mut fired, rule.id, &period) {
                due.push((rule, period, facts.clone()));
            }
        }
        due
    }

    /// The wallet's allocation: its live lots plus the lots seen live before
    /// and emptied since, until they expire.
    fn allocated(&self, wallet: WalletId, live: &[Lot], now: DateTime<Utc>) -> Decimal {
        let mut allocations = self.allocations.lock();
        let seen = allocations.entry(wallet).or_default();
        seen.retain(|lot| lot.expires_at > now && !live.iter().any(|l| l.id == lot.id));
        seen.extend(live.iter().cloned());
        seen.iter().map(|lot| lot.granted).sum()
    }

    /// Delivers a firing: on a single node at once; in a cluster only if
    /// this replica is the first to claim it in the shared books, which
    /// keep its event from the claim on (see [`Alerts::resume_deliveries`]).
    async fn fire(&self, rule: Rule, period: String, facts: Value) {
        let event = json!({
            "rule": rule.id, "org": rule.org, "wallet": rule.wallet,
            "condition": rule.condition, "period": period, "facts": facts,
        });
        let (id, event) = match &self.keeping {
            Keeping::File(_) => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let mut event = event;
                event["delivery"] = json!(id);
                self.record(Delivery {
                    id,
                    rule: rule.id,
                    org: rule.org,
                    event: event.clone(),
                    status: "pending",
                    attempts: 0,
                    last_error: None,
                    created_at: Utc::now(),
                });
                (id, event)
            }
            Keeping::Cluster { books, replica } => {
                match cluster::claim(books, &rule, &period, replica, &event).await {
                    Ok(Some(claimed)) => claimed,
                    Ok(None) => return,
                    Err(error) => {
                        // Not marked fired here, so the next signal tries again.
                        forget_fired(&mut self.fired.lock(), rule.id, &period);
                        tracing::warn!(rule = rule.id, %error, "cannot record an alert firing; trying at the next change");
                        return;
                    }
                }
            }
        };
        self.send(&rule, id, &event.to_string()).await;
    }

    /// Posts delivery `id`'s `body` to the rule's webhook, retrying with
    /// backoff, and records each attempt.
    async fn send(&self, rule: &Rule, id: u64, body: &str) {
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=MAX_ATTEMPTS {
            let result = self.post(rule, body).await;
            let done = result.is_ok();
            let status = match (&result, attempt == MAX_ATTEMPTS) {
                (Ok(()), _) => "delivered",
                (Err(_), true) => "failed",
                (Err(_), false) => "pending",
            };
            self.update(id, status, attempt, result.err()).await;
            tracing::info!(rule = rule.id, delivery = id, attempt, status, "alert webhook");
            if done {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }

    async fn post(&self, rule: &Rule, body: &str) -> Result<(), String> {
        // Rules saved before a policy change are held to the policy in force;
        // the resolver checks every address a name resolves to.
        self.policy.check_url(&rule.webhook_url)?;
        let timestamp = Utc::now().timestamp().to_string();
        let signature = sign(&rule.secret, &timestamp, body);
        let request = Request::post(&rule.webhook_url)
            .header("content-type", "application/json")
            .header("x-creditgate-timestamp", &timestamp)
            .header("x-creditgate-signature", format!("v1={signature}"))
            .body(Full::new(Bytes::from(body.to_owned())))
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(WEBHOOK_TIMEOUT, self.http.request(request)).await {
            Err(_) => Err("timed out".into()),
            Ok(Err(e)) => Err(with_causes(&e)),
            Ok(Ok(response)) if response.status().is_success() => Ok(()),
            Ok(Ok(response)) => Err(format!("answered {}", response.status())),
        }
    }

    fn record(&self, delivery: Delivery) {
        let mut deliveries = self.deliveries.lock();
        if deliveries.len() == MAX_DELIVERIES {
            deliveries.pop_front();
        }
        deliveries.push_back(delivery);
    }

    async fn update(&self, id: u64, status: &'static str, attempts: u32, error: Option<String>) {
        if let Keeping::Cluster { books, .. } = &self.keeping {
            cluster::update(books, id, status, attempts, error.as_deref()).await;
            return;
        }
        if let Some(d) = self.deliveries.lock().iter_mut().rev().find(|d| d.id == id) {
            d.status = status;
            d.attempts = attempts;
            d.last_error = error;
        }
    }
}

impl Signal {
    /// The wallet it is about.
    pub fn wallet(self) -> WalletId {
        match self {
            Signal::Changed(w) | Signal::Empty(w) | Signal::LimitReached(w, _) | Signal::OverHold(w, _) => w,
        }
    }
}

/// The rules saved in `path` (none if there is no file).
fn read_rules_file(path: &std::path::Path) -> Result<Vec<Rule>, AlertError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AlertError::Load {
            path: path.display().to_string(),
            reason: format!(
                "unreadable ({e}); the gateway writes it whole, so it was damaged from outside: \
                 restore it from a backup, or move it away to start without alert rules"
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        // Started without them, the next rule added would replace every
        // organization's rules with that one.
        Err(e) => Err(AlertError::Load {
            path: path.display().to_string(),
            reason: format!("cannot be read ({e}); fix its owner and mode (the gateway's user, 0600)"),
        }),
    }
}

/// Replaces the rules file whole and durably: a crash leaves the old file
/// or the new one, never a torn one (which would stop start-up).
fn save_rules_file(path: &std::path::Path, rules: &[Rule]) -> Result<(), AlertError> {
    let error =
        |e: std::io::Error| AlertError::Save { path: path.display().to_string(), reason: e.to_string() };
    let bytes = serde_json::to_vec_pretty(rules).unwrap_or_default();
    write_durably(path, &bytes).map_err(error)
}

/// Writes `bytes` to `path` through a synced temporary file renamed into
/// place, then syncs the directory so the rename itself survives a crash.
fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let temp = path.with_extension("json.tmp");
    // The rules hold each organization's webhook secrets: the owner's alone.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&temp)?;
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)?;
    let directory = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::File::open(directory)?.sync_all()
}

/// Marks `period` fired for `rule`; false if it had fired already. Only the
/// latest few periods are kept per rule, so the set never grows.
fn first_time(fired: &mut HashMap<u64, VecDeque<String>>, rule: u64, period: &str) -> bool {
    let periods = fired.entry(rule).or_default();
    if periods.iter().any(|p| p == period) {
        return false;
    }
    if periods.len() == FIRED_PERIODS_PER_RULE {
        periods.pop_front();
    }
    periods.push_back(period.to_owned());
    true
}

/// Unmarks `period` for `rule` (its firing could not be recorded).
fn forget_fired(fired: &mut HashMap<u64, VecDeque<String>>, rule: u64, period: &str) {
    if let Some(periods) = fired.get_mut(&rule) {
        periods.retain(|p| p != period);
    }
}

/// An error with its causes ("client error (Connect): ..."), for the
/// operator's view of a failed delivery.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// The webhook client: HTTP/1 over TCP or TLS, connecting only to the
/// addresses the policy allows.
fn webhook_client(
    policy: Arc<DestinationPolicy>,
) -> Client<HttpsConnector<HttpConnector<GuardedResolver>>, Full<Bytes>> {
    let mut tcp = HttpConnector::new_with_resolver(GuardedResolver { policy });
    tcp.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Hex HMAC-SHA256 of `"{timestamp}.{body}"` under `secret`.
pub fn sign(secret: &str, timestamp: &str, body: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return String::new() };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn open_loopback() -> DestinationPolicy {
        DestinationPolicy { allow: vec!["127.0.0.0/8".parse().unwrap()] }
    }

    #[test]
    fn a_rules_file_that_cannot_be_read_stops_the_load_and_a_missing_one_is_no_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.json");
        assert!(Alerts::load(path.clone(), open_loopback()).is_ok(), "no file: no rules");
        // A directory in its place cannot be read, as a file of another owner cannot.
        std::fs::create_dir(&path).unwrap();
        match Alerts::load(path, open_loopback()) {
            Err(AlertError::Load { reason, .. }) => assert!(reason.contains("cannot be read"), "{reason}"),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("loaded without the rules it could not read"),
        }
    }

    /// A pool with a $10 platform lot, a Pro user's key that spends from it,
    /// and alerts with one rule of `condition` on it.
    struct Watched {
        alerts: Arc<Alerts>,
        ledger: Ledger,
        pool: WalletId,
        key: crate::ledger::ids::KeyId,
        _dir: tempfile::TempDir,
    }

    async fn watched_pool(condition: Condition) -> Watched {
        use crate::ledger::testkit::{at, key, ledger, org, term, user};
        let (ledger, _journal) = ledger();
        let now = at("2026-03-01T00:00:00Z");
        let term = term("2026-01-01", 1, Decimal::TEN, 0, Decimal::ZERO);
        let org = org(&ledger, chrono_tz::UTC, Some(term), now);
        let pro = user(&ledger, org, crate::ledger::entity::Plan::Pro, Decimal::ZERO, now);
        let key = key(&ledger, org, crate::ledger::ids::Owner::User(pro), Default::default(), now);
        let dir = tempfile::tempdir().unwrap();
        let alerts = Alerts::load(dir.path().join("alerts.json"), open_loopback()).unwrap();
        let pool = WalletId::Pool(org);
        alerts
            .add_rule(org, pool, condition, "http://127.0.0.1:9/hook".into(), "a-long-enough-secret".into())
            .await
            .unwrap();
        Watched { alerts, ledger, pool, key, _dir: dir }
    }

    impl Watched {
        /// Holds and settles `cost` from the pool.
        fn spend(&self, cost: Decimal, now: DateTime<Utc>) {
            let context = crate::ledger::SpendContext { key: self.key, end_user: None };
            let hold =
                self.ledger.hold(self.pool, crate::ledger::testkit::request(), cost, context, now).unwrap();
            hold.settle(cost, crate::ledger::testkit::details(), now).unwrap();
        }

        fn due(&self, signal: Signal, now: DateTime<Utc>) -> Vec<(Rule, String, Value)> {
            self.alerts.due(&self.ledger, signal, now)
        }
    }

    #[tokio::test]
    async fn consumed_share_fires_at_100_percent_when_the_last_lot_is_emptied() {
        // Proves an emptied allocation counts as consumed, not as gone.
        let watched = watched_pool(Condition::ConsumedShare { percent: Decimal::ONE_HUNDRED }).await;
        let (now, pool) = (crate::ledger::testkit::at("2026-03-02T00:00:00Z"), watched.pool);
        watched.spend(Decimal::from(4), now);
        assert!(watched.due(Signal::Changed(pool), now).is_empty(), "40 % is not 100 %");
        watched.spend(Decimal::from(6), now);
        let due = watched.due(Signal::Changed(pool), now);
        assert_eq!(due.len(), 1, "all of it consumed");
        assert_eq!(due[0].2["consumed_percent"], "100");
        assert!(watched.due(Signal::Changed(pool), now).is_empty(), "once");
    }

    #[tokio::test]
    async fn consumed_share_counts_a_lot_emptied_before_it_was_ever_looked_at() {
        // Proves the fallback: the first look finds every lot gone.
        let watched = watched_pool(Condition::ConsumedShare { percent: Decimal::ONE_HUNDRED }).await;
        let now = crate::ledger::testkit::at("2026-03-02T00:00:00Z");
        watched.spend(Decimal::TEN, now);
        assert_eq!(watched.due(Signal::Changed(watched.pool), now).len(), 1);
    }

    #[tokio::test]
    async fn a_per_request_limit_alerts_again_on_a_later_day_and_the_fired_set_stays_bounded() {
        // Proves per-request limit alerts are not once per process, and memory does not grow.
        let watched = watched_pool(Condition::SpendLimitReached).await;
        let day = |d: i64| crate::ledger::testkit::at("2026-03-02T12:00:00Z") + chrono::Duration::days(d);
        let signal = Signal::LimitReached(watched.pool, None);
        assert_eq!(watched.due(signal, day(0)).len(), 1);
        assert!(watched.due(signal, day(0)).is_empty(), "once that day");
        assert_eq!(watched.due(signal, day(1)).len(), 1, "again the next day");
        for d in 2..200 {
            assert_eq!(watched.due(signal, day(d)).len(), 1);
        }
        let remembered: usize = watched.alerts.fired.lock().values().map(VecDeque::len).sum();
        assert!(remembered <= FIRED_PERIODS_PER_RULE, "{remembered} periods remembered for one rule");
    }

    #[tokio::test]
    async fn rules_are_saved_whole_and_a_rule_that_could_not_be_saved_is_not_in_force() {
        // Proves the save leaves no temporary file and memory never runs ahead of the file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.json");
        let alerts = Alerts::load(path.clone(), open_loopback()).unwrap();
        async fn add(alerts: &Alerts) -> Result<Rule, AlertError> {
            let wallet = WalletId::Pool(OrgId(1));
            let (url, secret) = ("http://127.0.0.1:9/h".into(), "a-long-enough-secret".into());
            alerts.add_rule(OrgId(1), wallet, Condition::LiteWalletEmpty, url, secret).await
        }
        add(&alerts).await.unwrap();
        assert!(!dir.path().join("alerts.json.tmp").exists(), "the temporary file was renamed");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "the webhook secrets are the owner's alone");
        }
        assert_eq!(
            Alerts::load(path.clone(), open_loopback()).unwrap().rules_of(OrgId(1)).await.unwrap().len(),
            1
        );
        // A directory where the file should be: the save fails, the rule is not kept.
        let blocked = Alerts::load(dir.path().join("blocked/alerts.json"), open_loopback()).unwrap();
        assert!(matches!(add(&blocked).await, Err(AlertError::Save { .. })));
        assert!(
            blocked.rules_of(OrgId(1)).await.unwrap().is_empty(),
            "a rule that is not saved is not in force"
        );
    }

    #[tokio::test]
    async fn an_organization_keeps_a_bounded_number_of_rules() {
        // Proves an org token cannot add webhook senders without end.
        let dir = tempfile::tempdir().unwrap();
        let alerts = Alerts::load(dir.path().join("alerts.json"), open_loopback()).unwrap();
        let add = |org: u64| {
            let condition = Condition::LiteWalletEmpty;
            let wallet = WalletId::Pool(OrgId(org));
            alerts.add_rule(
                OrgId(org),
                wallet,
                condition,
                "http://127.0.0.1:9/hook".into(),
                "a-long-enough-secret".into(),
            )
        };
        for _ in 0..MAX_RULES_PER_ORG {
            add(1).await.unwrap();
        }
        assert!(matches!(add(1).await, Err(AlertError::TooMany { .. })), "one more is refused");
        // Nor make each rule as large as a request body: a settle copies them.
        let wallet = WalletId::Pool(OrgId(3));
        let huge = "s".repeat(MAX_SECRET_CHARS + 1);
        let refused = alerts.add_rule(
            OrgId(3),
            wallet,
            Condition::LiteWalletEmpty,
            "http://127.0.0.1:9/h".into(),
            huge,
        );
        assert!(matches!(refused.await, Err(AlertError::Invalid { field: "secret", .. })));
        let long_url = format!("http://127.0.0.1:9/{}", "p".repeat(MAX_WEBHOOK_URL_BYTES));
        let secret = "a-long-enough-secret".to_owned();
        let refused = alerts.add_rule(OrgId(3), wallet, Condition::LiteWalletEmpty, long_url, secret);
        assert!(matches!(refused.await, Err(AlertError::Invalid { field: "webhook_url", .. })));
        assert!(add(2).await.is_ok(), "the cap is per organization");
        assert_eq!(alerts.rules_of(OrgId(1)).await.unwrap().len(), MAX_RULES_PER_ORG);
    }

    #[tokio::test]
    async fn only_signals_about_watched_wallets_are_queued() {
        let dir = tempfile::tempdir().unwrap();
        let alerts = Alerts::load(dir.path().join("alerts.json"), open_loopback()).unwrap();
        let (watched, other) = (WalletId::Pool(OrgId(1)), WalletId::Pool(OrgId(2)));
        for _ in 0..3 {
            alerts.notify(Signal::Changed(watched));
        }
        assert_eq!(alerts.queue.capacity(), QUEUE_CAPACITY, "no rule: nothing queued");
        let condition = Condition::BalanceBelow { amount: Decimal::ONE };
        alerts
            .add_rule(
                OrgId(1),
                watched,
                condition,
                "http://127.0.0.1:9/hook".into(),
                "a-long-enough-secret".into(),
            )
            .await
            .unwrap();
        alerts.notify(Signal::Changed(other));
        alerts.notify(Signal::Empty(watched));
        assert_eq!(alerts.queue.capacity(), QUEUE_CAPACITY - 1, "only the watched wallet's signal");
        // The rule survives a reload, and so does the watch.
        let reloaded = Alerts::load(dir.path().join("alerts.json"), open_loopback()).unwrap();
        reloaded.notify(Signal::Changed(watched));
        assert_eq!(reloaded.queue.capacity(), QUEUE_CAPACITY - 1);
    }
}
