//! Wiring: config -> state -> listeners -> shutdown.
//!
//! [`Gateway::start`] binds both listeners and returns once they accept
//! connections; [`Gateway::wait`] returns once a shutdown has drained them.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{Admin, AdminError, EntryReader, OrgAccess, Readiness, Rollups, UsageReader, UsageSource};
use crate::alerts::{Alerts, DestinationPolicy, Signal};
use crate::clock::{Clock, DatabaseClock, SystemClock};
use crate::cluster::journal::decode;
use crate::cluster::{ClusterNode, NodeOptions};
use crate::config::{ClusterConfig, GatewayConfig, Scheduler};
use crate::ledger::entry::LedgerEntry;
use crate::ledger::ids::OrgId;
use crate::ledger::journal::RecordBody;
use crate::ledger::{Ledger, LedgerConfig};
use crate::pricing::LivePrices;
use crate::proxy::Proxy;
use crate::server::per_core::{self, PerCore};
use crate::server::{self, Drained, ServeOptions};
use crate::store::history::Historian;
use crate::store::SledStore;
use crate::store::{open_ledger, GroupCommit, StoreConfig};
use crate::supervise::Supervisor;
use crate::telemetry::metrics::{Metrics, TaskLabels};

/// A running gateway: the proxy listener and the admin listener.
pub struct Gateway {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    readiness: Arc<Readiness>,
    prices: Option<Arc<LivePrices>>,
    ledger: Arc<Ledger>,
    /// The store writer; `None` when `[ledger] write_through = false`.
    writer: Option<StoreWriter>,
    shutdown: CancellationToken,
    /// Kept to wait for the settles its background work still owes.
    proxy: Arc<Proxy>,
    proxy_serving: ProxyServing,
    admin_task: JoinHandle<Drained>,
    /// Cluster mode: this replica's part in the shared books.
    cluster: Option<Arc<ClusterNode>>,
    /// Checkpoints and retention (single node with write-through).
    historian: Option<Arc<Historian>>,
    /// Watches the background tasks: a failed one stops the gateway.
    supervisor: Supervisor,
}

/// Who serves the proxy listener (`[server] scheduler`).
enum ProxyServing {
    /// A task on the shared work-stealing runtime.
    Shared(JoinHandle<Drained>),
    /// Threads with a runtime each.
    PerCore(PerCore),
}

impl Gateway {
    /// Open the data directory, bind the listeners and start serving. Stops
    /// serving when `shutdown` is cancelled.
    pub async fn start(config: GatewayConfig, shutdown: CancellationToken) -> anyhow::Result<Gateway> {
        Self::start_with_clock(config, Arc::new(SystemClock), shutdown).await
    }

