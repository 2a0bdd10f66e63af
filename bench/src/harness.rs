//! The run: start the mock, the gateways and nginx (or target an already
//! running mock and gateway), seed, drive the modes in interleaved rounds,
//! then the concurrency-1 and SSE passes, report, audit, stop the gateways
//! gracefully and verify the durable ledger.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use creditgate::mock::{Journal, MockOptions, MockUpstream};
use creditgate::pricing::PriceTable;

use crate::audit::{self, Books, Served, WalletState};
use crate::bare::{self, BareProxy};
use crate::client::{self, Admin, Http};
use crate::cluster::Cluster;
use crate::cpu::CpuSource;
use crate::drive::{self, Phase, Sequencer, Target};
use crate::gateway::{self, Gateway, Launch, ADMIN_TOKEN, PASSTHROUGH_HOST};
use crate::mix::{Catalog, KeyCounts, Mix, MixConfig, Source};
use crate::nginx::{self, Nginx};
use crate::report::{
    self, ClusterFigures, Results, AUTH_FLOOR, CLUSTER, DIRECT, HYPER_PROXY, METERED, METERED_WT_OFF,
    METER_FLOOR, NGINX, PASSTHROUGH, SPLIT,
};
use crate::settings::{LoadShape, Settings, Switch, TargetSettings};
use crate::sse::{self, SseSample, StreamCall};
use crate::stats::{Refused, Sample, Span};
use crate::tenants::{self, Tenants, WalletRef};

/// Journal entries the mock keeps between two drains (one phase's requests).
const JOURNAL_CAPACITY: usize = 5_000_000;
/// Longest wait for the operator to stop a targeted gateway before `ledger verify`.
const VERIFY_WAIT: Duration = Duration::from_secs(120);

/// A metered gateway and what the audit needs about it.
struct Metered {
    name: &'static str,
    /// `host:port` of its proxy listeners (a cluster's replicas: several).
    proxies: Vec<String>,
    cpu: CpuSource,
    /// The process, when this run started it (`None`: an already running one).
    gateway: Option<Gateway>,
    /// Cluster mode: PostgreSQL and the replicas.
    cluster: Option<Cluster>,
    admin: Admin,
    tenants: Tenants,
    seeded: BTreeMap<WalletRef, WalletState>,
    served: Vec<Served>,
    refused: Vec<Refused>,
    /// When each request it was sent (and not refused) was in flight.
    spans: Vec<(u64, Span)>,
    /// Its ledger entries can be read back (durable store on).
    per_debit: bool,
}

impl Metered {
    async fn start(
        name: &'static str,
        settings: &Settings,
        mock: &MockUpstream,
        (server, extra): (&str, &str),
        http: &Http,
    ) -> anyhow::Result<Metered> {
        let gateway = Gateway::start(
            Launch {
                name,
                bin: &settings.gateway_bin,
                mock: mock.addr(),
                prices: &settings.prices,
                server,
                extra,
                data_dir: None,
                env: &[],
            },
            http,
        )
        .await?;
        let admin = Admin { http: http.clone(), addr: gateway.admin.clone(), token: ADMIN_TOKEN.to_owned() };
        let tenants = tenants::seed(&admin, &settings.tenants)
            .await
            .with_context(|| format!("seeding the {name} gateway"))?;
        let seeded = audit::wallets(&admin, &tenants.orgs).await?;
        Ok(Metered {
            name,
            proxies: vec![gateway.proxy.clone()],
            cpu: CpuSource::Process(gateway.pid()),
            gateway: Some(gateway),
            cluster: None,
            admin,
            tenants,
            seeded,
            served: Vec::new(),
            refused: Vec::new(),
            spans: Vec::new(),
            per_debit: extra.is_empty(),
        })
    }

    /// An already running gateway: seeded through its admin API like ours.
    async fn attach(settings: &Settings, target: &TargetSettings, http: &Http) -> anyhow::Result<Metered> {
        let admin =
            Admin { http: http.clone(), addr: target.admin.clone(), token: target.admin_token.clone() };
        let tenants = tenants::seed(&admin, &settings.tenants)
            .await
            .with_context(|| format!("seeding the gateway at {} through its admin API", target.admin))?;
        let seeded = audit::wallets(&admin, &tenants.orgs).await?;
        Ok(Metered {
            name: METERED,
            proxies: vec![target.proxy.clone()],
            cpu: target.pid.map_or(CpuSource::None, CpuSource::Process),
            gateway: None,
            cluster: None,
            admin,
            tenants,
            seeded,
            served: Vec::new(),
            refused: Vec::new(),
            spans: Vec::new(),
            per_debit: true,
        })
    }

