//! The admin API suite (`admin_api/suite.rs`) in cluster mode: every stack
//! is a gateway started with a `[cluster]` section, in process, on a fresh
//! database of one PostgreSQL this test binary shares (`common::pg`), and
//! the only replica of its cluster (so its treasurer). The suite's bodies
//! are the single node's, unchanged: org isolation and every admin test
//! hold in cluster mode.
//!
//! Tests of the suite that cannot hold in cluster mode: none. One waits
//! where a single node answers at once: a proxied call's debit reaches the
//! balances once its replica shipped it and the treasurer posted it (tens of
//! milliseconds), so "the call was charged" is awaited, not read once.
//!
//! The suite runs on current-thread runtimes, where a thread blocked on the
//! cluster's books blocks everything; it found three gateway bugs, fixed
//! with it: admin changes waited for the shared log on a runtime thread;
//! the log's appender, on a runtime of its own, shared the pool, and a
//! connection it opened stalled others while it idled; and database reports
//! ran under the idle policy, starved on a busy machine.
#![allow(clippy::unwrap_used)]

#[path = "common/mod.rs"]
mod harness;

/// What the suite sees as `common`: the shared harness, with stacks
/// started as cluster replicas.
mod common {
    use std::sync::Arc;

    use creditgate::clock::{Clock, SystemClock};

    pub use super::harness::*;

    pub async fn start() -> Stack {
        cluster::start_replica_stack(|text| text, Arc::new(SystemClock)).await
    }

    pub async fn start_with_clock(clock: Arc<dyn Clock>) -> Stack {
        cluster::start_replica_stack(|text| text, clock).await
    }

    pub async fn start_edited(edit: impl FnOnce(String) -> String) -> Stack {
        cluster::start_replica_stack(edit, Arc::new(SystemClock)).await
    }
}

#[path = "admin_api/suite.rs"]
mod suite;