    /// As [`Gateway::start`], with the clock every time-dependent rule reads.
    pub async fn start_with_clock(
        config: GatewayConfig,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Gateway> {
        let config = Arc::new(config);
        // A replica dates the shared books by a clock never ahead of the
        // database's. (Test-only, debug builds: `CREDITGATE_TEST_LOCAL_CLOCK`
        // leaves a replica on its own clock, so a test can reach the bounds
        // the shared books put on a clock that runs ahead.)
        let local_clock = cfg!(debug_assertions) && std::env::var_os("CREDITGATE_TEST_LOCAL_CLOCK").is_some();
        let database_clock =
            config.cluster.as_ref().filter(|_| !local_clock).map(|_| DatabaseClock::new(clock.clone()));
        let clock = match &database_clock {
            Some(database_clock) => database_clock.clone() as Arc<dyn Clock>,
            None => clock,
        };
        prepare_data_dir(&config)?;
        let metrics = Arc::new(Metrics::new(config.cluster.is_some()));
        let proxy_threads = match config.server.scheduler {
            Scheduler::WorkStealing => tokio::runtime::Handle::current().metrics().num_workers(),
            Scheduler::ThreadPerCore => config.server.proxy_threads(),
        };
        metrics.proxy_threads.set(i64::try_from(proxy_threads).unwrap_or(i64::MAX));
        let supervisor = Supervisor::new(shutdown.clone(), Some(metrics.clone()));
        let prices = load_prices(&config, &clock, &metrics, &shutdown, &supervisor)?;
        let proxy_listeners = match config.server.scheduler {
            Scheduler::WorkStealing => ProxyListeners::Shared(
                TcpListener::bind(config.server.listen)
                    .await
                    .with_context(|| format!("cannot listen on {} (proxy)", config.server.listen))?,
            ),
            Scheduler::ThreadPerCore => {
                let listeners = per_core::bind(config.server.listen, config.server.proxy_threads())
                    .with_context(|| format!("cannot listen on {} (proxy)", config.server.listen))?;
                ProxyListeners::PerCore(listeners)
            }
        };
        let admin_listener = TcpListener::bind(config.server.admin_listen)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", config.server.admin_listen))?;
        let proxy_addr = proxy_listeners.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let (ledger, writer, cluster, historian) = match &config.cluster {
            None => {
                let (ledger, writer, historian) = open_books(&config, &clock)?;
                (ledger, writer, None, historian)
            }
            Some(section) => {
                let node = join_cluster(
                    &config,
                    section,
                    admin_addr,
                    &metrics,
                    (clock.clone(), database_clock),
                    shutdown.clone(),
                    &supervisor,
                )
                .await?;
                (node.ledger().clone(), None, Some(node), None)
            }
        };
        let policy = DestinationPolicy { allow: config.admin.alert_webhook_allow.clone() };
        let rules_file = config.server.data_dir.join("alerts.json");
        let alerts = match &cluster {
            None => Alerts::load_with_clock(rules_file, policy, clock.clone())?,
            Some(node) => {
                cluster_alerts(node, rules_file, policy, clock.clone(), shutdown.clone(), &supervisor).await?
            }
        };
        if let (Some(node), Some(prices)) = (&cluster, &prices) {
            supervisor.spawn(
                "follow_cluster_prices",
                follow_cluster_prices(prices.clone(), node.clone(), clock.clone(), shutdown.clone()),
            );
        }
        supervisor.spawn("alerts", alerts.clone().run(ledger.clone(), clock.clone(), shutdown.clone()));
        // A cluster's treasurer brings the wallets up to date itself.
        let single_node = cluster.is_none();
        supervisor.spawn(
            "wallet_tick",
            keep_wallets_current(
                ledger.clone(),
                clock.clone(),
                metrics.clone(),
                shutdown.clone(),
                single_node,
            ),
        );
        let options = ServeOptions {
            name: "proxy",
            max_connections: config.server.max_connections,
            header_read_timeout: config.server.header_read_timeout,
            shutdown_grace: config.server.shutdown_grace,
            max_request_duration: Some(config.server.max_response_duration),
            client_stall_timeout: config.server.client_stall_timeout,
            http2_max_concurrent_streams: config.server.http2_max_concurrent_streams,
        };
        let mut proxy = Proxy::new(
            config.clone(),
            prices.clone(),
            ledger.clone(),
            clock.clone(),
            metrics.clone(),
            alerts.clone(),
            shutdown.clone(),
        );
        if let Some(node) = &cluster {
            proxy = proxy.with_leases(node.lease_book().clone());
        }
        let proxy = Arc::new(proxy);
        let serving = proxy.clone();
        let handler = move |req, peer| Proxy::handle(Arc::clone(&serving), req, peer);
        let proxy_serving = match proxy_listeners {
            ProxyListeners::Shared(listener) => ProxyServing::Shared(tokio::spawn(server::serve(
                listener,
                options.clone(),
                shutdown.clone(),
                handler,
            ))),
            ProxyListeners::PerCore(listeners) => ProxyServing::PerCore(
                per_core::start(listeners, options.clone(), shutdown.clone(), handler)
                    .context("cannot start the proxy threads")?,
            ),
        };

        let readiness = Arc::new(Readiness::default());
        if let Some(writer) = writer.clone() {
            readiness.watch_store(Box::new(move || writer.health().map_err(|error| error.to_string())));
        }
        if let Some(node) = cluster.clone() {
            readiness.watch_store(Box::new(move || node.health()));
        }
        let admin = Arc::new(Admin {
            readiness: readiness.clone(),
            prices: prices.clone(),
            metrics,
            operator_token: config.admin.operator_token.clone(),
            org_tokens: config
                .admin
                .org_tokens
                .iter()
                .map(|t| OrgAccess { org: OrgId(t.org), token: t.token.clone(), finance: t.finance })
                .collect(),
            clock,
            ledger: ledger.clone(),
            entries: match &cluster {
                Some(node) => log_entry_reader(node),
                None => entry_reader(writer.clone()),
            },
            store_stats: {
                let writer = writer.clone();
                Arc::new(move || writer.as_ref().map(|w| w.stats()).unwrap_or_default())
            },
            alerts,
            body_read_timeout: config.server.header_read_timeout,
            usage: match &cluster {
                Some(node) => UsageSource::Database(usage_reader(node)),
                None => UsageSource::Rollups(Arc::new(Rollups::new(config.admin.usage_rollup_max_rows))),
            },
            cluster: cluster.clone(),
            history: historian.clone(),
            org_writes: crate::rate_window::RequestWindows::new(std::time::Duration::from_secs(60)),
            org_writes_per_minute: config.admin.org_writes_per_minute,
            max_report_groups: config.admin.max_report_groups,
        });
        admin.build_rollups(shutdown.clone());
        let admin_options = ServeOptions { name: "admin", ..options };
        let admin_task = tokio::spawn(server::serve(
            admin_listener,
            admin_options,
            shutdown.clone(),
            move |req, _peer| admin.clone().handle(req),
        ));
        readiness.set(true);
        tracing::info!(%proxy_addr, %admin_addr, data_dir = %config.server.data_dir.display(), "creditgate is serving");
        Ok(Gateway {
            proxy_addr,
            admin_addr,
            readiness,
            prices,
            ledger,
            writer,
            shutdown,
            proxy,
            proxy_serving,
            admin_task,
            cluster,
            historian,
            supervisor,
        })
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The ledger (for seeding by the demo, the admin API and tests).
    pub fn ledger(&self) -> Arc<Ledger> {
        self.ledger.clone()
    }

    /// Ledger entries written to the store so far (appended within one flush
    /// window of being made), oldest first, after entry id `after`.
    pub fn ledger_entries(&self, after: u64, limit: usize) -> anyhow::Result<Vec<LedgerEntry>> {
        Ok(read_entries(self.writer.as_deref(), after, limit)?.0)
    }

    /// The live price table, when the config names a price file.
    pub fn prices(&self) -> Option<Arc<LivePrices>> {
        self.prices.clone()
    }

    /// Signal shutdown (same as cancelling the token given to `start`).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Wait for shutdown to be signalled and both listeners to drain.
    pub async fn wait(self) -> Drained {
        self.wait_stopped().await.drained
    }

    /// As [`Gateway::wait`], also saying whether the store's last flush
    /// succeeded (`Err` means records were left unwritten).
    pub async fn wait_stopped(self) -> Stopped {
        self.shutdown.cancelled().await;
        // The grace period counts from now, for the listeners and for the
        // work requests left behind alike.
        self.proxy.grace_ends();
        self.readiness.set(false);
        let (proxy, per_core) = match self.proxy_serving {
            ProxyServing::Shared(task) => (task.await.unwrap_or(Drained::TimedOut), None),
            ProxyServing::PerCore(mut threads) => (threads.drained().await, Some(threads)),
        };
        let admin = self.admin_task.await.unwrap_or(Drained::TimedOut);
        // The proxy threads' runtimes still run the read-on work this waits for.
        self.proxy.drain_background().await;
        if let Some(threads) = per_core {
            let _ = tokio::task::spawn_blocking(move || threads.release()).await;
        }
        if let Some(node) = &self.cluster {
            // Every request has settled: ship the outbox, give back leases.
            node.stop().await;
        }
        if let Some(historian) = &self.historian {
            // Before the writer stops: a checkpoint in progress finishes.
            historian.stop();
        }
        // Every request has settled: make the last settles durable.
        let store = match self.writer.as_ref().map(|writer| writer.shutdown()) {
            Some(Err(error)) => {
                tracing::error!(%error, "the ledger's last flush failed");
                Err(error.to_string())
            }
            _ => Ok(()),
        };
        let drained =
            if proxy == Drained::All && admin == Drained::All { Drained::All } else { Drained::TimedOut };
        tracing::info!(?drained, "creditgate stopped");
        let restart =
            self.cluster.as_ref().and_then(|node| node.must_restart()).or_else(|| self.supervisor.failure());
        Stopped { drained, store, restart }
    }
}

/// The proxy's bound listener(s), before serving starts.
enum ProxyListeners {
    Shared(TcpListener),
    PerCore(Vec<std::net::TcpListener>),
}

impl ProxyListeners {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            ProxyListeners::Shared(listener) => listener.local_addr(),
            ProxyListeners::PerCore(listeners) => {
                listeners.first().ok_or_else(|| std::io::Error::other("no proxy listener"))?.local_addr()
            }
        }
    }
}

