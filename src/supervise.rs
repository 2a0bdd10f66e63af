//! The background work a gateway cannot serve well without (the price
//! watcher, alert rounds, a replica's shipping, lease and treasury rounds),
//! watched. A task that panics stops the gateway gracefully (requests
//! drain, the outbox ships, leases go back, the store flushes) and the
//! process exits with EX_TEMPFAIL for its supervisor to start it again:
//! serving on without it would leave debits unshipped, leases unrenewed or
//! prices never reloaded, with one log line to show for it.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::telemetry::metrics::{Metrics, TaskLabels};

/// Spawns and watches background tasks; cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    shutdown: CancellationToken,
    metrics: Option<Arc<Metrics>>,
    /// The first task that failed, and how.
    failed: OnceLock<String>,
}

impl Supervisor {
    /// Failures cancel `shutdown` and are counted in `metrics`'
    /// `background_panics`, when given.
    pub fn new(shutdown: CancellationToken, metrics: Option<Arc<Metrics>>) -> Supervisor {
        Supervisor { inner: Arc::new(Inner { shutdown, metrics, failed: OnceLock::new() }) }
    }

    /// Runs `task` as `name`. The handle ends when the task does; a panic
    /// is reported, not passed on.
    pub fn spawn<F>(&self, name: &'static str, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let task = tokio::spawn(async move {
            if test_panic_asked(name) {
                panic!("CREDITGATE_TEST_PANIC_TASK: the task {name} panics (tests only)");
            }
            task.await;
        });
        let supervisor = self.clone();
        tokio::spawn(async move {
            match task.await {
                Ok(()) => {}
                Err(error) if error.is_panic() => supervisor.panicked(name),
                // Only a runtime shutting down cancels these tasks.
                Err(_) => {}
            }
        })
    }

    /// Why the gateway stopped, if a watched task failed.
    pub fn failure(&self) -> Option<String> {
        self.inner.failed.get().cloned()
    }

    fn panicked(&self, name: &'static str) {
        if let Some(metrics) = &self.inner.metrics {
            metrics.background_panics.get_or_create(&TaskLabels { task: name }).inc();
        }
        let reason = format!("the background task {name} panicked");
        tracing::error!(task = name, "{reason}: stopping, to be started again");
        let _first = self.inner.failed.set(reason);
        self.inner.shutdown.cancel();
    }
}

/// Test-only (debug builds, the test suite's): `CREDITGATE_TEST_PANIC_TASK`
/// names a task that panics as it starts, so a test can watch what the
/// gateway does then.
fn test_panic_asked(name: &str) -> bool {
    cfg!(debug_assertions) && std::env::var("CREDITGATE_TEST_PANIC_TASK").is_ok_and(|asked| asked == name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_stops_the_gateway_and_is_counted() {
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(Metrics::default());
        let supervisor = Supervisor::new(shutdown.clone(), Some(metrics.clone()));
        supervisor.spawn("ends", async {}).await.unwrap();
        assert!(!shutdown.is_cancelled(), "a task that ends is no failure");
        assert_eq!(supervisor.failure(), None);
        supervisor.spawn("breaks", async { panic!("broken") }).await.unwrap();
        assert!(shutdown.is_cancelled());
        assert_eq!(supervisor.failure().as_deref(), Some("the background task breaks panicked"));
        assert_eq!(metrics.background_panics.get_or_create(&TaskLabels { task: "breaks" }).get(), 1);
        // The first failure is the reason given.
        supervisor.spawn("later", async { panic!("also broken") }).await.unwrap();
        assert_eq!(supervisor.failure().as_deref(), Some("the background task breaks panicked"));
    }
}
