//! What one phase measured, percentiles, and medians with their spread over
//! rounds. Timing statistics use floats; money never passes through here.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;

/// When one request was in flight as the client saw it: from just before it
/// was sent to the end of its response, in nanoseconds of [`run_ns`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub sent_ns: u64,
    pub ended_ns: u64,
}

/// `at` on one clock shared by every phase of the run, so spans of
/// different phases compare.
pub fn run_ns(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    at.saturating_duration_since(*EPOCH.get_or_init(Instant::now)).as_nanos() as u64
}

/// A refused request, kept for the audit's check of 402s against wallets.
#[derive(Debug, Clone)]
pub struct Refused {
    pub seq: u64,
    pub key: usize,
    pub code: String,
    /// The `required` amount of the 402 body.
    pub required: Option<Decimal>,
    pub span: Span,
}

/// How one request ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seq: u64,
    pub key: usize,
    pub latency_ns: u64,
    /// 0 when no response came (connection error).
    pub status: u16,
    pub code: Option<String>,
    pub required: Option<Decimal>,
    pub span: Span,
}

/// One mode in one round.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Requests that ended (answered or failed), not counting unsent ones.
    pub requests: u64,
    /// Latencies in nanoseconds, sorted once the phase ends.
    pub latencies_ns: Vec<u64>,
    pub by_status: BTreeMap<u16, u64>,
    /// 402s by the `code` of their body.
    pub refusals: BTreeMap<String, u64>,
    /// Everything else that was not a 200, by `status code` (or `transport`).
    pub errors: BTreeMap<String, u64>,
    pub refused: Vec<Refused>,
    /// Every request that was not refused, by number: any of them may have
    /// held credit while a refusal was decided (the audit's check of 402s).
    pub spans: Vec<(u64, Span)>,
    pub elapsed: Duration,
    /// CPU the process under test used during the phase.
    pub cpu: Option<Duration>,
    /// The part of `cpu` spent on the store's threads (`cpu::STORE_THREADS`).
    pub store_cpu: Option<Duration>,
    /// Open loop: requests sent later than the late threshold after their
    /// intended time, and requests not sent at all (too many in flight).
    pub late: u64,
    pub unsent: u64,
    /// Cluster mode: statements the shared database ran during the phase,
    /// and the CPU it used.
    pub db_statements: Option<u64>,
    pub db_cpu: Option<Duration>,
    /// Resident memory of the process under test when the phase ended, KiB.
    pub rss_kb: Option<u64>,
    /// The most resident memory seen while the phase ran (read every
    /// [`crate::drive::RSS_EVERY`]), KiB: buffers that live only under load
    /// are gone by the end of a phase.
    pub rss_peak_kb: Option<u64>,
    /// The anonymous part of `rss_kb` (heap and stacks, not mapped code).
    pub rss_anon_kb: Option<u64>,
}

impl Sample {
    pub fn add(&mut self, outcome: Outcome) {
        self.requests += 1;
        self.latencies_ns.push(outcome.latency_ns);
        *self.by_status.entry(outcome.status).or_default() += 1;
        if outcome.status != 402 {
            self.spans.push((outcome.seq, outcome.span));
        }
        match outcome.status {
            200 => {}
            402 => {
                let code = outcome.code.clone().unwrap_or_else(|| "no_code".into());
                *self.refusals.entry(code.clone()).or_default() += 1;
                self.refused.push(Refused {
                    seq: outcome.seq,
                    key: outcome.key,
                    code,
                    required: outcome.required,
                    span: outcome.span,
                });
            }
            0 => *self.errors.entry("transport".into()).or_default() += 1,
            status => {
                let label = format!("{status} {}", outcome.code.as_deref().unwrap_or("-"));
                *self.errors.entry(label).or_default() += 1;
            }
        }
    }