/// How the gateway stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// Whether the listeners drained within the grace period.
    pub drained: Drained,
    /// Whether the store's last flush succeeded.
    pub store: Result<(), String>,
    /// Why the gateway stopped to be started again, if it did: a
    /// background task it needs failed, or (cluster mode) its ledger must
    /// be rebuilt from the shared log.
    pub restart: Option<String>,
}

/// Durable entries among the next `limit` records after `after`, with the
/// sequence number of the last record read (`None` at the end). Records also hold
/// entity changes, so a step may carry fewer than `limit` entries, or none.
fn read_entries(
    writer: Option<&GroupCommit<SledStore>>,
    after: u64,
    limit: usize,
) -> Result<(Vec<LedgerEntry>, Option<u64>), AdminError> {
    let Some(writer) = writer else {
        return Err(AdminError::Store(
            "this gateway runs with [ledger] write_through = false and keeps no ledger entries".into(),
        ));
    };
    let records = writer.read_durable_after(after, limit).map_err(|e| AdminError::Store(e.to_string()))?;
    let last = records.last().map(|r| r.seq);
    let entries = records
        .into_iter()
        .filter_map(|record| match record.body {
            RecordBody::Entry(entry) => Some(entry),
            _ => None,
        })
        .collect();
    Ok((entries, last))
}

