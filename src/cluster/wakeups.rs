//! Wake-ups from the database instead of polling it.
//!
//! A commit that appends to the log notifies channel `cg_log`, and one that
//! ships debits notifies `cg_debits`, and a treasurer stepping down
//! notifies `cg_treasury` (migration 7's triggers). A replica
//! keeps one connection of its own listening on both: a follower reads the
//! log when told there is more, and the treasurer posts shipped debits when
//! told there are some. An idle cluster then sends the database almost
//! nothing, and a busy one one read per append instead of one per poll.
//!
//! A replica whose hold finds the credit it needs leased to others
//! notifies `cg_wanted` with its name and the wallet ([`super::Books::balance_asking_if_it_covers`]):
//! the others give back the leases on that wallet they are not using, so
//! near empty the last credit moves to where the traffic is in a round
//! trip instead of after a lease's idle time.
//!
//! Adding an alert rule notifies `cg_alerts` (migration 14): every replica
//! reloads its rules. A price reload asked of one replica notifies
//! `cg_prices`: every replica re-reads its own price file.
//!
//! A notification is a hint, never the only way to learn of a change: one
//! sent while the listening connection was down is lost. So whoever waits
//! also wakes on a timer, a slow one while the listener is connected and
//! the old fast poll while it is not (see [`Wakeups::fallback`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::Database;

/// The channels, as the triggers name them.
const LOG: &str = "cg_log";
const DEBITS: &str = "cg_debits";
const TREASURY: &str = "cg_treasury";
const WANTED: &str = "cg_wanted";
const ALERTS: &str = "cg_alerts";
const PRICES: &str = "cg_prices";
/// Wait before connecting again after the listener lost its connection.
const RECONNECT: Duration = Duration::from_secs(1);

/// What the listener heard, as permits: a notification that arrives while
/// nobody waits is kept for the next wait.
#[derive(Debug, Default)]
pub struct Wakeups {
    log: Notify,
    debits: Notify,
    treasury: Notify,
    /// Wallets other replicas asked for, as `(replica, wallet)`, not yet taken.
    wanted: parking_lot::Mutex<Vec<(String, String)>>,
    wanted_heard: Notify,
    alerts: Notify,
    prices: Notify,
    listening: AtomicBool,
}

/// The payload of a `cg_wanted` notification (wallet names carry no newline:
/// they are built from ids).
pub(super) fn wanted_payload(replica: &str, wallet: &str) -> String {
    format!("{replica}\n{wallet}")
}

impl Wakeups {
    /// Starts listening on `db` until `shutdown`, reconnecting when the
    /// connection is lost.
    pub fn start(db: Database, shutdown: CancellationToken) -> Arc<Wakeups> {
        let wakeups = Arc::new(Wakeups::default());
        tokio::spawn(wakeups.clone().listen(db, shutdown));
        wakeups
    }

    /// Whether notifications are being received now.
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// How long to wait for a notification before reading anyway: `slow`
    /// while listening, `poll` while not.
    pub fn fallback(&self, slow: Duration, poll: Duration) -> Duration {
        if self.listening() {
            slow
        } else {
            poll
        }
    }

    /// Returns when the log grew (or at once, if it grew since the last wait).
    pub async fn log_appended(&self) {
        self.log.notified().await;
    }

    /// Returns when debits were shipped (or at once, if they were since the
    /// last wait).
    pub async fn debits_shipped(&self) {
        self.debits.notified().await;
    }

    /// Returns when a treasurer stepped down (or at once, if one did since
    /// the last wait).
    pub async fn treasury_released(&self) {
        self.treasury.notified().await;
    }

    /// Returns when an alert rule was added (or at once, if one was since
    /// the last wait).
    pub async fn alert_rules_changed(&self) {
        self.alerts.notified().await;
    }

    /// Returns when some replica was asked to reload prices (or at once, if
    /// one was since the last wait).
    pub async fn price_reload_asked(&self) {
        self.prices.notified().await;
    }

    /// Returns the wallets other replicas than `me` asked for since the
    /// last call, waiting until there is one.
    pub async fn wanted(&self, me: &str) -> Vec<String> {
        loop {
            let heard = std::mem::take(&mut *self.wanted.lock());
            let mut wallets: Vec<String> =
                heard.into_iter().filter(|(replica, _)| replica != me).map(|(_, wallet)| wallet).collect();
            wallets.sort_unstable();
            wallets.dedup();
            if !wallets.is_empty() {
                return wallets;
            }
            self.wanted_heard.notified().await;
        }
    }

    fn heard_wanted(&self, payload: &str) {
        if let Some((replica, wallet)) = payload.split_once('\n') {
            self.wanted.lock().push((replica.to_owned(), wallet.to_owned()));
            self.wanted_heard.notify_one();
        }
    }

    async fn listen(self: Arc<Self>, db: Database, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            match db.connect().await {
                Ok((client, mut connection)) => {
                    let heard = self.clone();
                    // Drives the connection: replies to LISTEN, and notifications.
                    let mut driver = tokio::spawn(async move {
                        loop {
                            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                                Some(Ok(AsyncMessage::Notification(note))) => match note.channel() {
                                    LOG => heard.log.notify_one(),
                                    DEBITS => heard.debits.notify_one(),
                                    TREASURY => heard.treasury.notify_one(),
                                    WANTED => heard.heard_wanted(note.payload()),
                                    ALERTS => heard.alerts.notify_one(),
                                    PRICES => heard.prices.notify_one(),
                                    _ => {}
                                },
                                Some(Ok(_)) => {}
                                Some(Err(error)) => return Some(error),
                                None => return None,
                            }
                        }
                    });
                    match client
                        .batch_execute(&format!(
                            "LISTEN {LOG}; LISTEN {DEBITS}; LISTEN {TREASURY}; LISTEN {WANTED}; LISTEN {ALERTS}; LISTEN {PRICES}"
                        ))
                        .await
                    {
                        Ok(()) => {
                            self.listening.store(true, Ordering::Release);
                            // Anything appended before LISTEN took effect is read now.
                            self.log.notify_one();
                            self.debits.notify_one();
                            self.alerts.notify_one();
                            // A reload asked for while it was not listening.
                            self.prices.notify_one();
                            tokio::select! {
                                () = shutdown.cancelled() => driver.abort(),
                                ended = &mut driver => {
                                    let error = ended.ok().flatten().map(|e| e.to_string());
                                    tracing::warn!(error = error.as_deref().unwrap_or("closed"), "cluster listener lost its connection; polling until it is back");
                                }
                            }
                        }
                        Err(error) => {
                            driver.abort();
                            tracing::warn!(%error, "cluster listener cannot LISTEN; polling");
                        }
                    }
                    self.listening.store(false, Ordering::Release);
                }
                Err(error) => tracing::debug!(%error, "cluster listener cannot connect; polling"),
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(RECONNECT) => {}
            }
        }
    }
}
