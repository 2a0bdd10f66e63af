//! Driving load at one target for one phase: closed loop (fixed concurrency)
//! or open loop (fixed send schedule), with a progress line once a second.
//!
//! Open loop measures each request from the time it was meant to be sent, so
//! a slow answer cannot hide the requests that should have gone out meanwhile
//! (no coordinated omission); requests sent late, and requests not sent
//! because too many were in flight, are counted.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use rust_decimal::Decimal;
use tokio::sync::mpsc;

use crate::client::{self, Http};
use crate::cpu::CpuSource;
use crate::mix::{Mix, Spec};
use crate::settings::LoadShape;
use crate::stats::{run_ns, Outcome, Sample, Span};

/// Where a phase sends its requests.
#[derive(Clone)]
pub struct Target {
    /// `host:port` of each listener; requests go round the list by number.
    pub addrs: Arc<[String]>,
    /// A `Host` header to send (picks the gateway's pass-through route).
    pub host: Option<&'static str>,
    /// Key secrets by mix key index, one set per address (gateways that
    /// minted keys of their own) or one set for all; empty: no key.
    pub keys: Arc<[Vec<String>]>,
    /// Whose CPU the phase is charged with.
    pub cpu: CpuSource,
}

/// Numbers requests across the whole run and names them: the request id is a
/// UUID carrying the run id and the sequence number, which the gateway keeps
/// and passes to the mock in [`LOAD_REQUEST_ID`]; the gateway keys its
/// ledger by an id of its own, which the mock sees as `x-request-id`.
/// An end-to-end header the gateway forwards untouched: how the mock's
/// journal names the harness's request.
pub const LOAD_REQUEST_ID: &str = "x-load-request-id";

#[derive(Debug)]
pub struct Sequencer {
    run: u32,
    next: AtomicU64,
}

impl Target {
    /// The listener request number `seq` goes to.
    pub fn addr(&self, seq: u64) -> &str {
        let count = self.addrs.len().max(1) as u64;
        self.addrs.get((seq % count) as usize).map_or("", String::as_str)
    }

    /// The secret of mix key `index` at the listener request `seq` goes to.
    pub fn key(&self, seq: u64, index: usize) -> Option<&str> {
        let sets = self.keys.len() as u64;
        if sets == 0 {
            return None;
        }
        let count = self.addrs.len().max(1) as u64;
        self.keys[((seq % count) % sets) as usize].get(index).map(String::as_str)
    }
}

impl Sequencer {
    pub fn new() -> Sequencer {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Sequencer { run: nanos ^ std::process::id().rotate_left(16), next: AtomicU64::new(1) }
    }

    /// The number the next request will get.
    pub fn peek(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    pub fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The id the harness gives request `seq`, sent as [`LOAD_REQUEST_ID`]
    /// (and as `x-request-id`, which the gateway replaces with its own).
    pub fn request_id(&self, seq: u64) -> String {
        format!("{:08x}-0000-4000-8000-{:012x}", self.run, seq & 0xffff_ffff_ffff)
    }

    /// The sequence number of one of this run's request ids (hyphenated or not).
    pub fn seq_of(&self, request_id: &str) -> Option<u64> {
        let hex: String = request_id.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 || !hex[..8].eq_ignore_ascii_case(&format!("{:08x}", self.run)) {
            return None;
        }
        u64::from_str_radix(&hex[20..], 16).ok()
    }
}

impl Default for Sequencer {
    fn default() -> Self {
        Sequencer::new()
    }
}

/// One phase: a target, a mix and how to drive it.
pub struct Phase<'a> {
    pub http: &'a Http,
    pub target: &'a Target,
    pub mix: &'a Mix,
    pub shape: LoadShape,
    pub duration: Duration,
    pub sequencer: &'a Arc<Sequencer>,
    /// Shown on progress lines; `None` prints none.
    pub progress: Option<String>,
}

