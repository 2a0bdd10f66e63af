//! The SSE pass: streams whose events the mock writes `pace` apart, one at a
//! time. The mock runs inside this process and records when it handed each
//! event to its connection (`Instant`, the same clock the client reads), so
//! each event's delay is `received - written`; the gateway's added gap is the
//! difference of those delays through it and direct to the mock.
//!
//! The client asks for `stream_options.include_usage` itself, so the gateway
//! injects nothing and hides nothing and events match one to one. A read that
//! delivers more than one event means something buffered: it is counted.

use std::time::Instant;

use creditgate::mock::Journal;
use http::Request;
use http_body_util::{BodyExt, Full};

use crate::client::Http;
use crate::drive::{Sequencer, Target, LOAD_REQUEST_ID};
use crate::mix::stream_spec;

/// What the streams of one mode in one round showed.
#[derive(Debug, Clone, Default)]
pub struct SseSample {
    /// Per-event delay, mock write → client read, sorted.
    pub delays_ns: Vec<u64>,
    pub events: u64,
    /// Reads that carried more than one event (buffering).
    pub coalesced: u64,
    /// Events the mock wrote that the client did not get, or the reverse.
    pub unmatched: u64,
    /// Streams that did not answer 200.
    pub failed: u64,
}

/// One paced stream request.
pub struct StreamCall<'a> {
    pub http: &'a Http,
    pub target: &'a Target,
    pub sequencer: &'a Sequencer,
    pub journal: &'a Journal,
    pub key: usize,
    pub pace_ms: u64,
    /// Content events: the mock writes `10 + seed % 41` tokens, capped by `max_tokens`.
    pub frames: u64,
}

pub async fn measure(call: &StreamCall<'_>, streams: usize) -> anyhow::Result<SseSample> {
    let mut sample = SseSample::default();
    for _ in 0..streams {
        let seq = call.sequencer.next();
        let received = match stream_once(call, seq).await {
            Ok(Some(received)) => received,
            Ok(None) | Err(_) => {
                sample.failed += 1;
                continue;
            }
        };
        let written = call
            .journal
            .entries()
            .into_iter()
            .find(|e| e.header(LOAD_REQUEST_ID).and_then(|id| call.sequencer.seq_of(id)) == Some(seq))
            .map(|e| e.event_times())
            .unwrap_or_default();
        sample.unmatched += received.times.len().abs_diff(written.len()) as u64;
        sample.coalesced += received.coalesced;
        sample.events += received.times.len() as u64;
        for (got, sent) in received.times.iter().zip(&written) {
            sample.delays_ns.push(got.saturating_duration_since(*sent).as_nanos() as u64);
        }
    }
    sample.delays_ns.sort_unstable();
    Ok(sample)
}

struct Received {
    times: Vec<Instant>,
    coalesced: u64,
}

async fn stream_once(call: &StreamCall<'_>, seq: u64) -> anyhow::Result<Option<Received>> {
    let spec = stream_spec(seq, call.key, call.frames);
    let mut request = Request::post(format!("http://{}{}", call.target.addr(spec.seq), spec.path()))
        .header("content-type", "application/json")
        .header(LOAD_REQUEST_ID, call.sequencer.request_id(seq))
        .header("x-mock-pace-ms", call.pace_ms.to_string());
    if let Some(key) = call.target.key(spec.seq, call.key) {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    if let Some(host) = call.target.host {
        request = request.header("host", host);
    }
    let response = call.http.request(request.body(Full::new(spec.body))?).await?;
    if response.status() != 200 {
        let _ = response.into_body().collect().await;
        return Ok(None);
    }
    let mut body = response.into_body();
    let mut received = Received { times: Vec::new(), coalesced: 0 };
    let mut ended_with_newline = false;
    while let Some(frame) = body.frame().await {
        let at = Instant::now();
        let Ok(data) = frame?.into_data() else { continue };
        let events = events_ending_in(&data, ended_with_newline);
        ended_with_newline = data.last() == Some(&b'\n');
        if events > 1 {
            received.coalesced += 1;
        }
        received.times.extend(std::iter::repeat_n(at, events));
    }
    Ok(Some(received))
}

/// Events whose terminating blank line (`\n\n`) ends in `chunk`; a chunk may
/// start with the second newline of a terminator begun in the previous one.
fn events_ending_in(chunk: &[u8], previous_ended_with_newline: bool) -> usize {
    let mut count = chunk.windows(2).filter(|w| w == b"\n\n").count();
    if previous_ended_with_newline && chunk.first() == Some(&b'\n') {
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::events_ending_in;

    #[test]
    fn events_are_counted_by_their_terminators_even_when_split() {
        assert_eq!(events_ending_in(b"data: a\n\n", false), 1, "one whole event");
        assert_eq!(events_ending_in(b"data: a\n\ndata: b\n\n", false), 2, "two in one read");
        assert_eq!(events_ending_in(b"data: a", false), 0, "partial");
        assert_eq!(events_ending_in(b"\ndata: b", true), 1, "terminator split across reads");
    }
}
