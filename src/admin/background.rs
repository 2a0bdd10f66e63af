//! Report work off the request path: store scans run on their own threads
//! at the lowest CPU priority, so neither a runtime thread the proxy shares
//! nor a core the proxy needs is taken by a report. On a busy machine a
//! report waits; a proxied call does not.

use tokio::sync::Semaphore;

use super::error::AdminError;

/// Reports scanning at once; more wait their turn rather than each taking
/// a thread (and its share of the store's page cache) of their own.
static REPORT_SLOTS: Semaphore = Semaphore::const_new(4);

/// Nice value of report threads: the lowest priority Linux gives a normal
/// thread, so the scheduler runs them only on time the proxy leaves over.
const REPORT_NICE: i32 = 19;

/// Runs a report's store scan on a low-priority thread and waits for it.
pub async fn report<T: Send + 'static>(scan: impl FnOnce() -> T + Send + 'static) -> Result<T, AdminError> {
    let _slot = REPORT_SLOTS
        .acquire()
        .await
        .map_err(|error| AdminError::Store(format!("the report failed: {error}")))?;
    let (done, answer) = tokio::sync::oneshot::channel();
    spawn("report", move || {
        let _ = done.send(scan());
    })?;
    answer.await.map_err(|_| AdminError::Store("the report failed: its thread stopped".into()))
}

/// Starts `work` on a new thread named `name` at the lowest CPU priority.
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

/// Lowers this thread's priority (on Linux a thread id names one thread).
/// Failing to is harmless: the work still runs, at normal priority.
fn lower_priority() {
    let thread = rustix::thread::gettid();
    if let Err(error) = rustix::process::setpriority_process(Some(thread), REPORT_NICE) {
        tracing::debug!(%error, "a report thread keeps its normal priority");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// This thread's nice value, from /proc (field 19 of its stat line).
    fn own_nice() -> i64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        after_name.split_whitespace().nth(16).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn a_report_runs_at_the_lowest_priority_and_the_caller_keeps_its_own() {
        // Proves report scans cannot take CPU from the proxy's threads: the
        // scan's thread runs at nice 19, while the calling thread is untouched.
        let before = own_nice();
        let nice = report(own_nice).await.unwrap();
        assert_eq!(nice, i64::from(REPORT_NICE), "the report thread is at the lowest priority");
        assert_eq!(own_nice(), before, "the caller's priority is unchanged");
    }
}