pub fn build_request(
    target: &Target,
    sequencer: &Sequencer,
    spec: &Spec,
) -> anyhow::Result<Request<Full<Bytes>>> {
    let mut request = Request::post(format!("http://{}{}", target.addr(spec.seq), spec.path()))
        .header("content-type", "application/json")
        .header("x-request-id", sequencer.request_id(spec.seq))
        .header(LOAD_REQUEST_ID, sequencer.request_id(spec.seq));
    if let Some(key) = target.key(spec.seq, spec.key) {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    if let Some(host) = target.host {
        request = request.header("host", host);
    }
    Ok(request.body(Full::new(spec.body.clone()))?)
}

/// Send one request; time it from `since`.
async fn send(http: &Http, target: &Target, sequencer: &Sequencer, spec: &Spec, since: Instant) -> Outcome {
    let sent_ns = run_ns(Instant::now());
    let mut outcome = Outcome {
        seq: spec.seq,
        key: spec.key,
        latency_ns: 0,
        status: 0,
        code: None,
        required: None,
        span: Span { sent_ns, ended_ns: sent_ns },
    };
    if let Ok(request) = build_request(target, sequencer, spec) {
        let call = if spec.abandon {
            client::call_and_hang_up(http, request).await
        } else {
            client::call(http, request).await
        };
        if let Ok((status, body)) = call {
            outcome.status = status;
            if status != 200 {
                outcome.code = client::error_code(&body);
                outcome.required = required(&body);
            }
        }
    }
    let ended = Instant::now();
    outcome.latency_ns = ended.duration_since(since).as_nanos() as u64;
    outcome.span.ended_ns = run_ns(ended);
    outcome
}

fn required(body: &[u8]) -> Option<Decimal> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.pointer("/error/required")?.as_str()?.parse().ok()
}

/// How often resident memory is read while a phase runs.
pub const RSS_EVERY: Duration = Duration::from_millis(200);

pub async fn run(phase: Phase<'_>) -> anyhow::Result<Sample> {
    let done = Arc::new(AtomicU64::new(0));
    let stop_progress = Arc::new(AtomicBool::new(false));
    let rss_peak = tokio::spawn(peak_rss(phase.target.cpu.clone(), stop_progress.clone()));
    let expected = match phase.shape {
        LoadShape::Open { rate, .. } => Some((f64::from(rate) * phase.duration.as_secs_f64()) as u64),
        LoadShape::Closed { .. } => None,
    };
    let progress = phase.progress.clone().map(|label| {
        tokio::spawn(progress_lines(label, done.clone(), stop_progress.clone(), phase.duration, expected))
    });
    let cpu_before = phase.target.cpu.read();
    let store_before = phase.target.cpu.read_store_threads();
    let started = Instant::now();
    let driven = match phase.shape {
        LoadShape::Closed { concurrency } => closed_loop(&phase, concurrency, &done).await,
        LoadShape::Open { rate, max_in_flight, late_ms } => {
            open_loop(&phase, rate, max_in_flight, Duration::from_millis(late_ms), &done).await
        }
    };
    let elapsed = started.elapsed();
    let cpu = phase.target.cpu.read().zip(cpu_before).map(|(after, before)| after.saturating_sub(before));
    let store_cpu = phase
        .target
        .cpu
        .read_store_threads()
        .zip(store_before)
        .map(|(after, before)| after.saturating_sub(before));
    // Stopped whether or not the phase failed, so no reader outlives it.
    stop_progress.store(true, Ordering::Relaxed);
    if let Some(progress) = progress {
        let _ = progress.await;
    }
    let rss_peak_kb = rss_peak.await.ok().flatten();
    let mut sample = driven?;
    sample.finish(elapsed, cpu);
    sample.store_cpu = store_cpu;
    sample.rss_peak_kb = rss_peak_kb;
    Ok(sample)
}

/// The highest resident memory of `cpu`'s processes, read every
/// [`RSS_EVERY`] until `stop`.
async fn peak_rss(cpu: CpuSource, stop: Arc<AtomicBool>) -> Option<u64> {
    let mut peak = cpu.rss_kb()?;
    let mut ticker = tokio::time::interval(RSS_EVERY);
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        peak = peak.max(cpu.rss_kb().unwrap_or(0));
    }
    Some(peak)
}

async fn closed_loop(phase: &Phase<'_>, concurrency: usize, done: &Arc<AtomicU64>) -> anyhow::Result<Sample> {
    let deadline = Instant::now() + phase.duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, target, mix) = (phase.http.clone(), phase.target.clone(), phase.mix.clone());
            let (sequencer, done) = (phase.sequencer.clone(), done.clone());
            tokio::spawn(async move {
                let mut sample = Sample::default();
                while Instant::now() < deadline {
                    let spec = mix.spec(sequencer.next());
                    let outcome = send(&http, &target, &sequencer, &spec, Instant::now()).await;
                    sample.add(outcome);
                    done.fetch_add(1, Ordering::Relaxed);
                }
                sample
            })
        })
        .collect();
    let mut total = Sample::default();
    for worker in workers {
        total.merge(worker.await?);
    }
    Ok(total)
}

