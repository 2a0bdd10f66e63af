//! The usage meter never panics on any body, and an SSE stream split at any
//! byte boundary yields the same usage and the same client bytes as the
//! stream fed whole. A JSON body read as one too large to hold (as it
//! passes) yields the usage it yields parsed whole, or none.
#![no_main]

use bytes::Bytes;
use creditgate::meter::Meter;
use libfuzzer_sys::fuzz_target;

fn feed(data: &[u8], split: usize, strip: bool, event_stream: bool) -> (Vec<u8>, creditgate::meter::Reported) {
    let mut meter = Meter::new(event_stream, strip);
    let mut out = meter.observe(Bytes::copy_from_slice(&data[..split])).to_vec();
    out.extend_from_slice(&meter.observe(Bytes::copy_from_slice(&data[split..])));
    (out, meter.finish())
}

fuzz_target!(|data: &[u8]| {
    for strip in [false, true] {
        let whole = feed(data, data.len(), strip, true);
        // Every boundary for short inputs; a spread of them for long ones.
        let step = (data.len() / 64).max(1);
        for split in (0..=data.len()).step_by(step) {
            let parts = feed(data, split, strip, true);
            assert_eq!(parts.1, whole.1, "usage differs when split at {split}");
            if !strip {
                assert_eq!(parts.0, data, "bytes must pass unchanged");
            }
        }
    }
    let _ = feed(data, data.len() / 2, false, false);
    // Nesting past what the streaming reader follows needs a longer body.
    if data.len() < 4000 {
        for split in (0..=data.len()).step_by((data.len() / 16).max(1)) {
            if let Some((whole, streamed)) = creditgate::meter::json_usage_read_both_ways(data, split) {
                // Nothing read (an unusual shape, charged its hold) or what the parse reads.
                assert!(streamed.is_none() || streamed == whole, "split at {split}: {streamed:?} against {whole:?}");
            }
        }
    }
});
