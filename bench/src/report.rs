//! The report: a human table on stdout and the same numbers as JSON.
//!
//! Per mode, each figure is the median over rounds of that round's figure;
//! ratios are computed per round (both modes ran in the same round, under the
//! same machine noise) and shown as median (min..max).

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use crate::settings::LoadShape;
use crate::sse::SseSample;
use crate::stats::{paired, percentile, Sample, Spread};

pub const DIRECT: &str = "direct";
/// The bare hyper proxy: the reference every proxy mode is a ratio to.
pub const HYPER_PROXY: &str = "hyper-proxy";
pub const PASSTHROUGH: &str = "passthrough";
/// The bare proxy plus the least a pass-through route must add (key auth).
pub const AUTH_FLOOR: &str = "auth-floor";
/// The bare proxy plus the least a metered route must add.
pub const METER_FLOOR: &str = "meter-floor";
pub const NGINX: &str = "nginx";
pub const METERED: &str = "metered";
pub const METERED_WT_OFF: &str = "metered-wt-off";
pub const CLUSTER: &str = "cluster";
/// The cluster's traffic over as many single-node gateways, each with
/// books of its own: the cost of splitting it, without shared books.
pub const SPLIT: &str = "split";

/// Each gateway route and the floor under it.
const ROUTE_FLOORS: [(&str, &str); 2] = [(PASSTHROUGH, AUTH_FLOOR), (METERED, METER_FLOOR)];

/// Cluster mode's figures over the whole run, from the replicas' metrics.
#[derive(Debug, Clone)]
pub struct ClusterFigures {
    pub replicas: usize,
    pub lease_draw: crate::cluster::BucketP99,
    pub outbox_lag: crate::cluster::BucketP99,
    /// The statements the database ran most often, with their calls.
    pub top_statements: Vec<(u64, String)>,
    /// The statements replicas sent most often.
    pub most_sent_statements: Vec<(u64, String)>,
    /// The wallets that drew the most leases.
    pub lease_churn: Vec<String>,
}