fn entry_reader(writer: Option<StoreWriter>) -> EntryReader {
    Arc::new(move |after, limit| read_entries(writer.as_deref(), after, limit))
}

/// Cluster mode: ledger entries come from the shared log (the cursor is
/// the log's sequence number). Called on report threads, never on the
/// runtime's own.
fn log_entry_reader(node: &Arc<ClusterNode>) -> EntryReader {
    let books = node.books().clone();
    let runtime = tokio::runtime::Handle::current();
    Arc::new(move |after, limit| {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let records =
            runtime.block_on(books.tail(after, limit)).map_err(|e| AdminError::Store(e.to_string()))?;
        let last = records.last().and_then(|record| u64::try_from(record.gseq).ok());
        let mut entries = Vec::new();
        for record in &records {
            let decoded = decode(record.gseq, &record.body).map_err(|e| AdminError::Store(e.to_string()))?;
            if let RecordBody::Entry(entry) = decoded.body {
                entries.push(entry);
            }
        }
        Ok((entries, last))
    })
}

/// Cluster mode: usage reports are SQL aggregates on the shared books.
/// Called on report threads, never on the runtime's own.
fn usage_reader(node: &Arc<ClusterNode>) -> UsageReader {
    let books = node.books().clone();
    let runtime = tokio::runtime::Handle::current();
    Arc::new(move |query| runtime.block_on(books.usage(query)).map_err(|e| AdminError::Store(e.to_string())))
}

