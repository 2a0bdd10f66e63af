//! The cluster profile's parts: a throwaway PostgreSQL, N gateway replicas
//! sharing its books, and what the shared books cost: statements per
//! request (`pg_stat_statements`), the database's CPU, and the replicas'
//! lease-draw and outbox-lag p99 (from their `/metrics` histograms).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use creditgate::mock::MockUpstream;

use crate::client::{self, Http};
use crate::cpu;
use crate::gateway::{Gateway, Launch};

// The same throwaway server the cluster tests start (Debian's binaries,
// initdb in a temp dir, a free loopback port, never a system service).
#[path = "../../tests/common/pg.rs"]
mod pg;

/// The variable the replicas read the database URL from.
const DATABASE_URL_ENV: &str = "CREDITGATE_LOAD_DATABASE_URL";
/// Longest wait for every shipped debit to be posted after the load.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// PostgreSQL and the replicas on it.
pub struct Cluster {
    pg: pg::Postgres,
    pub replicas: Vec<Gateway>,
    bin: std::path::PathBuf,
}

/// A p99 read from a histogram's buckets: the bound of the bucket it falls
/// in (buckets are 25% apart), and how many observations there were.
#[derive(Debug, Clone, Copy)]
pub struct BucketP99 {
    pub seconds: Option<f64>,
    pub count: u64,
}

impl Cluster {
    /// Starts PostgreSQL (with `pg_stat_statements`) and `replicas` gateways
    /// on it, each on its own data directory, with `server` in `[server]`.
    pub async fn start(
        replicas: usize,
        bin: &Path,
        mock: &MockUpstream,
        prices: &Path,
        server: &str,
        http: &Http,
    ) -> anyhow::Result<Cluster> {
        let mut pg = tokio::task::spawn_blocking(|| {
            let mut pg = pg::Postgres::start();
            pg.psql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'");
            pg.restart();
            pg.psql("CREATE EXTENSION pg_stat_statements");
            // Statements inside the books' functions too, to see where their
            // time goes; the per-request count reads top-level ones only.
            pg.psql("ALTER SYSTEM SET pg_stat_statements.track = 'all'");
            pg.psql("SELECT pg_reload_conf()");
            pg
        })
        .await
        .context("starting PostgreSQL (apt-get install postgresql, or .ci/install-test-deps)")?;
        let url = pg.url();
        let section = format!("[cluster]\ndatabase_url_env = \"{DATABASE_URL_ENV}\"\n");
        let mut started = Vec::new();
        for index in 0..replicas {
            let name: &'static str = Box::leak(format!("replica-{index}").into_boxed_str());
            let env = [(DATABASE_URL_ENV, url.as_str())];
            let launch = Launch {
                name,
                bin,
                mock: mock.addr(),
                prices,
                server,
                extra: &section,
                data_dir: None,
                env: &env,
            };
            match Gateway::start(launch, http).await {
                Ok(gateway) => started.push(gateway),
                Err(error) => {
                    pg.stop();
                    return Err(error.context(format!("starting cluster {name}")));
                }
            }
        }
        Ok(Cluster { pg, replicas: started, bin: bin.to_owned() })
    }