    /// `replicas` gateways on one PostgreSQL, seeded through the first
    /// (its admin writes reach the books through the treasurer); returns once
    /// every replica's view holds the seeded wallets.
    async fn start_cluster(settings: &Settings, mock: &MockUpstream, http: &Http) -> anyhow::Result<Metered> {
        eprintln!("starting PostgreSQL and {} cluster replicas", settings.replicas);
        let cluster = Cluster::start(
            settings.replicas,
            &settings.gateway_bin,
            mock,
            &settings.prices,
            &settings.replica_server_lines(),
            http,
        )
        .await?;
        let admins: Vec<Admin> = cluster
            .replicas
            .iter()
            .map(|r| Admin { http: http.clone(), addr: r.admin.clone(), token: ADMIN_TOKEN.to_owned() })
            .collect();
        let seeded = async {
            let tenants =
                tenants::seed(&admins[0], &settings.tenants).await.context("seeding the cluster")?;
            let seeded = audit::wallets(&admins[0], &tenants.orgs).await?;
            anyhow::Ok((tenants, seeded))
        };
        let (tenants, seeded) = match seeded.await {
            Ok(seeded) => seeded,
            Err(error) => bail!("{error:#}\nPostgreSQL's log ends:\n{}", cluster.log_tail()),
        };
        let started = std::time::Instant::now();
        for admin in &admins[1..] {
            // A replica's view follows the log: an org it has not read yet is a 404.
            while audit::wallets(admin, &tenants.orgs).await.map_or(true, |w| w.keys().ne(seeded.keys())) {
                if started.elapsed() > Duration::from_secs(30) {
                    bail!(
                        "a replica at {} did not see the seeded wallets within 30 s\nPostgreSQL's log ends:\n{}",
                        admin.addr,
                        cluster.log_tail()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(Metered {
            name: CLUSTER,
            proxies: cluster.replicas.iter().map(|r| r.proxy.clone()).collect(),
            cpu: CpuSource::Processes(cluster.replicas.iter().map(Gateway::pid).collect()),
            gateway: None,
            cluster: Some(cluster),
            admin: admins[0].clone(),
            tenants,
            seeded,
            served: Vec::new(),
            refused: Vec::new(),
            spans: Vec::new(),
            per_debit: true,
        })
    }

    fn target(&self) -> Target {
        Target {
            addrs: self.proxies.clone().into(),
            host: None,
            keys: vec![self.tenants.keys.iter().map(|t| t.secret.clone()).collect()].into(),
            cpu: self.cpu.clone(),
        }
    }
}

/// Whose books a mode's requests are charged to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Charged {
    /// Unmetered: nobody's.
    Nobody,
    On,
    Off,
    /// The cluster's shared books.
    Cluster,
}

struct Mode {
    name: &'static str,
    target: Target,
    books: Charged,
}

/// The mock upstream and how its usage journal is read.
enum Upstream {
    /// Started in this process: drained after each phase, event times at hand.
    Local { mock: MockUpstream, journal: Arc<Journal> },
    /// Already running (`--target-mock`): `GET /_mock/journal` after each
    /// phase, keeping entries numbered `next` or later.
    Remote { addr: String, next: u64 },
}

/// The state of a run between its passes.
struct Run {
    settings: Settings,
    prices: PriceTable,
    http: Http,
    upstream: Upstream,
    /// Phases after which the remote mock's journal had dropped entries.
    journal_gaps: u64,
    sequencer: Arc<Sequencer>,
    /// Which phase sent which request numbers (for the audit).
    catalog: Catalog,
    on: Metered,
    off: Option<Metered>,
    cluster: Option<Metered>,
    /// Single nodes sharing the cluster's traffic (the split floor).
    split: Vec<Metered>,
    nginx: Option<Nginx>,
    /// The bare hyper proxy, the reference row.
    bare: Option<BareProxy>,
    /// The floors under the pass-through and metered routes.
    floors: Option<Floors>,
    modes: Vec<Mode>,
    results: Results,
}

/// Run everything; `Ok(false)` when the audit found a problem.
pub async fn run(settings: Settings) -> anyhow::Result<bool> {
    let mut run = Run::start(settings).await?;
    run.measured_rounds().await?;
    run.concurrency_one().await?;
    run.streams().await?;
    run.cluster_figures().await?;
    let (text, json) = report::render(&run.results);
    println!("{text}");
    run.finish(json).await
}

impl Run {
    async fn start(settings: Settings) -> anyhow::Result<Run> {
        if let Some(target) = settings.target.clone() {
            return Run::attach(settings, target).await;
        }
        let prices = load_prices(&settings)?;
        if !settings.gateway_bin.is_file() {
            bail!(
                "no gateway binary at {} (build it: cargo build --release -p creditgate --bin creditgate, or pass --gateway-bin)",
                settings.gateway_bin.display()
            );
        }
        let options = MockOptions { journal_capacity: Some(JOURNAL_CAPACITY), ..MockOptions::default() };
        let mock = MockUpstream::start("127.0.0.1:0".parse()?, options).await?;
        let http = client::http(connections(&settings));
        let mut results = results_for(&settings);
        eprintln!("starting the gateways ({})", settings.gateway_bin.display());
        if let Some(scheduler) = &settings.scheduler {
            results.notes.push(format!("the gateways run with [server] scheduler = \"{scheduler}\""));
        }
        let on = Metered::start(METERED, &settings, &mock, (&settings.server_lines(), ""), &http).await?;
        let off = start_write_through_off(&settings, &mock, &http, &mut results.notes).await?;
        let nginx = start_nginx(&settings, &mock, &mut results.notes)?;
        let bare = start_bare(&settings, &mock, &mut results.notes)?;
        let floors = start_floors(&settings, &mock, &on, &mut results.notes)?;
        let cluster = match settings.replicas {
            0 => None,
            _ => Some(Metered::start_cluster(&settings, &mock, &http).await?),
        };
        let baselines = Baselines { nginx: nginx.as_ref(), bare: bare.as_ref(), floors: floors.as_ref() };
        let mut modes = modes(&mock.addr().to_string(), Some(PASSTHROUGH_HOST), &on, off.as_ref(), baselines);
        let mut split = Vec::new();
        if let Some(cluster) = &cluster {
            modes.push(Mode { name: CLUSTER, target: cluster.target(), books: Charged::Cluster });
            for i in 0..settings.replicas {
                let name: &'static str = Box::leak(format!("split-{}", i + 1).into_boxed_str());
                let server = settings.replica_server_lines();
                split.push(Metered::start(name, &settings, &mock, (&server, ""), &http).await?);
            }
            let target = Target {
                addrs: split.iter().map(|single| single.proxies[0].clone()).collect::<Vec<_>>().into(),
                host: None,
                keys: split
                    .iter()
                    .flat_map(|single| single.target().keys.to_vec())
                    .collect::<Vec<_>>()
                    .into(),
                cpu: CpuSource::Processes(
                    split.iter().filter_map(|single| single.gateway.as_ref()).map(Gateway::pid).collect(),
                ),
            };
            modes.push(Mode { name: SPLIT, target, books: Charged::Nobody });
            if let Some(workers) = settings.replica_workers {
                results.notes.push(format!(
                    "each replica and each split node runs [server] workers = {workers}; the single node \
                     runs the gateway's default (one per core)"
                ));
            }
            results.notes.push(format!(
                "split: the cluster's traffic over {} single-node gateways with books of their own, \
                 in turn (no shared books): what splitting it costs on this machine; checked by \
                 `ledger verify` on each, not audited request by request",
                settings.replicas
            ));
            results.notes.push(format!(
                "cluster: {} replicas on one PostgreSQL (fsync off, on this machine), requests spread \
                 over them in turn; its CPU per request is the replicas' only, the database's is shown apart",
                settings.replicas
            ));
        }
        Ok(Run {
            upstream: Upstream::Local { journal: mock.journal(), mock },
            journal_gaps: 0,
            settings,
            prices,
            http,
            sequencer: Arc::new(Sequencer::new()),
            catalog: Catalog::default(),
            on,
            off,
            cluster,
            split,
            nginx,
            bare,
            floors,
            modes,
            results,
        })
    }

    /// Target an already running mock and gateway: seed it, start nothing.
    async fn attach(settings: Settings, target: TargetSettings) -> anyhow::Result<Run> {
        let prices = load_prices(&settings)?;
        let http = client::http(connections(&settings));
        let mut results = results_for(&settings);
        results.sse_streams = 0;
        eprintln!(
            "targeting the running gateway {} (admin {}), mock {}",
            target.proxy, target.admin, target.mock
        );
        let (_, journal) = fetch_journal(&http, &target.mock)
            .await
            .with_context(|| format!("reading the mock's journal at http://{}/_mock/journal", target.mock))?;
        let next = journal
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["seq"].as_u64())
            .max()
            .map_or(0, |s| s + 1);
        let on = Metered::attach(&settings, &target, &http).await?;
        results.notes.push(format!(
            "targeted the running gateway {} (mock {}); nothing started or stopped by the harness",
            target.proxy, target.mock
        ));
        for note in [
            target.passthrough_host.is_none().then_some(
                "skipped passthrough: no --target-passthrough-host naming the gateway's passthrough route",
            ),
            target.pid.is_none().then_some("gateway CPU per request not measured: no --target-pid"),
            Some(
                "skipped write-through off, nginx and hyper-proxy: they need gateways and proxies this run starts",
            ),
            (settings.sse_streams > 0).then_some(
                "skipped the SSE pass: it needs the mock's event write times, kept in-process only",
            ),
        ]
        .into_iter()
        .flatten()
        {
            eprintln!("{note}");
            results.notes.push(note.to_owned());
        }
        let baselines = Baselines { nginx: None, bare: None, floors: None };
        let modes = modes(&target.mock, target.passthrough_host, &on, None, baselines);
        Ok(Run {
            upstream: Upstream::Remote { addr: target.mock, next },
            journal_gaps: 0,
            settings,
            prices,
            http,
            sequencer: Arc::new(Sequencer::new()),
            catalog: Catalog::default(),
            on,
            off: None,
            cluster: None,
            split: Vec::new(),
            nginx: None,
            bare: None,
            floors: None,
            modes,
            results,
        })
    }

    /// One closed- or open-loop phase of `mix` against mode `index`.
    async fn phase(
        &mut self,
        index: usize,
        mix: &Mix,
        shape: LoadShape,
        seconds: u64,
        label: String,
    ) -> anyhow::Result<Sample> {
        let first = self.sequencer.peek();
        let phase = Phase {
            http: &self.http,
            target: &self.modes[index].target,
            mix,
            shape,
            duration: Duration::from_secs(seconds),
            sequencer: &self.sequencer,
            progress: (self.settings.progress && shape == self.settings.load).then(|| label.clone()),
        };
        let database = self.cluster_database(index);
        let before = database.map(|cluster| (cluster.statements(), cluster.database_cpu()));
        let mut sample = drive::run(phase).await?;
        sample.rss_kb = self.modes[index].target.cpu.rss_kb();
        sample.rss_anon_kb = self.modes[index].target.cpu.rss_anon_kb();
        if let (Some(cluster), Some((statements, cpu))) = (database, before) {
            // Less the first reading, which the second counts.
            sample.db_statements = Some(cluster.statements().saturating_sub(statements + 1));
            sample.db_cpu = Some(cluster.database_cpu().saturating_sub(cpu));
        }
        eprintln!("{label:<32} {}", summary(&sample));
        // Kept by the books the phase charged, not with every round's sample.
        let spans = std::mem::take(&mut sample.spans);
        self.file(index, first, Source::Mix(mix.clone()), &sample.refused, spans).await?;
        Ok(sample)
    }

    /// The cluster whose database mode `index` charges, if any.
    fn cluster_database(&self, index: usize) -> Option<&Cluster> {
        match self.modes[index].books {
            Charged::Cluster => self.cluster.as_ref()?.cluster.as_ref(),
            _ => None,
        }
    }

    /// After a phase: note which requests it sent, and hand what the mock
    /// served (and the refusals) to the gateway whose books it touched.
    async fn file(
        &mut self,
        index: usize,
        first: u64,
        source: Source,
        refused: &[Refused],
        spans: Vec<(u64, Span)>,
    ) -> anyhow::Result<()> {
        self.catalog.add(first..self.sequencer.peek(), source);
        let served = match &mut self.upstream {
            Upstream::Local { journal, .. } => Served::from_journal(journal.drain(), &self.sequencer),
            Upstream::Remote { addr, next } => {
                let (_, entries) = fetch_journal(&self.http, addr).await?;
                let (served, gap) = Served::from_journal_json(&entries, &self.sequencer, next)?;
                self.journal_gaps += u64::from(gap);
                served
            }
        };
        let metered = match self.modes[index].books {
            Charged::Nobody => return Ok(()),
            Charged::On => &mut self.on,
            Charged::Off => match self.off.as_mut() {
                Some(off) => off,
                None => return Ok(()),
            },
            Charged::Cluster => match self.cluster.as_mut() {
                Some(cluster) => cluster,
                None => return Ok(()),
            },
        };
        metered.served.extend(served);
        metered.refused.extend_from_slice(refused);
        metered.spans.extend(spans);
        Ok(())
    }

    /// Every mode once per round, the order rotating so no mode always runs
    /// first or right after another.
    async fn measured_rounds(&mut self) -> anyhow::Result<()> {
        let mix = Mix::new(self.settings.mix.clone(), self.settings.tenants.key_counts());
        let count = self.modes.len();
        let mut measured: Vec<(&'static str, Vec<Sample>)> =
            self.modes.iter().map(|m| (m.name, Vec::new())).collect();
        for round in 0..self.settings.rounds {
            for i in 0..count {
                let index = (i + round) % count;
                let label =
                    format!("round {}/{} {}", round + 1, self.settings.rounds, self.modes[index].name);
                let sample =
                    self.phase(index, &mix, self.settings.load, self.settings.seconds, label).await?;
                measured[index].1.push(sample);
            }
        }
        self.results.modes = measured;
        Ok(())
    }

    /// The modes the latency passes compare.
    fn latency_modes(&self) -> Vec<usize> {
        (0..self.modes.len())
            .filter(|&i| {
                [
                    DIRECT,
                    HYPER_PROXY,
                    AUTH_FLOOR,
                    METER_FLOOR,
                    PASSTHROUGH,
                    NGINX,
                    METERED,
                    METERED_WT_OFF,
                    CLUSTER,
                ]
                .contains(&self.modes[i].name)
            })
            .collect()
    }

    /// Concurrency 1: the gateway's added latency without queueing.
    async fn concurrency_one(&mut self) -> anyhow::Result<()> {
        if self.settings.c1_seconds == 0 {
            return Ok(());
        }
        let probe = Mix::new(MixConfig::latency_probe(), KeyCounts { funded: 1, dry: 0 });
        let indexes = self.latency_modes();
        let mut c1: Vec<(&'static str, Vec<Sample>)> =
            indexes.iter().map(|&i| (self.modes[i].name, Vec::new())).collect();
        for round in 0..self.settings.rounds {
            for (slot, &index) in indexes.iter().enumerate() {
                let label =
                    format!("c1 round {}/{} {}", round + 1, self.settings.rounds, self.modes[index].name);
                let shape = LoadShape::Closed { concurrency: 1 };
                let sample = self.phase(index, &probe, shape, self.settings.c1_seconds, label).await?;
                c1[slot].1.push(sample);
            }
        }
        self.results.c1 = c1;
        Ok(())
    }

    /// SSE: paced streams, per-event delay direct vs through the gateway.
    async fn streams(&mut self) -> anyhow::Result<()> {
        if self.settings.sse_streams == 0 {
            return Ok(());
        }
        // The remote mock's journal leaves out event write times.
        let Upstream::Local { journal, .. } = &self.upstream else { return Ok(()) };
        let journal = journal.clone();
        let indexes = self.latency_modes();
        let mut sse: Vec<(&'static str, Vec<SseSample>)> =
            indexes.iter().map(|&i| (self.modes[i].name, Vec::new())).collect();
        let frames = self.settings.sse_frames;
        for _ in 0..self.settings.rounds {
            for (slot, &index) in indexes.iter().enumerate() {
                let first = self.sequencer.peek();
                let call = StreamCall {
                    http: &self.http,
                    target: &self.modes[index].target,
                    sequencer: &self.sequencer,
                    journal: &journal,
                    key: 0,
                    pace_ms: self.settings.sse_pace_ms,
                    frames,
                };
                let sample = sse::measure(&call, self.settings.sse_streams).await?;
                self.file(index, first, Source::Stream { key: 0, frames }, &[], Vec::new()).await?;
                sse[slot].1.push(sample);
            }
        }
        self.results.sse = sse;
        Ok(())
    }

    /// The replicas' lease-draw and outbox-lag p99 over the whole run.
    async fn cluster_figures(&mut self) -> anyhow::Result<()> {
        let Some(cluster) = self.cluster.as_ref().and_then(|c| c.cluster.as_ref()) else { return Ok(()) };
        self.results.cluster = Some(ClusterFigures {
            replicas: cluster.replicas.len(),
            lease_draw: cluster.p99(&self.http, "lease_draw_seconds").await?,
            outbox_lag: cluster.p99(&self.http, "outbox_lag_seconds").await?,
            top_statements: cluster.top_statements(12),
            most_sent_statements: cluster.most_sent_statements(10),
            lease_churn: cluster.lease_churn(8),
        });
        Ok(())
    }

    /// Audit both gateways, stop everything (the durable gateway by SIGTERM,
    /// then `ledger verify`), write the JSON report.
    async fn finish(mut self, mut json: serde_json::Value) -> anyhow::Result<bool> {
        let mut ok = check_errors(&self.results);
        if let Some(cluster) = self.cluster.as_ref().and_then(|c| c.cluster.as_ref()) {
            cluster.wait_settled()?;
        }
        let mut audits = serde_json::Map::new();
        if self.journal_gaps > 0 {
            // Said first: the debits it leaves unmatched are listed below as
            // failures, and they are this, not overcharges.
            println!(
                "audit FAILED: the mock's journal dropped entries before {} phase(s) were read: \
                 served requests may be missing, so their debits read as unknown and wallet \
                 totals disagree below (restart the mock, or shorten the phases)",
                self.journal_gaps
            );
            ok = false;
        }
        for metered in std::iter::once(&self.on).chain(self.off.as_ref()).chain(self.cluster.as_ref()) {
            let books = Books {
                name: metered.name,
                admin: &metered.admin,
                tenants: &metered.tenants,
                seeded: &metered.seeded,
                served: &metered.served,
                refused: &metered.refused,
                spans: &metered.spans,
                catalog: &self.catalog,
                sequencer: &self.sequencer,
                prices: &self.prices,
                per_debit: metered.per_debit,
            };
            let findings = audit::audit(&books).await?;
            audits.insert(metered.name.to_owned(), findings.json.clone());
            for note in &findings.notes {
                println!("audit: {note}");
            }
            // With the journal short, every total is suspect: a few are
            // listed, the rest counted.
            let shown = if self.journal_gaps > 0 { 3 } else { usize::MAX };
            for failure in findings.failures.iter().take(shown) {
                println!("audit FAILED: {failure}");
            }
            if findings.failures.len() > shown {
                println!(
                    "audit FAILED: {}: {} more failures, which the journal's dropped entries may explain",
                    metered.name,
                    findings.failures.len() - shown
                );
            }
            ok &= findings.failures.is_empty();
        }
        if let Some(nginx) = self.nginx.take() {
            nginx.stop();
        }
        drop(self.bare.take());
        drop(self.floors.take());
        if let Some(gateway) = self.off.as_mut().and_then(|off| off.gateway.as_mut()) {
            gateway.stop().context("stopping the write-through-off gateway")?;
        }
        for single in &mut self.split {
            let Some(gateway) = single.gateway.take() else { continue };
            match gateway.stop_and_verify() {
                Ok(verified) => println!(
                    "audit: {} ledger verify after SIGTERM: {}",
                    single.name,
                    verified.lines().last().unwrap_or("ok")
                ),
                Err(error) => {
                    println!("audit FAILED: {}: {error:#}", single.name);
                    ok = false;
                }
            }
        }
        if let Some(cluster) = self.cluster.as_mut().and_then(|c| c.cluster.take()) {
            match cluster.stop_and_verify() {
                Ok(verified) => println!(
                    "audit: cluster ledger verify --database-url-env after SIGTERM: {}",
                    verified.lines().last().unwrap_or("ok")
                ),
                Err(error) => {
                    println!("audit FAILED: {error:#}");
                    ok = false;
                }
            }
        }
        let data_dir = self.settings.target.as_ref().and_then(|t| t.data_dir.clone());
        let verified = match (self.on.gateway.take(), data_dir) {
            (Some(gateway), _) => Some(gateway.stop_and_verify().map(|v| ("after SIGTERM", v))),
            (None, Some(dir)) => Some(
                verify_when_stopped(&self.settings.gateway_bin, &dir)
                    .await
                    .with_context(|| format!("the targeted gateway's ledger in {}", dir.display()))
                    .map(|v| ("on --target-data-dir once the gateway stopped", v)),
            ),
            (None, None) => None,
        };
        match verified {
            Some(Ok((how, verified))) => {
                println!("audit: ledger verify {how}: {}", verified.lines().last().unwrap_or("ok"))
            }
            Some(Err(error)) => {
                println!("audit FAILED: {error:#}");
                ok = false;
            }
            None => println!(
                "audit: ledger verify skipped: the targeted gateway is not this run's to stop \
                 (stop it, then run `creditgate ledger verify --data-dir DIR`, or pass --target-data-dir)"
            ),
        }
        if let Upstream::Local { mock, .. } = self.upstream {
            mock.stop().await;
        }
        json["audit"] = serde_json::Value::Object(audits);
        write_json(&self.settings, json, ok)?;
        println!("{}", if ok { "audit: ok" } else { "audit: FAILED" });
        Ok(ok)
    }
}

/// The unmetered proxies this run started next to the gateways.
#[derive(Clone, Copy)]
struct Baselines<'a> {
    nginx: Option<&'a Nginx>,
    bare: Option<&'a BareProxy>,
    floors: Option<&'a Floors>,
}

/// The bare proxy as the floors under the gateway's two routes, and the
/// directory of the keys file and the metering floor's store.
struct Floors {
    auth: BareProxy,
    meter: BareProxy,
    _dir: tempfile::TempDir,
}

/// The modes of the measured rounds, in order.
/// `mock` is `host:port`; `passthrough` the `Host` of the gateway's
/// unmetered route (`None` leaves that mode out).
fn modes(
    mock: &str,
    passthrough: Option<&'static str>,
    on: &Metered,
    off: Option<&Metered>,
    baselines: Baselines,
) -> Vec<Mode> {
    let on_target = on.target();
    // Unmetered modes send the same requests, keys included, as the metered one.
    let plain = |addr: String, host, cpu| Target {
        addrs: vec![addr].into(),
        host,
        keys: on_target.keys.clone(),
        cpu,
    };
    let mut modes = vec![Mode {
        name: DIRECT,
        target: plain(mock.to_owned(), None, CpuSource::None),
        books: Charged::Nobody,
    }];
    if let Some(bare) = baselines.bare {
        let target = plain(bare.addr.to_string(), None, CpuSource::Process(bare.pid()));
        modes.push(Mode { name: HYPER_PROXY, target, books: Charged::Nobody });
    }
    if let Some(floors) = baselines.floors {
        for (name, proxy) in [(AUTH_FLOOR, &floors.auth), (METER_FLOOR, &floors.meter)] {
            let target = plain(proxy.addr.to_string(), None, CpuSource::Process(proxy.pid()));
            modes.push(Mode { name, target, books: Charged::Nobody });
        }
    }
    if let Some(host) = passthrough {
        let target = plain(on.proxies[0].clone(), Some(host), on.cpu.clone());
        modes.push(Mode { name: PASSTHROUGH, target, books: Charged::Nobody });
    }
    if let Some(nginx) = baselines.nginx {
        let target = plain(nginx.addr.to_string(), None, CpuSource::Tree(nginx.pid()));
        modes.push(Mode { name: NGINX, target, books: Charged::Nobody });
    }
    modes.push(Mode { name: METERED, target: on_target.clone(), books: Charged::On });
    if let Some(off) = off {
        modes.push(Mode { name: METERED_WT_OFF, target: off.target(), books: Charged::Off });
    }
    modes
}

fn summary(sample: &Sample) -> String {
    format!(
        "{:>8.0} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  402s {:>5}  errors {}",
        sample.throughput(),
        sample.percentile_us(0.5),
        sample.percentile_us(0.99),
        sample.refusal_count(),
        sample.error_count()
    )
}

/// Every request must have been answered 200 or 402.
fn check_errors(results: &Results) -> bool {
    let mut ok = true;
    for (mode, samples) in results.modes.iter().chain(&results.c1) {
        let errors: u64 = samples.iter().map(Sample::error_count).sum();
        let refused: u64 = samples.iter().map(Sample::refusal_count).sum();
        if errors > 0 {
            println!("audit FAILED: {mode}: {errors} requests answered neither 200 nor 402");
            ok = false;
        }
        if refused > 0 && ![METERED, METERED_WT_OFF, CLUSTER, SPLIT].contains(mode) {
            println!("audit FAILED: {mode}: {refused} 402s on an unmetered path");
            ok = false;
        }
    }
    for (mode, samples) in &results.sse {
        let broken: u64 = samples.iter().map(|s| s.failed + s.unmatched).sum();
        if broken > 0 {
            println!("audit FAILED: SSE {mode}: {broken} streams failed or events went missing");
            ok = false;
        }
    }
    ok
}

async fn start_write_through_off(
    settings: &Settings,
    mock: &MockUpstream,
    http: &Http,
    notes: &mut Vec<String>,
) -> anyhow::Result<Option<Metered>> {
    if settings.write_through_off == Switch::Off {
        return Ok(None);
    }
    match gateway::write_through_off_switch(&settings.gateway_bin, mock.addr(), &settings.prices)? {
        Some(section) => {
            let section_name = section.lines().next().unwrap_or_default().to_owned();
            let off =
                Metered::start(METERED_WT_OFF, settings, mock, (&settings.server_lines(), &section), http)
                    .await?;
            notes.push(format!(
                "write-through off via `{section_name} write_through = false`; audited by wallet balances"
            ));
            Ok(Some(off))
        }
        None if settings.write_through_off == Switch::On => {
            bail!("this gateway has no `write_through = false` switch ([store] or [ledger]); drop --write-through-off on")
        }
        None => {
            let note =
                "skipped write-through off: the gateway config has no `write_through` switch yet".to_owned();
            eprintln!("{note}");
            notes.push(note);
            Ok(None)
        }
    }
}

/// An optional baseline's binary as its switch says: `found` when on or
/// auto; when it is missing, an error (on) or a note saying why (auto).
fn baseline_bin(
    switch: Switch,
    found: impl FnOnce() -> Option<PathBuf>,
    name: &str,
    missing: &str,
    notes: &mut Vec<String>,
) -> anyhow::Result<Option<PathBuf>> {
    if switch == Switch::Off {
        return Ok(None);
    }
    match found() {
        Some(bin) => Ok(Some(bin)),
        None if switch == Switch::On => bail!("--{name} on, but {missing}"),
        None => {
            let note = format!("skipped {name}: {missing}");
            eprintln!("{note}");
            notes.push(note);
            Ok(None)
        }
    }
}

fn start_nginx(
    settings: &Settings,
    mock: &MockUpstream,
    notes: &mut Vec<String>,
) -> anyhow::Result<Option<Nginx>> {
    let missing = "not on PATH (apt-get install nginx)";
    match baseline_bin(settings.nginx, nginx::find, "nginx", missing, notes)? {
        Some(bin) => Ok(Some(Nginx::start(&bin, mock.addr())?)),
        None => Ok(None),
    }
}

/// The bare hyper proxy, with as many worker threads as the gateway's
/// runtime has (tokio's default: one per core), so throughput compares
/// like with like.
fn start_bare(
    settings: &Settings,
    mock: &MockUpstream,
    notes: &mut Vec<String>,
) -> anyhow::Result<Option<BareProxy>> {
    let missing = format!(
        "no {bin} next to this binary (cargo build -p creditgate-bench --bin {bin}; \
         `cargo run --bin creditgate-load` builds only the harness)",
        bin = bare::BIN
    );
    let Some(bin) = baseline_bin(settings.hyper_proxy, bare::find, "hyper-proxy", &missing, notes)? else {
        return Ok(None);
    };
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    let proxy = BareProxy::start(&bin, mock.addr(), workers, &[])?;
    notes.push(format!(
        "hyper-proxy: {} with {workers} worker thread(s), as many as the gateway's runtime; every ratio \
         `… / hyper-proxy` is to it",
        bare::BIN
    ));
    Ok(Some(proxy))
}

/// The floors, each with the gateway's worker count, knowing the metered
/// gateway's keys (one wallet each, never short) and pricing the mix's models.
fn start_floors(
    settings: &Settings,
    mock: &MockUpstream,
    on: &Metered,
    notes: &mut Vec<String>,
) -> anyhow::Result<Option<Floors>> {
    let missing = format!("no {} next to this binary", bare::BIN);
    let Some(bin) = baseline_bin(settings.floors, bare::find, "floors", &missing, notes)? else {
        return Ok(None);
    };
    let dir = tempfile::tempdir()?;
    let keys_file = dir.path().join("keys");
    let keys = on.target().keys;
    std::fs::write(&keys_file, keys.first().map(|set| set.join("\n")).unwrap_or_default())?;
    let models: Vec<String> = settings.mix.models.iter().map(|m| m.model.clone()).collect();
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    let start = |kind| {
        let args = bare::floor_args(kind, &keys_file, &models, &dir.path().join("store"));
        BareProxy::start(&bin, mock.addr(), workers, &args)
    };
    let (auth, meter) = (start("auth")?, start("meter")?);
    notes.push(format!(
        "{AUTH_FLOOR} / {METER_FLOOR}: {} --floor auth / meter, the least the pass-through and the \
         metered route must add to hyper-proxy (bench/src/bare_proxy/floor.rs); never refuses",
        bare::BIN
    ));
    Ok(Some(Floors { auth, meter, _dir: dir }))
}

fn write_json(settings: &Settings, mut json: serde_json::Value, ok: bool) -> anyhow::Result<()> {
    let Some(path) = &settings.json else { return Ok(()) };
    json["audit_ok"] = serde_json::json!(ok);
    let text = serde_json::to_string_pretty(&json)?;
    if path.as_os_str() == "-" {
        println!("{text}");
    } else {
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("JSON report written to {}", path.display());
    }
    Ok(())
}

/// `ledger verify` on a targeted gateway's data directory. The gateway holds
/// it locked while it runs, so this waits (up to [`VERIFY_WAIT`]) for the
/// operator to stop it.
async fn verify_when_stopped(bin: &std::path::Path, dir: &std::path::Path) -> anyhow::Result<String> {
    let started = std::time::Instant::now();
    let mut told = false;
    loop {
        match Gateway::verify(bin, dir) {
            Err(error)
                if format!("{error:#}").contains("acquire lock") && started.elapsed() < VERIFY_WAIT =>
            {
                if !told {
                    eprintln!(
                        "ledger verify: the gateway still holds {}; stop it (SIGTERM) to verify, waiting up to {} s",
                        dir.display(),
                        VERIFY_WAIT.as_secs()
                    );
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// `GET /_mock/journal` of a running mock (`host:port`): status and the JSON list.
async fn fetch_journal(http: &Http, mock: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    let request = http::Request::get(format!("http://{mock}/_mock/journal"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let (status, body) = client::call(http, request).await.context("GET /_mock/journal")?;
    if status != 200 {
        bail!("GET http://{mock}/_mock/journal answered {status}");
    }
    Ok((status, serde_json::from_slice(&body).context("the mock's journal is not JSON")?))
}

/// The price file the audit prices with; every model of the mix must be in it.
fn load_prices(settings: &Settings) -> anyhow::Result<PriceTable> {
    let prices_text = std::fs::read_to_string(&settings.prices)
        .with_context(|| format!("cannot read the price file {}", settings.prices.display()))?;
    let prices = PriceTable::parse("prices.toml", &prices_text).map_err(|e| anyhow::anyhow!("{e}"))?;
    settings.mix.check_priced(&prices, chrono::Utc::now())?;
    Ok(prices)
}

/// Idle connections the client keeps per host.
fn connections(settings: &Settings) -> usize {
    let concurrency = match settings.load {
        LoadShape::Closed { concurrency } => concurrency,
        LoadShape::Open { max_in_flight, .. } => max_in_flight.min(1024),
    };
    concurrency * 2
}

fn results_for(settings: &Settings) -> Results {
    Results {
        shape: Some(settings.load),
        seconds: settings.seconds,
        rounds: settings.rounds,
        c1_seconds: settings.c1_seconds,
        sse_streams: settings.sse_streams,
        sse_frames: settings.sse_frames,
        sse_pace_ms: settings.sse_pace_ms,
        ..Results::default()
    }
}
