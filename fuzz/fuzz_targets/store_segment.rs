//! A stored value (a segment, or a first-format JSON record) never panics
//! the decoder, whatever its bytes; and whatever decodes encodes again to
//! bytes that decode to the same records.
#![no_main]

use creditgate::store::codec::{decode_value, encode_segment};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(records) = decode_value(data) else { return };
    if records.is_empty() {
        return;
    }
    let mut again = Vec::new();
    let taken = encode_segment(&records, usize::MAX, &mut again).expect("decoded records encode");
    assert_eq!(taken, records.len());
    assert_eq!(decode_value(&again).expect("our own segment decodes"), records);
});