/// Joins the cluster named by `[cluster]`, as the replica this data
/// directory belongs to.
async fn join_cluster(
    config: &GatewayConfig,
    section: &ClusterConfig,
    admin_addr: SocketAddr,
    metrics: &Metrics,
    (clock, database_clock): (Arc<dyn Clock>, Option<Arc<DatabaseClock>>),
    shutdown: CancellationToken,
    supervisor: &Supervisor,
) -> anyhow::Result<Arc<ClusterNode>> {
    let data_dir = &config.server.data_dir;
    let history = &config.ledger.history;
    if history.retain_days.is_some() || history.export_dir.is_some() {
        tracing::warn!(
            "[ledger] retain_days and export_dir are not used in cluster mode: the shared log in \
             PostgreSQL is neither checkpointed nor pruned (README, \"Ledger history\")"
        );
    }
    let replica = match &section.replica {
        Some(name) => name.clone(),
        None => replica_name(data_dir)?,
    };
    if section.admin_url.is_none() && admin_addr.ip().is_unspecified() {
        tracing::warn!(%admin_addr, "set [cluster] admin_url: other replicas forward admin writes to it");
    } else if section.admin_url.is_none() && admin_addr.ip().is_loopback() {
        tracing::warn!(
            %admin_addr,
            "[cluster] admin_url is unset and the admin listener is loopback: replicas on other hosts \
             cannot forward admin writes to this one (fine when every replica runs on this host)"
        );
    }
    let options = NodeOptions {
        database_url: section.database_url.clone(),
        replica,
        admin_url: section.admin_url.clone().unwrap_or_else(|| format!("http://{admin_addr}")),
        max_connections: section.max_connections,
        lease_ttl: std::time::Duration::from_millis(section.lease_ttl_ms),
        treasury_ttl: std::time::Duration::from_millis(section.treasury_ttl_ms),
        ship_interval: std::time::Duration::from_millis(section.ship_interval_ms),
        metrics: metrics.cluster.clone(),
        clock: database_clock,
        supervisor: supervisor.clone(),
    };
    let ledger_config = LedgerConfig { hold_ttl_ms: config.ledger.hold_ttl_ms, ..LedgerConfig::default() };
    ClusterNode::start(options, data_dir, ledger_config, clock, shutdown)
        .await
        .context("cannot join the cluster")
}

/// A replica's alerts, kept in the cluster's books: rules a single node
/// left in `rules_file` are moved there first; rules are reloaded when any
/// replica adds one; every wallet the replica's view sees change is
/// evaluated, whichever replica spent from it.
async fn cluster_alerts(
    node: &Arc<ClusterNode>,
    rules_file: std::path::PathBuf,
    policy: DestinationPolicy,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
    supervisor: &Supervisor,
) -> anyhow::Result<Arc<Alerts>> {
    let alerts = Alerts::in_cluster(node.books().clone(), node.name().to_owned(), policy, clock)
        .await
        .context("cannot read the cluster's alert rules")?;
    let moved = alerts.import_rules_file(&rules_file).await.with_context(|| {
        format!("cannot move the alert rules in {} into the cluster", rules_file.display())
    })?;
    if moved > 0 {
        tracing::info!(moved, file = %rules_file.display(), "alert rules moved into the cluster's books");
    }
    supervisor
        .spawn("alert_rules", alerts.clone().follow_cluster_rules(node.wakeups().clone(), shutdown.clone()));
    supervisor.spawn("alert_deliveries", alerts.clone().resume_deliveries(shutdown.clone()));
    supervisor.spawn("refusal_shipping", alerts.clone().ship_refusals(shutdown));
    let watching = alerts.clone();
    node.replica().watch_wallets(Box::new(move |wallet, _| watching.notify(Signal::Changed(wallet))));
    Ok(alerts)
}