    /// The last lines of the server's log (for failure messages).
    pub fn log_tail(&self) -> String {
        let log = self.pg.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Statements run on the server so far (top-level, as clients sent
    /// them). Each reading is itself one: callers subtract one per reading
    /// between two.
    pub fn statements(&self) -> u64 {
        self.pg
            .psql("SELECT COALESCE(sum(calls), 0) FROM pg_stat_statements WHERE toplevel")
            .parse()
            .unwrap_or(0)
    }

    /// The statements the database spent most time on, with their call
    /// counts: `total ms, mean ms, "in a function" when nested, query` (over
    /// the whole run, the harness's own readings included).
    pub fn top_statements(&self, count: usize) -> Vec<(u64, String)> {
        self.statements_by("total_exec_time DESC", "true", count)
    }

    /// The statements clients sent most often (top level only: what the
    /// statements-per-request figure counts), same columns.
    pub fn most_sent_statements(&self, count: usize) -> Vec<(u64, String)> {
        self.statements_by("calls DESC", "toplevel", count)
    }

    fn statements_by(&self, order: &str, filter: &str, count: usize) -> Vec<(u64, String)> {
        let rows = self.pg.psql(&format!(
            "SELECT calls || '|' || lpad(round(total_exec_time::numeric, 1)::text, 10) || ' ms ' \
             || lpad(round(mean_exec_time::numeric, 3)::text, 9) || ' ms/call ' \
             || CASE WHEN toplevel THEN '' ELSE '[in a function] ' END \
             || left(regexp_replace(query, '\\s+', ' ', 'g'), 80) \
             FROM pg_stat_statements WHERE {filter} ORDER BY {order} LIMIT {count}"
        ));
        rows.lines()
            .filter_map(|row| {
                let (calls, query) = row.split_once('|')?;
                Some((calls.parse().ok()?, query.to_owned()))
            })
            .collect()
    }

    /// The wallets that drew the most leases: `wallet: leases drawn, mean
    /// size, given back unspent`.
    pub fn lease_churn(&self, count: usize) -> Vec<String> {
        let rows = self.pg.psql(&format!(
            "SELECT wallet || ': ' || count(*) || ' leases, mean ' || round(avg(granted), 6) \
             || ', mean spent ' || round(avg(spent), 6) \
             FROM cg_leases GROUP BY wallet ORDER BY count(*) DESC LIMIT {count}"
        ));
        rows.lines().map(str::to_owned).collect()
    }

    /// CPU the server (postmaster and backends) has used so far.
    pub fn database_cpu(&self) -> Duration {
        self.pg.pid().map_or(Duration::ZERO, cpu::tree_cpu)
    }

    /// Waits until every debit the replicas settled is shipped and posted
    /// and their views have read the log to its end: the replicas' outboxes
    /// are empty (the shipped count stops moving), nothing is unposted, and
    /// then one more log poll.
    pub fn wait_settled(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut last = String::new();
        let mut steady = 0;
        loop {
            let now = self.pg.psql(
                "SELECT count(*) || '/' || count(*) FILTER (WHERE post_error IS NULL
                     AND post_seq > (SELECT posted_through FROM cg_posting)) FROM cg_debits",
            );
            steady = if now == last && now.ends_with("/0") { steady + 1 } else { 0 };
            if steady >= 3 {
                std::thread::sleep(Duration::from_millis(500));
                return Ok(());
            }
            if started.elapsed() > SETTLE_TIMEOUT {
                bail!(
                    "the cluster's debits did not settle within {SETTLE_TIMEOUT:?} (shipped/unposted: {now})"
                );
            }
            last = now;
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// p99 of a histogram over every replica's `/metrics`.
    pub async fn p99(&self, http: &Http, metric: &str) -> anyhow::Result<BucketP99> {
        let mut buckets: BTreeMap<u64, (f64, u64)> = BTreeMap::new();
        let mut count = 0;
        for replica in &self.replicas {
            let request = http::Request::get(format!("http://{}/metrics", replica.admin))
                .body(http_body_util::Full::new(bytes::Bytes::new()))?;
            let (status, body) = client::call(http, request).await?;
            if status != 200 {
                bail!("GET /metrics of {} answered {status}", replica.name);
            }
            let text = String::from_utf8_lossy(&body);
            for (bound, cumulative) in histogram_buckets(&text, metric) {
                // Keyed by the bound's bits: every replica has the same buckets.
                let slot = buckets.entry(bound.to_bits()).or_insert((bound, 0));
                slot.1 += cumulative;
            }
            count += histogram_count(&text, metric);
        }
        let mut ordered: Vec<(f64, u64)> = buckets.into_values().collect();
        ordered.sort_by(|a, b| a.0.total_cmp(&b.0));
        let rank = (count as f64 * 0.99).ceil() as u64;
        let seconds =
            (count > 0).then(|| ordered.iter().find(|(_, below)| *below >= rank).map(|(bound, _)| *bound));
        Ok(BucketP99 { seconds: seconds.flatten(), count })
    }

    /// SIGTERM every replica (each ships its outbox and gives its leases
    /// back), then `creditgate ledger verify --database-url-env` on the
    /// shared books.
    pub fn stop_and_verify(mut self) -> anyhow::Result<String> {
        for replica in &mut self.replicas {
            replica.stop().with_context(|| format!("stopping {}", replica.name))?;
        }
        let output = std::process::Command::new(&self.bin)
            .args(["ledger", "verify", "--database-url-env", DATABASE_URL_ENV])
            .env(DATABASE_URL_ENV, self.pg.url())
            .output()?;
        let text =
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        if !output.status.success() {
            bail!("creditgate ledger verify --database-url-env failed ({}):\n{text}", output.status);
        }
        Ok(text.trim().to_owned())
    }
}

/// `(le, cumulative count)` of `creditgate_<metric>_bucket` lines.
fn histogram_buckets(text: &str, metric: &str) -> Vec<(f64, u64)> {
    let prefix = format!("creditgate_{metric}_bucket{{le=\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (bound, rest) = rest.split_once('"')?;
            let bound = if bound == "+Inf" { f64::INFINITY } else { bound.parse().ok()? };
            Some((bound, rest.split_whitespace().last()?.parse().ok()?))
        })
        .collect()
}

fn histogram_count(text: &str, metric: &str) -> u64 {
    let prefix = format!("creditgate_{metric}_count ");
    text.lines().find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_read_from_the_exposition() {
        let text = "# TYPE creditgate_lease_draw_seconds histogram\n\
            creditgate_lease_draw_seconds_sum 0.5\n\
            creditgate_lease_draw_seconds_count 4\n\
            creditgate_lease_draw_seconds_bucket{le=\"0.001\"} 1\n\
            creditgate_lease_draw_seconds_bucket{le=\"0.002\"} 3\n\
            creditgate_lease_draw_seconds_bucket{le=\"+Inf\"} 4\n";
        assert_eq!(
            histogram_buckets(text, "lease_draw_seconds"),
            vec![(0.001, 1), (0.002, 3), (f64::INFINITY, 4)]
        );
        assert_eq!(histogram_count(text, "lease_draw_seconds"), 4);
        assert_eq!(histogram_count(text, "outbox_lag_seconds"), 0);
    }
}