/// The schedule runs on its own OS thread: `std::thread::sleep` wakes within
/// tens of microseconds, where a tokio timer rounds up to the next
/// millisecond and would add that to every latency measured from the
/// intended time. Requests are spawned onto the runtime.
async fn open_loop(
    phase: &Phase<'_>,
    rate: u32,
    max_in_flight: usize,
    late: Duration,
    done: &Arc<AtomicU64>,
) -> anyhow::Result<Sample> {
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
    let runtime = tokio::runtime::Handle::current();
    let (http, target, mix) = (phase.http.clone(), phase.target.clone(), phase.mix.clone());
    let (sequencer, done, duration) = (phase.sequencer.clone(), done.clone(), phase.duration);
    let schedule = tokio::task::spawn_blocking(move || {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (mut late_count, mut unsent) = (0, 0);
        let start = Instant::now();
        let deadline = start + duration;
        let mut intended = start;
        while intended < deadline {
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            if Instant::now().duration_since(intended) > late {
                late_count += 1;
            }
            if in_flight.load(Ordering::Relaxed) >= max_in_flight {
                unsent += 1;
            } else {
                in_flight.fetch_add(1, Ordering::Relaxed);
                let (http, target, spec) = (http.clone(), target.clone(), mix.spec(sequencer.next()));
                let (sequencer, tx, in_flight, done) =
                    (sequencer.clone(), tx.clone(), in_flight.clone(), done.clone());
                let since = intended;
                runtime.spawn(async move {
                    let outcome = send(&http, &target, &sequencer, &spec, since).await;
                    let _ = tx.send(outcome);
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    done.fetch_add(1, Ordering::Relaxed);
                });
            }
            intended += interval;
        }
        (late_count, unsent)
    });
    let mut sample = Sample::default();
    // The channel closes once the schedule and every request it spawned are done.
    while let Some(outcome) = rx.recv().await {
        sample.add(outcome);
    }
    let (late_count, unsent) = schedule.await?;
    sample.late = late_count;
    sample.unsent = unsent;
    Ok(sample)
}

async fn progress_lines(
    label: String,
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    duration: Duration,
    expected: Option<u64>,
) {
    let started = Instant::now();
    let mut last = 0;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let now = done.load(Ordering::Relaxed);
        let total = expected.map(|e| format!("/{e}")).unwrap_or_default();
        eprintln!(
            "  {label}: {:>4.0}/{} s  done {now}{total}  {} req/s",
            started.elapsed().as_secs_f64(),
            duration.as_secs(),
            now - last
        );
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_carry_the_sequence_number() {
        let sequencer = Sequencer::new();
        let id = sequencer.request_id(123_456);
        assert_eq!(sequencer.seq_of(&id), Some(123_456), "hyphenated");
        assert_eq!(sequencer.seq_of(&id.replace('-', "")), Some(123_456), "32 hex digits");
        assert_eq!(
            Sequencer { run: sequencer.run ^ 1, next: AtomicU64::new(0) }.seq_of(&id),
            None,
            "other run"
        );
        assert_eq!(sequencer.seq_of("not-an-id"), None, "garbage");
    }

    #[tokio::test]
    async fn the_peak_counts_memory_that_is_gone_by_the_end() {
        let me = CpuSource::Process(std::process::id());
        let stop = Arc::new(AtomicBool::new(false));
        let before = me.rss_kb().unwrap();
        let peak = tokio::spawn(peak_rss(me.clone(), stop.clone()));
        // 64 MiB touched, held across a few readings, then freed.
        let held = vec![1u8; 64 << 20];
        tokio::time::sleep(RSS_EVERY * 3).await;
        assert!(held.iter().step_by(4096).all(|b| *b == 1));
        drop(held);
        stop.store(true, Ordering::Relaxed);
        let peak = peak.await.unwrap().unwrap();
        assert!(peak >= before + (60 << 10), "peak {peak} KiB from {before} KiB");
    }
}
