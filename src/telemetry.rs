//! Logging setup: `tracing` to stderr as text or JSON. `RUST_LOG`, when set,
//! overrides the config's level.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Install the global subscriber. Safe to call more than once (later calls
/// are ignored), which tests rely on.
pub fn init(log: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = without_statement_parameters(filter);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: log files and pipes get plain text.
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// `filter` with PostgreSQL's driver held at `info`, whatever level was
/// asked for: at `debug` it logs every statement's parameters, and those
/// carry secrets (an alert rule's signing secret, as written to the books).
fn without_statement_parameters(filter: EnvFilter) -> EnvFilter {
    match "tokio_postgres=info".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// Sends panics to the log as errors too (once per process), then to the
/// default hook. A panic in a spawned task is caught by tokio and would
/// otherwise show only as a bare line on stderr, outside the log an
/// operator watches.
pub fn log_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            tracing::error!(thread = thread.name().unwrap_or("unnamed"), panic = %info, "a thread or task panicked");
            default(info);
        }));
    });
}

/// The gateway's Prometheus metrics. Labels are bounded: route prefixes come
/// from the config, statuses and codes from fixed sets; never org, key or user
/// ids.
pub mod metrics {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
    use prometheus_client::registry::{Metric, Registry};
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// A label value shared with the request path (a route prefix, a model
    /// name) instead of copied for every request.
    #[derive(Clone, Debug, Hash, PartialEq, Eq)]
    pub struct SharedText(pub Arc<str>);

