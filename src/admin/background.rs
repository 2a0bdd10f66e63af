//! Report work off the request path: store scans run on their own threads
//! under the idle scheduling policy, so neither a runtime thread the proxy
//! shares nor a core the proxy needs is taken by a report. On a busy machine
//! a report waits; a proxied call does not.
//!
//! Why SCHED_IDLE and not nice 19: measured with `creditgate-reports`, nice
//! 19 changed nothing (a waking proxy thread still waited up to a
//! scheduler slice behind a running report); an idle-policy thread is
//! preempted as soon as any normal thread wants its core.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

use super::error::AdminError;

/// Reports scanning at once; more wait their turn rather than each taking
/// a thread (and its share of the store's page cache) of their own.
static REPORT_SLOTS: Semaphore = Semaphore::const_new(4);

/// Each organization's reports run one at a time, so one tenant's token
/// holds at most one of the slots: four slow reports of one organization
/// would otherwise keep every other organization's reports waiting.
static ORG_TURNS: LazyLock<parking_lot::Mutex<HashMap<u64, Arc<Semaphore>>>> =
    LazyLock::new(Default::default);

/// `org`'s turn and a slot, for as long as its report's work runs: a
/// caller that stops waiting (a reset stream, a client gone) leaves the
/// work running, so the permits go with the work, not with the caller.
async fn permits(org: u64) -> Result<(OwnedSemaphorePermit, SemaphorePermit<'static>), AdminError> {
    let turn = org_turn(org).await?;
    let slot = REPORT_SLOTS
        .acquire()
        .await
        .map_err(|error| AdminError::Store(format!("the report failed: {error}")))?;
    Ok((turn, slot))
}

/// Waits for `org`'s turn to run a report.
async fn org_turn(org: u64) -> Result<OwnedSemaphorePermit, AdminError> {
    let turn = {
        let mut turns = ORG_TURNS.lock();
        // Organizations with no report running or waiting are forgotten.
        turns.retain(|_, turn| Arc::strong_count(turn) > 1);
        turns.entry(org).or_insert_with(|| Arc::new(Semaphore::new(1))).clone()
    };
    turn.acquire_owned().await.map_err(|error| AdminError::Store(format!("the report failed: {error}")))
}

/// `SCHED_IDLE` in /proc's policy field.
#[cfg(test)]
const SCHED_IDLE: i64 = 5;

/// Runs a report of `org`'s on a low-priority thread and waits for it.
pub async fn report<T: Send + 'static>(
    org: u64,
    scan: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AdminError> {
    let permits = permits(org).await?;
    let (done, answer) = tokio::sync::oneshot::channel();
    spawn("report", move || {
        // Held until the scan ends, not until its caller stops waiting.
        let _permits = permits;
        let _ = done.send(scan());
    })?;
    answer.await.map_err(|_| AdminError::Store("the report failed: its thread stopped".into()))
}

/// Runs a report whose work is done by the cluster's database (the replica
/// only waits for rows and folds a few of them) on a blocking thread at
/// normal priority, within the same slots. Under the idle policy such a
/// report would wait for an idle core after every answer from the
/// database: on a busy machine, for as long as the machine stays busy.
pub async fn database_report<T: Send + 'static>(
    org: u64,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AdminError> {
    let permits = permits(org).await?;
    tokio::task::spawn_blocking(move || {
        let _permits = permits;
        work()
    })
    .await
    .map_err(|error| AdminError::Store(format!("the report failed: {error}")))
}

/// Runs a listing of `org`'s (its users, applications or keys) off the
/// runtime, in the reports' slots and the organization's turn, at normal
/// priority: short work the dashboard waits on at every page, which under
/// the idle policy would wait for as long as the machine stays busy.
pub async fn listing<T: Send + 'static>(
    org: u64,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AdminError> {
    database_report(org, work).await
}

/// Starts `work` on a new thread named `name` under the idle policy.
pub fn spawn(name: &str, work: impl FnOnce() + Send + 'static) -> Result<(), AdminError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            lower_priority();
            work();
        })
        .map(drop)
        .map_err(|error| AdminError::Store(format!("cannot start a report thread: {error}")))
}

/// Puts this thread under the idle policy (see [`crate::server::idle_priority`]).
fn lower_priority() {
    crate::server::idle_priority("a report thread");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// This thread's scheduling policy, from /proc (field 41 of its stat line).
    fn own_policy() -> i64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        after_name.split_whitespace().nth(38).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn a_report_runs_under_the_idle_policy_and_the_caller_keeps_its_own() {
        // Proves report scans cannot take CPU from the proxy's threads: the
        // scan's thread runs under SCHED_IDLE, the calling thread is untouched.
        let before = own_policy();
        assert_ne!(before, SCHED_IDLE, "the test starts on a normal thread");
        assert_eq!(report(1, own_policy).await.unwrap(), SCHED_IDLE, "the report thread is idle-policy");
        assert_eq!(own_policy(), before, "the caller's policy is unchanged");
    }

    #[tokio::test]
    async fn a_database_report_runs_at_normal_priority() {
        // Proves a cluster report, which only waits on the database, is not
        // starved by a busy machine the way an idle-policy thread is.
        assert_ne!(database_report(1, own_policy).await.unwrap(), SCHED_IDLE);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_organization_s_reports_never_keep_another_s_waiting() {
        // Four slow reports of one organization took all four slots before: every other
        // organization's report waited for them.
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut slow = Vec::new();
        for _ in 0..4 {
            let open = open.clone();
            slow.push(tokio::spawn(database_report(41, move || {
                while !open.load(std::sync::atomic::Ordering::Acquire) {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            })));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let other = tokio::time::timeout(std::time::Duration::from_secs(2), database_report(42, || 7)).await;
        open.store(true, std::sync::atomic::Ordering::Release);
        assert_eq!(other.expect("another organization's report waited").unwrap(), 7);
        for report in slow {
            report.await.unwrap().unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_report_keeps_its_turn_while_its_work_runs_though_its_caller_left() {
        // The permits went with the caller: a tenant that reset its stream right after asking
        // for a year of usage freed its turn and slot while the scan ran on, and could start
        // any number of scans that way.
        /// Lets the work end however the test ends (a failed assertion
        /// must not leave it spinning under the runtime's shutdown).
        struct Release(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Release {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Release);
            }
        }
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let release = Release(open.clone());
        let running = open.clone();
        let left = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            database_report(43, move || {
                while !running.load(std::sync::atomic::Ordering::Acquire) {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }),
        )
        .await;
        assert!(left.is_err(), "the caller stopped waiting");
        let next =
            tokio::time::timeout(std::time::Duration::from_millis(300), database_report(43, || 1)).await;
        assert!(next.is_err(), "the organization's next report ran beside the first one's work");
        drop(release);
        assert_eq!(database_report(43, || 2).await.unwrap(), 2);
    }
}
