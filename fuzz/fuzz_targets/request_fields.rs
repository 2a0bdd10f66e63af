//! Reading `model`, the output cap and the stream flags from a request body
//! never panics; adding `include_usage` keeps the body a JSON object that
//! still names the same model.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = creditgate::proxy::read_model_request(data) {
        if let Some(rewritten) = creditgate::proxy::with_include_usage(data) {
            let again = creditgate::proxy::read_model_request(&rewritten).expect("a rewritten body stays readable");
            assert_eq!(again.model, request.model);
            assert!(again.include_usage);
        }
    }
});