    impl EncodeLabelValue for SharedText {
        fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
            EncodeLabelValue::encode(&&*self.0, encoder)
        }
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct RequestLabels {
        pub route: SharedText,
        pub status: u16,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct ResultLabels {
        pub result: &'static str,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct ReasonLabels {
        pub reason: &'static str,
    }

    /// A priced model or tool name: bounded by the price table, since
    /// unpriced names are refused before anything is charged.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct ItemLabels {
        pub item: SharedText,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct TaskLabels {
        pub task: &'static str,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct VersionLabels {
        pub version: String,
    }

    /// A replica's own figures (cluster mode only): what its leases and
    /// outbox cost the shared database.
    #[derive(Clone)]
    pub struct ClusterMetrics {
        /// Time a lease draw took, whether a hold waited for it or it was
        /// drawn ahead of need.
        pub lease_draw_seconds: Histogram,
        /// From a settle to its debit being in the shared books.
        pub outbox_lag_seconds: Histogram,
        /// Read at scrape time: statements sent to the database, and holds
        /// granted from leases, since start (their ratio is the database
        /// cost per request).
        pub db_statements: Gauge,
        pub lease_holds: Gauge,
        /// Shipments of the outbox the database refused, or that were cut
        /// off waiting for it.
        pub shipment_failures: Counter,
        /// Read at scrape time: debits settled here and not yet in the
        /// shared books, and how long the oldest has waited.
        pub outbox_debits: Gauge,
        pub outbox_oldest_seconds: Gauge<f64, AtomicU64>,
        /// Read at scrape time: since a lease round last reached the database.
        pub database_unreached_seconds: Gauge<f64, AtomicU64>,
        /// Read at scrape time: the last shared-log record this replica's
        /// view applied, and whether it holds the treasury (1) or follows (0).
        pub log_applied: Gauge,
        pub treasurer: Gauge,
    }

    impl ClusterMetrics {
        fn register(registry: &mut Registry) -> ClusterMetrics {
            // 100 µs to ~20 s in steps of 25%, so a p99 read from the
            // buckets is within a quarter of the truth.
            let buckets = || exponential_buckets(0.000_1, 1.25, 56);
            let lease_draw_seconds = Histogram::new(buckets());
            registry.register(
                "lease_draw_seconds",
                "Time to draw a credit or limit lease from the shared books",
                lease_draw_seconds.clone(),
            );
            let outbox_lag_seconds = Histogram::new(buckets());
            registry.register(
                "outbox_lag_seconds",
                "Time from a settle to its debit being shipped to the shared books",
                outbox_lag_seconds.clone(),
            );
            ClusterMetrics {
                lease_draw_seconds,
                outbox_lag_seconds,
                db_statements: registered(
                    registry,
                    "db_statements",
                    "Statements sent to the cluster database since start",
                ),
                lease_holds: registered(
                    registry,
                    "lease_holds",
                    "Holds granted from leased credit since start",
                ),
                shipment_failures: registered(
                    registry,
                    "cluster_shipment_failures",
                    "Shipments of settled debits to the shared books that failed or were cut off waiting (each is retried)",
                ),
                outbox_debits: registered(
                    registry,
                    "cluster_outbox_debits",
                    "Debits settled on this replica and not yet in the shared books",
                ),
                outbox_oldest_seconds: registered(
                    registry,
                    "cluster_outbox_oldest_seconds",
                    "How long the oldest debit not yet in the shared books has waited (0 when none waits)",
                ),
                database_unreached_seconds: registered(
                    registry,
                    "cluster_database_unreached_seconds",
                    "Time since a lease round last reached the cluster database (/readyz fails past the lease TTL)",
                ),
                log_applied: registered(
                    registry,
                    "cluster_log_applied",
                    "Number of the last shared-log record this replica's view of the books applied as a follower (a treasurer makes the records after it)",
                ),
                treasurer: registered(
                    registry,
                    "cluster_treasurer",
                    "1 while this replica holds the treasury (posts debits, applies expiry, resets and grants), else 0",
                ),
            }
        }
    }

    /// A new metric, registered under `name` (after the registry's prefix).
    fn registered<M: Metric + Clone + Default>(registry: &mut Registry, name: &str, help: &str) -> M {
        let metric = M::default();
        registry.register(name, help, metric.clone());
        metric
    }

    pub struct Metrics {
        registry: Registry,
        /// Registered for a cluster replica only.
        pub cluster: Option<ClusterMetrics>,
        pub requests: Family<RequestLabels, Counter>,
        pub price_reloads: Family<ResultLabels, Counter>,
        pub price_version: Family<VersionLabels, Gauge>,
        pub price_as_of: Gauge,
        /// How held requests ended: debited from usage, debited at the hold
        /// or from an estimate (no usage reported, stream cut short),
        /// released (upstream failed), or failed to settle.
        pub settles: Family<ResultLabels, Counter>,
        /// 402 and 429 answers by their stable code.
        pub refusals: Family<ReasonLabels, Counter>,
        /// Credits debited, in nanodollars (integers: no float near money).
        pub charged_nanodollars: Family<ItemLabels, Counter>,
        /// Time spent in the ledger's hold and settle, in seconds.
        pub hold_seconds: Histogram,
        pub settle_seconds: Histogram,
        /// Read at scrape time: holds open now, and the store's flushes.
        pub open_holds: Gauge,
        pub store_flushes: Gauge,
        pub store_flush_micros: Gauge,
        /// Read at scrape time: records stored after the writer wrote past
        /// their number, and numbers it still waits for (readers of the
        /// durable records stop below the lowest; see `gap_patience_ms`).
        pub store_records_written_late: Gauge,
        pub store_sequence_gaps_open: Gauge,
        /// Read at scrape time: records the checkpoint historian took from
        /// the store's writer in memory, and those it had to read back from
        /// the store (a steady rise of the second costs CPU and page cache).
        pub history_handed_over: Gauge,
        pub history_read_back: Gauge,
        /// Read at scrape time: appends that found the store writer's queue
        /// full and waited (requests held up by the disk), and failed
        /// writes or flushes (each retried).
        pub store_appends_waited: Gauge,
        pub store_failures: Gauge,
        /// Read at scrape time: the record the newest checkpoint covers, and
        /// 1 while the historian's last attempt failed or it stopped.
        pub history_checkpoint_seq: Gauge,
        pub history_failing: Gauge,
        /// Read at scrape time: 1 while the price file on disk failed to
        /// load and an older table stays in force.
        pub price_reload_failing: Gauge,
        /// Read at scrape time: holds voided by their TTL since start (a
        /// request that never settled: its call is not billed).
        pub holds_voided: Gauge,
        /// Panics caught in background work, by task.
        pub background_panics: Family<TaskLabels, Counter>,
        /// Worker threads of the shared runtime: `[server] workers`, or one
        /// (admin and background work) under `thread-per-core`.
        pub runtime_workers: Gauge,
        /// Threads serving the proxy listener: the runtime's workers, or
        /// one runtime each under `scheduler = "thread-per-core"`.
        pub proxy_threads: Gauge,
    }

    impl Default for Metrics {
        fn default() -> Self {
            Metrics::new(false)
        }
    }

    /// Handles to one family's counters for a fixed set of label sets (one
    /// per slot), each found on first use and kept: a family's lookup hashes
    /// its labels and takes its lock every time, on every request.
    pub struct CachedCounters(Box<[std::sync::OnceLock<Counter>]>);

    impl CachedCounters {
        pub fn new(slots: usize) -> CachedCounters {
            CachedCounters((0..slots).map(|_| std::sync::OnceLock::new()).collect())
        }

        /// The counter of `slot`, made from `labels` in `family` the first
        /// time; `None` for a slot past the end.
        pub fn get<L>(
            &self,
            slot: usize,
            family: &Family<L, Counter>,
            labels: impl FnOnce() -> L,
        ) -> Option<&Counter>
        where
            L: Clone + std::hash::Hash + Eq,
        {
            let cell = self.0.get(slot)?;
            Some(cell.get_or_init(|| family.get_or_create(&labels()).clone()))
        }
    }

    impl Metrics {
        /// The gateway's metrics; with `cluster`, a replica's too.
        pub fn new(cluster: bool) -> Metrics {
            let mut registry = Registry::with_prefix("creditgate");
            let requests: Family<RequestLabels, Counter> =
                registered(&mut registry, "requests", "Requests answered, by route prefix and status");
            let price_reloads: Family<ResultLabels, Counter> =
                registered(&mut registry, "price_reloads", "Price table reloads, by result");
            let price_version: Family<VersionLabels, Gauge> =
                registered(&mut registry, "price_table_active", "1 for the price table version in force");
            let price_as_of: Gauge = registered(
                &mut registry,
                "price_table_as_of_seconds",
                "Unix time of the price table's as_of date (0 without one); its age is time() minus this",
            );
            let settles: Family<ResultLabels, Counter> =
                registered(&mut registry, "settles", "Held requests by how they settled");
            let refusals: Family<ReasonLabels, Counter> =
                registered(&mut registry, "refusals", "402 and 429 answers, by reason");
            let charged_nanodollars: Family<ItemLabels, Counter> = registered(
                &mut registry,
                "charged_nanodollars",
                "Credits debited, in 1e-9 dollars, by model or tool",
            );
            // 1 µs to ~8 s in powers of 2: a replica's hold may wait for a
            // lease draw (up to 5 s).
            let hold_seconds = Histogram::new(exponential_buckets(0.000_001, 2.0, 24));
            registry.register("hold_seconds", "Time to place a hold in the ledger", hold_seconds.clone());
            let settle_seconds = Histogram::new(exponential_buckets(0.000_001, 2.0, 12));
            registry.register(
                "settle_seconds",
                "Time to settle a hold in the ledger",
                settle_seconds.clone(),
            );
            let open_holds: Gauge =
                registered(&mut registry, "open_holds", "Holds open now, across all wallets");
            let store_flushes: Gauge =
                registered(&mut registry, "store_flushes", "Flushes (fsync) of the ledger store since start");
            let store_flush_micros: Gauge = registered(
                &mut registry,
                "store_flush_micros",
                "Time spent flushing the ledger store since start, in microseconds",
            );
            let store_records_written_late: Gauge = registered(
                &mut registry,
                "store_records_written_late",
                "Ledger records stored after the writer had written past their number (their thread stalled past gap_patience_ms) since start",
            );
            let store_sequence_gaps_open: Gauge = registered(
                &mut registry,
                "store_sequence_gaps_open",
                "Sequence numbers the ledger writer wrote past and still waits for; checkpoints and the entries feed stop below the lowest",
            );
            let history_handed_over: Gauge = registered(
                &mut registry,
                "history_records_handed_over",
                "Records the checkpoint historian took from the store's writer in memory since start",
            );
            let history_read_back: Gauge = registered(
                &mut registry,
                "history_records_read_back",
                "Records the checkpoint historian read back from the store since start (those before it started, and batches the hand-over dropped)",
            );
            let store_appends_waited: Gauge = registered(
                &mut registry,
                "store_appends_waited",
                "Ledger records whose append found the store writer's queue full and waited, since start",
            );
            let store_failures: Gauge = registered(
                &mut registry,
                "store_failures",
                "Failed writes or flushes of the ledger store since start (each retried; a store that keeps failing makes /readyz fail)",
            );
            let history_checkpoint_seq: Gauge = registered(
                &mut registry,
                "history_checkpoint_seq",
                "The ledger record the newest checkpoint covers (a restart replays the records after it)",
            );
            let history_failing: Gauge = registered(
                &mut registry,
                "history_failing",
                "1 while the checkpoint historian's last attempt failed or it stopped (checkpoints and pruning wait)",
            );
            let price_reload_failing: Gauge = registered(
                &mut registry,
                "price_reload_failing",
                "1 while the price file on disk failed to load and an older table stays in force",
            );
            let holds_voided: Gauge = registered(
                &mut registry,
                "holds_voided",
                "Holds voided by their TTL since start: requests that never settled, whose calls were not billed",
            );
            let background_panics: Family<TaskLabels, Counter> =
                registered(&mut registry, "background_panics", "Panics caught in background work, by task");
            let runtime_workers: Gauge = registered(
                &mut registry,
                "runtime_workers",
                "Worker threads of the shared async runtime ([server] workers; 1 under scheduler = \"thread-per-core\", see proxy_threads)",
            );
            let proxy_threads: Gauge = registered(
                &mut registry,
                "proxy_threads",
                "Threads serving the proxy listener (one runtime each under [server] scheduler = \"thread-per-core\")",
            );
            let cluster = cluster.then(|| ClusterMetrics::register(&mut registry));
            Metrics {
                registry,
                cluster,
                open_holds,
                store_flushes,
                store_flush_micros,
                store_records_written_late,
                store_sequence_gaps_open,
                history_handed_over,
                history_read_back,
                store_appends_waited,
                store_failures,
                history_checkpoint_seq,
                history_failing,
                price_reload_failing,
                holds_voided,
                background_panics,
                runtime_workers,
                proxy_threads,
                requests,
                price_reloads,
                price_version,
                price_as_of,
                settles,
                refusals,
                charged_nanodollars,
                hold_seconds,
                settle_seconds,
            }
        }

        /// Record which price table is in force (one series at a time).
        pub fn set_price_version(&self, version: &crate::pricing::PriceVersion) {
            self.price_version.clear();
            self.price_version.get_or_create(&VersionLabels { version: version.to_string() }).set(1);
            let as_of = version
                .as_of
                .and_then(|date| date.and_hms_opt(0, 0, 0))
                .map_or(0, |at| at.and_utc().timestamp());
            self.price_as_of.set(as_of);
        }

        /// The Prometheus text exposition of every metric.
        pub fn render(&self) -> String {
            let mut out = String::new();
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
            out
        }
    }
}