/// Everything measured, by mode, one entry per round.
#[derive(Debug, Default)]
pub struct Results {
    pub shape: Option<LoadShape>,
    pub seconds: u64,
    pub rounds: usize,
    pub modes: Vec<(&'static str, Vec<Sample>)>,
    pub c1_seconds: u64,
    pub c1: Vec<(&'static str, Vec<Sample>)>,
    pub sse_streams: usize,
    pub sse_frames: u64,
    pub sse_pace_ms: u64,
    pub sse: Vec<(&'static str, Vec<SseSample>)>,
    pub cluster: Option<ClusterFigures>,
    pub notes: Vec<String>,
}

fn find<'a, T>(list: &'a [(&'static str, Vec<T>)], mode: &str) -> Option<&'a [T]> {
    list.iter().find(|(name, _)| *name == mode).map(|(_, samples)| samples.as_slice())
}

/// Median over rounds of `f`.
fn over_rounds(samples: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> Option<Spread> {
    Spread::of(&samples.iter().filter_map(f).collect::<Vec<_>>())
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.decimals$}"))
}

const QUANTILES: [(&str, f64); 4] = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)];

fn mode_table(text: &mut String, list: &[(&'static str, Vec<Sample>)], json: &mut Map<String, Value>) {
    let _ = writeln!(
        text,
        "{:<15} {:>9} {:>8} {:>8} {:>8} {:>9} {:>11} {:>7} {:>7}",
        "mode", "req/s", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "CPU µs/req", "402s", "errors"
    );
    for (mode, samples) in list {
        let throughput = over_rounds(samples, |s| Some(s.throughput()));
        let quantiles: Vec<Option<Spread>> =
            QUANTILES.iter().map(|(_, q)| over_rounds(samples, |s| Some(s.percentile_us(*q)))).collect();
        let cpu = over_rounds(samples, Sample::cpu_per_request_us);
        let refused: u64 = samples.iter().map(Sample::refusal_count).sum();
        let errors: u64 = samples.iter().map(Sample::error_count).sum();
        let _ = writeln!(
            text,
            "{mode:<15} {:>9} {:>8} {:>8} {:>8} {:>9} {:>11} {refused:>7} {errors:>7}",
            cell(throughput.map(|s| s.median), 0),
            cell(quantiles[0].map(|s| s.median), 0),
            cell(quantiles[1].map(|s| s.median), 0),
            cell(quantiles[2].map(|s| s.median), 0),
            cell(quantiles[3].map(|s| s.median), 0),
            cell(cpu.map(|s| s.median), 1),
        );
        let mut entry = Map::new();
        entry.insert("rounds".into(), json!(samples.len()));
        entry.insert("requests".into(), json!(samples.iter().map(|s| s.requests).sum::<u64>()));
        entry.insert("throughput_rps".into(), throughput.map_or(Value::Null, |s| s.json()));
        for ((name, _), spread) in QUANTILES.iter().zip(&quantiles) {
            entry.insert(format!("{}_us", name.replace('.', "")), spread.map_or(Value::Null, |s| s.json()));
        }
        entry.insert("gateway_cpu_us_per_request".into(), cpu.map_or(Value::Null, |s| s.json()));
        let store = over_rounds(samples, Sample::store_cpu_per_request_us);
        entry.insert("store_threads_cpu_us_per_request".into(), store.map_or(Value::Null, |s| s.json()));
        entry.insert("refusals_402_by_code".into(), json!(merged(samples, |s| &s.refusals)));
        entry.insert("errors_by_status".into(), json!(merged(samples, |s| &s.errors)));
        entry.insert("late".into(), json!(samples.iter().map(|s| s.late).sum::<u64>()));
        entry.insert("unsent".into(), json!(samples.iter().map(|s| s.unsent).sum::<u64>()));
        json.insert((*mode).to_owned(), Value::Object(entry));
    }
    // What durable writes cost, apart from the request path: the CPU
    // column's part on the threads that write the store.
    let stores: Vec<String> = list
        .iter()
        .filter_map(|(mode, samples)| {
            let store = over_rounds(samples, Sample::store_cpu_per_request_us)?;
            (store.max > 0.0).then(|| format!("{mode} {}", store.text(1)))
        })
        .collect();
    if !stores.is_empty() {
        let _ = writeln!(
            text,
            "  of CPU µs/req, on the store's threads (writer, sled's IO, historian): {}",
            stores.join(", ")
        );
    }
}

fn merged(
    samples: &[Sample],
    f: impl Fn(&Sample) -> &std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<String, u64> {
    let mut total = std::collections::BTreeMap::new();
    for sample in samples {
        for (code, count) in f(sample) {
            *total.entry(code.clone()).or_default() += count;
        }
    }
    total
}

/// One ratio line: `name  median (min..max)  note`.
fn ratio(
    text: &mut String,
    json: &mut Map<String, Value>,
    key: &str,
    label: &str,
    spread: Option<Spread>,
    note: &str,
) {
    if let Some(spread) = spread {
        // Ratios get two decimals, microseconds one.
        let decimals = if label.ends_with("(µs)") { 1 } else { 2 };
        let _ = writeln!(text, "  {label:<44} {:<26} {note}", spread.text(decimals));
        json.insert(key.to_owned(), spread.json());
    }
}

/// Each process's resident memory at the end of each of its rounds (in
/// round order, so growth over a long run shows) and at its peak while the
/// round ran (memory that lives only under load is gone by its end), each
/// against the bare proxy's in the same round. The anonymous part at the end
/// of each round is shown too: resident memory also counts the code mapped
/// from each binary, and the gateway's binary (admin API, cluster mode, TLS,
/// the CLI) has five times the bare proxy's code.
fn memory_section(results: &Results, text: &mut String, json: &mut Map<String, Value>) {
    let mb = |kb: u64| kb as f64 / 1024.0;
    type Reading = fn(&Sample) -> Option<u64>;
    let readings: [(&str, &str, &str, Reading); 3] = [
        ("resident memory (MB) at the end of each round, in order:", "", "", |s| s.rss_kb),
        (
            "peak resident memory (MB) while each round ran (read every 200 ms), in order:",
            "_peak",
            ", peak under load",
            |s| s.rss_peak_kb,
        ),
        (
            "anonymous resident memory (MB: RssAnon, heap and stacks) at the end of each round, in order:",
            "_anon",
            ", anonymous",
            |s| s.rss_anon_kb,
        ),
    ];
    for (heading, suffix, label, reading) in readings {
        let measured: Vec<_> = results
            .modes
            .iter()
            .filter_map(|(mode, samples)| {
                let rounds: Vec<f64> = samples.iter().filter_map(|s| reading(s).map(mb)).collect();
                (!rounds.is_empty()).then_some((*mode, rounds))
            })
            .collect();
        if measured.is_empty() {
            continue;
        }
        let _ = writeln!(text, "{heading}");
        let mut rows = Map::new();
        for (mode, rounds) in &measured {
            let list: Vec<String> = rounds.iter().map(|v| format!("{v:.1}")).collect();
            let _ = writeln!(text, "  {mode:<15} {}", list.join(" "));
            rows.insert((*mode).to_owned(), json!(rounds));
        }
        if suffix.is_empty() {
            json.extend(rows);
        } else {
            json.insert(format!("rss{suffix}_mb"), Value::Object(rows));
        }
        let get = |mode| find(&results.modes, mode).unwrap_or(&[]);
        let rss = |a: &Sample, b: &Sample| Some(mb(reading(a)?) / mb(reading(b)?.max(1)));
        // The target is on memory under load: the peak while the round ran.
        let target = if suffix == "_peak" { "target ≤ 2.00" } else { "" };
        for mode in [PASSTHROUGH, METER_FLOOR, METERED] {
            ratio(
                text,
                json,
                &format!("{}_over_hyper_proxy_rss{suffix}", mode.replace('-', "_")),
                &format!("{mode} / hyper-proxy resident memory{label}"),
                paired(get(mode), get(HYPER_PROXY), rss),
                if mode == METERED { target } else { "" },
            );
        }
        ratio(
            text,
            json,
            &format!("metered_over_meter_floor_rss{suffix}"),
            &format!("metered / meter-floor resident memory{label}"),
            paired(get(METERED), get(METER_FLOOR), rss),
            "",
        );
    }
}

fn ratios(results: &Results, text: &mut String, json: &mut Map<String, Value>) {
    let get = |mode| find(&results.modes, mode).unwrap_or(&[]);
    let throughput = |a: &Sample, b: &Sample| Some(a.throughput() / b.throughput());
    let cpu = |a: &Sample, b: &Sample| Some(a.cpu_per_request_us()? / b.cpu_per_request_us()?);
    let added_p50 = |a: &Sample, b: &Sample| Some(a.percentile_us(0.5) - b.percentile_us(0.5));
    let added_p99 = |a: &Sample, b: &Sample| Some(a.percentile_us(0.99) - b.percentile_us(0.99));
    let _ = writeln!(text, "ratios, per round, median (min..max):");
    for (mode, key) in [(METERED, "metered"), (METERED_WT_OFF, "metered_wt_off"), (NGINX, "nginx")] {
        let target = |t: &str| if mode == METERED { t.to_owned() } else { String::new() };
        ratio(
            text,
            json,
            &format!("{key}_over_passthrough_throughput"),
            &format!("{mode} / passthrough throughput"),
            paired(get(mode), get(PASSTHROUGH), throughput),
            &target("target ≥ 0.85"),
        );
        ratio(
            text,
            json,
            &format!("{key}_over_passthrough_cpu_per_request"),
            &format!("{mode} / passthrough CPU per request"),
            paired(get(mode), get(PASSTHROUGH), cpu),
            &target("target ≤ 1.25"),
        );
    }
    // Against what a user would run instead (issue 17's targets).
    for mode in [AUTH_FLOOR, METER_FLOOR, PASSTHROUGH, NGINX, METERED, METERED_WT_OFF] {
        let key = mode.replace('-', "_");
        let cpu_target = match mode {
            METERED => "target ≤ 1.25",
            PASSTHROUGH => "target ≤ 1.10",
            _ => "",
        };
        ratio(
            text,
            json,
            &format!("{key}_over_hyper_proxy_throughput"),
            &format!("{mode} / hyper-proxy throughput"),
            paired(get(mode), get(HYPER_PROXY), throughput),
            "",
        );
        ratio(
            text,
            json,
            &format!("{key}_over_hyper_proxy_cpu_per_request"),
            &format!("{mode} / hyper-proxy CPU per request"),
            paired(get(mode), get(HYPER_PROXY), cpu),
            cpu_target,
        );
    }
    // Each route against the least its job needs.
    for (mode, floor) in ROUTE_FLOORS {
        let key = format!("{}_over_{}", mode.replace('-', "_"), floor.replace('-', "_"));
        ratio(
            text,
            json,
            &format!("{key}_cpu_per_request"),
            &format!("{mode} / {floor} CPU per request"),
            paired(get(mode), get(floor), cpu),
            "",
        );
    }
    ratio(
        text,
        json,
        "write_through_on_over_off_throughput",
        "write-through on / off throughput",
        paired(get(METERED), get(METERED_WT_OFF), throughput),
        "target ≥ 0.95",
    );
    for mode in [HYPER_PROXY, AUTH_FLOOR, METER_FLOOR, PASSTHROUGH, NGINX, METERED, METERED_WT_OFF] {
        let key = mode.replace('-', "_");
        ratio(
            text,
            json,
            &format!("{key}_added_p50_us"),
            &format!("{mode} added p50 over direct (µs)"),
            paired(get(mode), get(DIRECT), added_p50),
            "",
        );
        ratio(
            text,
            json,
            &format!("{key}_added_p99_us"),
            &format!("{mode} added p99 over direct (µs)"),
            paired(get(mode), get(DIRECT), added_p99),
            "",
        );
    }
}

/// Cluster mode against the single node, per round, and what the shared
/// books cost.
fn cluster_section(results: &Results, text: &mut String, json: &mut Map<String, Value>) {
    let Some(figures) = &results.cluster else { return };
    let cluster = find(&results.modes, CLUSTER).unwrap_or(&[]);
    let metered = find(&results.modes, METERED).unwrap_or(&[]);
    let _ =
        writeln!(text, "cluster ({} replicas on one PostgreSQL) against the single node:", figures.replicas);
    let cpu = |a: &Sample, b: &Sample| Some(a.cpu_per_request_us()? / b.cpu_per_request_us()?);
    let throughput = |a: &Sample, b: &Sample| Some(a.throughput() / b.throughput());
    ratio(
        text,
        json,
        "cluster_over_metered_cpu_per_request",
        "cluster / metered CPU per request",
        paired(cluster, metered, cpu),
        "target ≤ 1.10 (replicas' CPU; the database's below)",
    );
    // The figure read whole: the replicas and their database
    // against the single node (which has no database process).
    let with_database = |a: &Sample, b: &Sample| {
        Some((a.cpu_per_request_us()? + a.db_cpu_per_request_us()?) / b.cpu_per_request_us()?)
    };
    ratio(
        text,
        json,
        "cluster_with_database_over_metered_cpu_per_request",
        "cluster + database / metered CPU per request",
        paired(cluster, metered, with_database),
        "the same target, the database's CPU counted in",
    );
    let split = find(&results.modes, SPLIT).unwrap_or(&[]);
    if !split.is_empty() {
        ratio(
            text,
            json,
            "split_over_metered_cpu_per_request",
            "split / metered CPU per request",
            paired(split, metered, cpu),
            "the floor: same traffic over single nodes",
        );
        ratio(
            text,
            json,
            "cluster_over_split_cpu_per_request",
            "cluster / split CPU per request",
            paired(cluster, split, cpu),
            "what the shared books add",
        );
    }
    ratio(
        text,
        json,
        "cluster_over_metered_throughput",
        "cluster / metered throughput",
        paired(cluster, metered, throughput),
        "",
    );
    let statements = over_rounds(cluster, Sample::statements_per_request);
    if let Some(spread) = statements {
        let _ = writeln!(
            text,
            "  {:<44} {:<26} target ≤ 0.01",
            "database statements per request",
            spread.text(4)
        );
        json.insert("db_statements_per_request".into(), spread.json());
    }
    let total: u64 = cluster.iter().filter_map(|s| s.db_statements).sum();
    json.insert("db_statements".into(), json!(total));
    ratio(
        text,
        json,
        "db_cpu_us_per_request",
        "database CPU per request (µs)",
        over_rounds(cluster, Sample::db_cpu_per_request_us),
        "",
    );
    for (key, label, p99) in [
        ("lease_draw_p99_ms", "lease draw", figures.lease_draw),
        ("outbox_lag_p99_ms", "outbox lag (settle to shipped)", figures.outbox_lag),
    ] {
        let ms = p99.seconds.map(|s| s * 1e3);
        let _ = writeln!(
            text,
            "  {:<44} {:<26} {} observations, bucket bound",
            format!("{label} p99 (ms)"),
            cell(ms, 2),
            p99.count
        );
        json.insert(key.into(), json!({ "p99_ms_at_most": ms, "observations": p99.count }));
    }
    let _ = writeln!(text, "  statements by time spent (calls, total and mean time over the whole run):");
    for (calls, query) in &figures.top_statements {
        let _ = writeln!(text, "    {calls:>9}  {query}");
    }
    json.insert("top_statements".into(), json!(figures.top_statements));
    let _ = writeln!(text, "  statements sent most often (top level, over the whole run):");
    for (calls, query) in &figures.most_sent_statements {
        let _ = writeln!(text, "    {calls:>9}  {query}");
    }
    json.insert("most_sent_statements".into(), json!(figures.most_sent_statements));
    let _ = writeln!(text, "  wallets by leases drawn:");
    for line in &figures.lease_churn {
        let _ = writeln!(text, "    {line}");
    }
    json.insert("lease_churn".into(), json!(figures.lease_churn));
}

fn c1_section(results: &Results, text: &mut String, json: &mut Map<String, Value>) {
    if results.c1.is_empty() {
        return;
    }
    let _ = writeln!(
        text,
        "\nconcurrency 1 (closed loop, one small chat request at a time, {} × {} s per mode):",
        results.rounds, results.c1_seconds
    );
    let mut modes = Map::new();
    mode_table(text, &results.c1, &mut modes);
    json.insert("modes".into(), Value::Object(modes));
    let get = |mode| find(&results.c1, mode).unwrap_or(&[]);
    let added_p50 = |a: &Sample, b: &Sample| Some(a.percentile_us(0.5) - b.percentile_us(0.5));
    let added_p99 = |a: &Sample, b: &Sample| Some(a.percentile_us(0.99) - b.percentile_us(0.99));
    for mode in [HYPER_PROXY, AUTH_FLOOR, METER_FLOOR, PASSTHROUGH, NGINX, METERED, METERED_WT_OFF] {
        if find(&results.c1, mode).is_none() {
            continue;
        }
        ratio(
            text,
            json,
            &format!("{mode}_added_p50_us"),
            &format!("{mode} added p50 over direct (µs)"),
            paired(get(mode), get(DIRECT), added_p50),
            if mode == METERED { "target ≤ 100" } else { "" },
        );
        ratio(
            text,
            json,
            &format!("{mode}_added_p99_us"),
            &format!("{mode} added p99 over direct (µs)"),
            paired(get(mode), get(DIRECT), added_p99),
            "",
        );
    }
    // What a request at idle pays on top of the bare proxy's hop (issue 17).
    let added = |q: f64| move |a: &Sample, b: &Sample| Some(a.percentile_us(q) - b.percentile_us(q));
    for mode in [AUTH_FLOOR, METER_FLOOR, PASSTHROUGH, METERED] {
        if find(&results.c1, mode).is_none() {
            continue;
        }
        let targets = if mode == METERED { ["target ≤ +15", "target ≤ +40"] } else { ["", ""] };
        for ((name, q), target) in [("p50", 0.5), ("p99", 0.99)].into_iter().zip(targets) {
            ratio(
                text,
                json,
                &format!("{}_added_{name}_over_hyper_proxy_us", mode.replace('-', "_")),
                &format!("{mode} added {name} over hyper-proxy (µs)"),
                paired(get(mode), get(HYPER_PROXY), added(q)),
                target,
            );
        }
    }
    for (mode, floor) in ROUTE_FLOORS {
        if find(&results.c1, floor).is_none() {
            continue;
        }
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            ratio(
                text,
                json,
                &format!("{mode}_added_{name}_over_{}_us", floor.replace('-', "_")),
                &format!("{mode} added {name} over {floor} (µs)"),
                paired(get(mode), get(floor), added(q)),
                "",
            );
        }
    }
}

fn sse_section(results: &Results, text: &mut String, json: &mut Map<String, Value>) {
    if results.sse.is_empty() {
        return;
    }
    let _ = writeln!(
        text,
        "\nSSE ({} rounds × {} streams × {} events, {} ms apart): delay mock write → client read",
        results.rounds, results.sse_streams, results.sse_frames, results.sse_pace_ms
    );
    let _ = writeln!(
        text,
        "{:<15} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "mode", "events", "p50 µs", "p99 µs", "max µs", "coalesced", "unmatched"
    );
    let mut modes = Map::new();
    for (mode, samples) in &results.sse {
        let q = |q: f64| {
            Spread::of(&samples.iter().map(|s| percentile(&s.delays_ns, q) / 1e3).collect::<Vec<_>>())
        };
        let (p50, p99, max) = (q(0.5), q(0.99), q(1.0));
        let events: u64 = samples.iter().map(|s| s.events).sum();
        let coalesced: u64 = samples.iter().map(|s| s.coalesced).sum();
        let unmatched: u64 = samples.iter().map(|s| s.unmatched + s.failed).sum();
        let _ = writeln!(
            text,
            "{mode:<15} {events:>7} {:>10} {:>10} {:>10} {coalesced:>10} {unmatched:>10}",
            cell(p50.map(|s| s.median), 1),
            cell(p99.map(|s| s.median), 1),
            cell(max.map(|s| s.median), 1),
        );
        modes.insert(
            (*mode).to_owned(),
            json!({"events": events, "delay_p50_us": p50.map(|s| s.json()), "delay_p99_us": p99.map(|s| s.json()),
                   "delay_max_us": max.map(|s| s.json()), "coalesced_reads": coalesced, "unmatched_events": unmatched}),
        );
    }
    json.insert("modes".into(), Value::Object(modes));
    let get = |mode| find(&results.sse, mode).unwrap_or(&[]);
    let pooled = |mode| {
        let mut all: Vec<u64> = get(mode).iter().flat_map(|s| s.delays_ns.iter().copied()).collect();
        all.sort_unstable();
        all
    };
    let direct = pooled(DIRECT);
    let _ = writeln!(
        text,
        "added per-event delay over direct, all rounds' events pooled; per round: median (min..max)"
    );
    // nginx (when installed) is the reference: what one established proxy
    // hop with buffering off adds on the same machine.
    for mode in [HYPER_PROXY, AUTH_FLOOR, METER_FLOOR, PASSTHROUGH, NGINX, METERED, METERED_WT_OFF] {
        if find(&results.sse, mode).is_none() {
            continue;
        }
        let events = pooled(mode);
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            let added = (percentile(&events, q) - percentile(&direct, q)) / 1e3;
            let per_round = Spread::of(
                &get(mode)
                    .iter()
                    .zip(get(DIRECT))
                    .map(|(a, b)| (percentile(&a.delays_ns, q) - percentile(&b.delays_ns, q)) / 1e3)
                    .collect::<Vec<_>>(),
            );
            let target = if mode == METERED && name == "p99" { "target ≤ 10" } else { "" };
            let rounds = per_round.map(|s| s.text(1)).unwrap_or_default();
            let _ = writeln!(text, "  {mode:<12} {name} {added:>8.1} µs   per round {rounds:<26} {target}");
            json.insert(
                format!("{mode}_added_gap_{name}_us"),
                json!({"pooled": added, "per_round": per_round.map(|s| s.json())}),
            );
        }
    }
}

/// The human report and the JSON report.
pub fn render(results: &Results) -> (String, Value) {
    let mut text = String::new();
    let mut json = Map::new();
    let shape = match results.shape {
        Some(LoadShape::Closed { concurrency }) => format!("closed loop, concurrency {concurrency}"),
        Some(LoadShape::Open { rate, max_in_flight, late_ms }) => {
            format!("open loop, {rate} req/s (latency from intended send time; late > {late_ms} ms, at most {max_in_flight} in flight)")
        }
        None => "–".into(),
    };
    let _ = writeln!(
        text,
        "\n{shape}; {} rounds × {} s per mode; medians over rounds",
        results.rounds, results.seconds
    );
    json.insert("load".into(), json!(shape));
    json.insert("rounds".into(), json!(results.rounds));
    json.insert("seconds_per_mode".into(), json!(results.seconds));
    let mut modes = Map::new();
    mode_table(&mut text, &results.modes, &mut modes);
    json.insert("modes".into(), Value::Object(modes));
    for (mode, samples) in &results.modes {
        let refusals = merged(samples, |s| &s.refusals);
        let errors = merged(samples, |s| &s.errors);
        let (late, unsent): (u64, u64) = samples.iter().fold((0, 0), |(l, u), s| (l + s.late, u + s.unsent));
        if !refusals.is_empty() {
            let _ = writeln!(text, "  {mode}: 402 by code {refusals:?}");
        }
        if !errors.is_empty() {
            let _ = writeln!(text, "  {mode}: errors {errors:?}");
        }
        if late + unsent > 0 {
            let _ = writeln!(text, "  {mode}: {late} sent late, {unsent} not sent (too many in flight)");
        }
    }
    let mut ratio_json = Map::new();
    ratios(results, &mut text, &mut ratio_json);
    json.insert("ratios".into(), Value::Object(ratio_json));
    let mut memory = Map::new();
    memory_section(results, &mut text, &mut memory);
    json.insert("resident_memory".into(), Value::Object(memory));
    let mut cluster = Map::new();
    cluster_section(results, &mut text, &mut cluster);
    json.insert("cluster".into(), Value::Object(cluster));
    let mut c1 = Map::new();
    c1_section(results, &mut text, &mut c1);
    json.insert("concurrency_1".into(), Value::Object(c1));
    let mut sse = Map::new();
    sse_section(results, &mut text, &mut sse);
    json.insert("sse".into(), Value::Object(sse));
    for note in &results.notes {
        let _ = writeln!(text, "note: {note}");
    }
    json.insert("notes".into(), json!(results.notes));
    (text, Value::Object(json))
}