    pub fn merge(&mut self, other: Sample) {
        self.requests += other.requests;
        self.latencies_ns.extend(other.latencies_ns);
        for (status, count) in other.by_status {
            *self.by_status.entry(status).or_default() += count;
        }
        for (code, count) in other.refusals {
            *self.refusals.entry(code).or_default() += count;
        }
        for (code, count) in other.errors {
            *self.errors.entry(code).or_default() += count;
        }
        self.refused.extend(other.refused);
        self.spans.extend(other.spans);
        self.late += other.late;
        self.unsent += other.unsent;
    }

    /// Sort the latencies; percentiles need it.
    pub fn finish(&mut self, elapsed: Duration, cpu: Option<Duration>) {
        self.latencies_ns.sort_unstable();
        self.elapsed = elapsed;
        self.cpu = cpu;
    }

    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency percentile `q` (0..=1) in microseconds (nearest rank).
    pub fn percentile_us(&self, q: f64) -> f64 {
        percentile(&self.latencies_ns, q) / 1e3
    }

    /// Database statements per request (cluster mode).
    pub fn statements_per_request(&self) -> Option<f64> {
        self.db_statements.map(|n| n as f64 / self.requests.max(1) as f64)
    }

    /// The database's CPU per request (cluster mode), in microseconds.
    pub fn db_cpu_per_request_us(&self) -> Option<f64> {
        self.db_cpu.map(|cpu| cpu.as_secs_f64() * 1e6 / self.requests.max(1) as f64)
    }

    pub fn cpu_per_request_us(&self) -> Option<f64> {
        self.cpu.map(|cpu| cpu.as_secs_f64() * 1e6 / self.requests.max(1) as f64)
    }

    /// The store threads' part of [`Sample::cpu_per_request_us`].
    pub fn store_cpu_per_request_us(&self) -> Option<f64> {
        self.store_cpu.map(|cpu| cpu.as_secs_f64() * 1e6 / self.requests.max(1) as f64)
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn refusal_count(&self) -> u64 {
        self.refusals.values().sum()
    }
}

/// Nearest-rank percentile of sorted values (as f64); 0 when empty.
pub fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// A median over rounds with the smallest and largest round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` when there is nothing to summarise.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut values: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let middle = values.len() / 2;
        let median =
            if values.len() % 2 == 0 { (values[middle - 1] + values[middle]) / 2.0 } else { values[middle] };
        Some(Spread { median, min: values[0], max: values[values.len() - 1] })
    }

    /// `median (min..max)` with `decimals` places.
    pub fn text(&self, decimals: usize) -> String {
        format!("{:.decimals$} ({:.decimals$}..{:.decimals$})", self.median, self.min, self.max)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"median": self.median, "min": self.min, "max": self.max})
    }
}

/// Per-round values of `f(a) op f(b)` for two modes measured in the same
/// rounds (same round, same machine noise), then their spread.
pub fn paired(a: &[Sample], b: &[Sample], f: impl Fn(&Sample, &Sample) -> Option<f64>) -> Option<Spread> {
    let values: Vec<f64> = a.iter().zip(b).filter_map(|(x, y)| f(x, y)).collect();
    Spread::of(&values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&values, 0.5), 500.0, "p50");
        assert_eq!(percentile(&values, 0.99), 990.0, "p99");
        assert_eq!(percentile(&values, 0.999), 999.0, "p99.9");
        assert_eq!(percentile(&values, 1.0), 1000.0, "max");
        assert_eq!(percentile(&[], 0.5), 0.0, "empty");
    }

    #[test]
    fn spread_is_median_with_min_and_max() {
        let spread = Spread::of(&[3.0, 1.0, 2.0, f64::NAN]).expect("values");
        assert_eq!((spread.median, spread.min, spread.max), (2.0, 1.0, 3.0), "NaN ignored");
        assert_eq!(Spread::of(&[1.0, 2.0]).map(|s| s.median), Some(1.5), "even count");
        assert!(Spread::of(&[]).is_none(), "nothing to summarise");
    }
}