/// A replica's prices in a cluster: it re-reads its price file whenever
/// any replica is asked to reload (`POST /admin/v1/prices/reload`), and
/// reports the version it runs whenever that changes (compared in memory
/// every second; a statement only on a change), for `cluster status`.
async fn follow_cluster_prices(
    prices: Arc<LivePrices>,
    node: Arc<ClusterNode>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) {
    let mut reported: Option<String> = None;
    loop {
        let version = prices.current().version().to_string();
        if reported.as_deref() != Some(version.as_str()) {
            match node.books().report_price_version(node.name(), &version).await {
                Ok(()) => reported = Some(version),
                Err(error) => tracing::debug!(%error, "cannot report the price version yet"),
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = node.wakeups().price_reload_asked() => {
                // A failed reload keeps the table in force and is logged.
                let _ = prices.reload(clock.now(), "cluster");
            }
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// The replica name kept in the data directory, made at its first start:
/// the outbox there ships under this name, so it must not change.
fn replica_name(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("replica-name");
    match std::fs::read_to_string(&path) {
        Ok(name) if !name.trim().is_empty() => Ok(name.trim().to_owned()),
        _ => {
            let name = format!("replica-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            std::fs::write(&path, &name).with_context(|| format!("cannot write {}", path.display()))?;
            Ok(name)
        }
    }
}

/// The group-commit writer over the sled store.
type StoreWriter = Arc<GroupCommit<SledStore>>;

/// The single-node books: the ledger, its store writer and its historian
/// (both `None` without write-through).
type Books = (Arc<Ledger>, Option<StoreWriter>, Option<Arc<Historian>>);

/// The ledger, rebuilt from `<data-dir>/ledger` (from its newest checkpoint
/// on) with its store writer, or in memory only when write-through is off.
fn open_books(config: &GatewayConfig, clock: &Arc<dyn Clock>) -> anyhow::Result<Books> {
    let section = &config.ledger;
    let ledger_config = LedgerConfig { hold_ttl_ms: section.hold_ttl_ms, ..LedgerConfig::default() };
    if !section.write_through {
        tracing::warn!(
            "[ledger] write_through = false: balances live in memory only and are lost on restart"
        );
        let ledger = Ledger::new(ledger_config, Arc::new(crate::ledger::journal::NullJournal));
        return Ok((Arc::new(ledger), None, None));
    }
    let store_config = StoreConfig { flush_interval_ms: section.flush_interval_ms, ..StoreConfig::default() };
    let ledger_dir = config.server.data_dir.join("ledger");
    let opened = open_ledger(&ledger_dir, ledger_config.clone(), store_config)
        .with_context(|| format!("cannot open the ledger in {}", ledger_dir.display()))?;
    let export_dir =
        config.server.data_dir.join(section.history.export_dir.as_deref().unwrap_or("exports".as_ref()));
    let historian = Historian::start(
        opened.writer.clone(),
        &ledger_dir,
        export_dir,
        section.history.clone(),
        ledger_config,
        opened.checkpoint,
        clock.clone(),
    )?;
    Ok((opened.ledger, Some(opened.writer), Some(Arc::new(historian))))
}

/// How often open holds are checked against their TTL, and a single
/// node's wallets brought up to date.
const HOLD_VOID_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Void holds whose request never settled (lost upstream, crash of a task).
/// On a single node, also make the grants and write-offs that fell due on
/// wallets nobody touched, so the books date them when they happened, not
/// at the wallet's next request (a wallet untouched does nothing else; the
/// check is one comparison of its next event's time).
/// A tick that panics (a bug) is counted and logged and the next one runs:
/// holds that outlived their TTL must not stay held for good because one
/// wallet's catch-up failed once.
async fn keep_wallets_current(
    ledger: Arc<Ledger>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    single_node: bool,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(HOLD_VOID_INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
        let tick = std::panic::AssertUnwindSafe(|| {
            if single_node {
                ledger.tick(clock.now()).holds_voided
            } else {
                ledger.void_expired_holds(clock.now())
            }
        });
        match std::panic::catch_unwind(tick) {
            Ok(0) => {}
            Ok(voided) => tracing::warn!(voided, "voided holds that outlived their TTL"),
            Err(_) => {
                metrics.background_panics.get_or_create(&TaskLabels { task: "wallet_tick" }).inc();
                tracing::error!("the wallets' tick panicked; the next one runs in a second");
            }
        }
    }
}

/// Load the price file (a broken one stops the start) and keep it live: a
/// watcher reloads on file change, SIGHUP reloads on demand.
fn load_prices(
    config: &GatewayConfig,
    clock: &Arc<dyn Clock>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
    supervisor: &Supervisor,
) -> anyhow::Result<Option<Arc<LivePrices>>> {
    let Some(pricing) = &config.pricing else {
        // SIGHUP's default is to end the process, undrained: a habit of
        // sending it must not stop a gateway with nothing to reload.
        #[cfg(unix)]
        spawn_sighup_reload(None, clock.clone(), shutdown.clone())?;
        return Ok(None);
    };
    let prices = LivePrices::load(&pricing.file, config.required_tools(), clock.now(), metrics.clone())?;
    let prices = Arc::new(prices.keep_in(&config.server.data_dir)?);
    warn_if_stale(&prices, pricing.max_age_days, clock.now());
    supervisor
        .spawn("price_watch", prices.clone().watch(pricing.watch_interval, clock.clone(), shutdown.clone()));
    #[cfg(unix)]
    spawn_sighup_reload(Some(prices.clone()), clock.clone(), shutdown.clone())?;
    Ok(Some(prices))
}

/// Says at start when the table's `as_of` is older than `[pricing]
/// max_age_days`: provider prices change, and a stale table bills at old ones.
fn warn_if_stale(prices: &LivePrices, max_age_days: u32, now: chrono::DateTime<chrono::Utc>) {
    let status = prices.status(now);
    if let Some(age) = status.age_days.filter(|age| *age > i64::from(max_age_days)) {
        tracing::warn!(
            age_days = age,
            max_age_days,
            as_of = ?status.as_of,
            "the price table's prices were last checked {age} days ago; check them against the providers and update as_of"
        );
    }
}

#[cfg(unix)]
fn spawn_sighup_reload(
    prices: Option<Arc<LivePrices>>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                received = hangup.recv() => {
                    if received.is_none() {
                        return;
                    }
                    match &prices {
                        Some(prices) => {
                            let _ = prices.reload(clock.now(), "SIGHUP");
                        }
                        None => tracing::info!("SIGHUP: no price file to reload"),
                    }
                }
                () = shutdown.cancelled() => return,
            }
        }
    });
    Ok(())
}

fn prepare_data_dir(config: &GatewayConfig) -> anyhow::Result<()> {
    let dir = &config.server.data_dir;
    // Created readable by the gateway's user only: the ledger names
    // organizations, users and end users.
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).with_context(|| format!("cannot create data directory {}", dir.display()))?;
    // One made before (by an image's `mkdir`, an operator) keeps its mode.
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(dir) {
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
        if mode & 0o077 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                mode = format!("{:o}", mode & 0o777),
                "the data directory is open to other users, and the ledger names organizations, users \
                 and end users: chmod 700 it"
            );
        }
    }
    // Refuse to start rather than serve with books we cannot write.
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"ok")
        .with_context(|| format!("data directory {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Cancel `token` on SIGINT or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => tracing::info!("SIGINT: shutting down"),
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        token.cancel();
    });
}
