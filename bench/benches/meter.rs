//! The meter's cost per server-sent event: one OpenAI chat stream (a role
//! chunk, 45 content deltas, the finish chunk, the usage chunk and
//! `[DONE]`), each event in its own chunk as a model's tokens arrive, through
//! `Meter::observe` as the gateway runs it:
//! - `rewriting`: the gateway asked for usage (`include_usage`), so it also
//!   drops the usage-only chunk and every `"usage":null` on the way out;
//! - `scanning`: the client asked for usage itself, so the stream passes
//!   unchanged and is only read.
//!
//! The baseline, in the same run, copies each event once: the least a
//! proxy that looks at an event at all does with it.
//!
//! `cargo bench -p creditgate-bench --bench meter`
//!
//! Target (issue 17): the metered route's CPU per event at most the
//! pass-through route's + 1 µs. The meter is all the metered route adds per
//! event (`bench/profile/callgrind.sh` counts both routes per event).

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use creditgate::meter::Meter;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const DELTAS: usize = 45;

/// The stream as an upstream sends it when usage was asked for: every chunk
/// carries `"usage":null`, and a last chunk with empty `choices` the usage.
fn stream() -> Vec<Bytes> {
    let chunk = |delta: &str, finish: &str| {
        format!(
            "data: {{\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\
             \"created\":1741569952,\"model\":\"gpt-4o-mini-2024-07-18\",\"service_tier\":\"default\",\
             \"system_fingerprint\":\"fp_06737a9306\",\"choices\":[{{\"index\":0,\"delta\":{delta},\
             \"logprobs\":null,\"finish_reason\":{finish}}}],\"usage\":null}}\n\n"
        )
    };
    let mut events = vec![chunk("{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}", "null")];
    for i in 0..DELTAS {
        events.push(chunk(&format!("{{\"content\":\" word{i}\"}}"), "null"));
    }
    events.push(chunk("{}", "\"stop\""));
    events.push(
        "data: {\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\
         \"created\":1741569952,\"model\":\"gpt-4o-mini-2024-07-18\",\"service_tier\":\"default\",\
         \"system_fingerprint\":\"fp_06737a9306\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\
         \"completion_tokens\":45,\"total_tokens\":64,\"prompt_tokens_details\":{\"cached_tokens\":0,\
         \"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0,\
         \"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}\n\n"
            .to_owned(),
    );
    events.push("data: [DONE]\n\n".to_owned());
    events.into_iter().map(Bytes::from).collect()
}

/// One stream through a fresh meter: the bytes the client gets, and the usage.
fn meter(events: &[Bytes], strip_injected_usage: bool) -> (usize, Option<u64>) {
    let mut meter = Meter::new(true, strip_injected_usage);
    let mut sent = 0;
    for event in events {
        sent += meter.observe(event.clone()).len();
    }
    sent += meter.end_of_body().len();
    (sent, meter.finish().output_tokens)
}

fn per_event(c: &mut Criterion) {
    let events = stream();
    let total: usize = events.iter().map(Bytes::len).sum();
    // What each mode must do, checked before it is timed.
    let (rewritten, usage) = meter(&events, true);
    assert_eq!(usage, Some(DELTAS as u64), "the usage is read");
    // The usage chunk goes, and `,"usage":null` from every other chunk.
    let nulls = (events.len() - 2) * ",\"usage\":null".len();
    assert_eq!(rewritten, total - events[events.len() - 2].len() - nulls, "the injected usage is dropped");
    assert_eq!(meter(&events, false), (total, Some(DELTAS as u64)), "scanning passes every byte");

    let mut group = c.benchmark_group("meter_per_event");
    group.sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("baseline_copy_each_event", |b| {
        b.iter(|| {
            let mut sent = 0;
            for event in black_box(&events) {
                sent += Bytes::copy_from_slice(event).len();
            }
            black_box(sent)
        })
    });
    group.bench_function("rewriting", |b| b.iter(|| black_box(meter(black_box(&events), true))));
    group.bench_function("scanning", |b| b.iter(|| black_box(meter(black_box(&events), false))));
    group.finish();
}

criterion_group!(benches, per_event);
criterion_main!(benches);
