//! The price-file parser never panics, and a table it accepts prices its
//! models without overflow panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(table) = creditgate::pricing::PriceTable::parse("fuzz.toml", &text) {
        let _ = table.version().to_string();
        let _ = table.model("mock-gpt", chrono::DateTime::UNIX_EPOCH);
    }
});
