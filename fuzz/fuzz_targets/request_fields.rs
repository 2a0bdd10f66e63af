//! Reading `model`, the output cap and the stream flags from a request body
//! never panics, for every API flavour; the gateway's edits (a forwarded
//! output cap, `include_usage`), when they apply, keep the body a JSON object
//! that still names the same model and now carries exactly the cap that was
//! held.
#![no_main]

use creditgate::config::Flavour;
use creditgate::proxy::{edited_body, read_model_request, BodyEdits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for flavour in [Flavour::OpenaiChat, Flavour::OpenaiResponses, Flavour::AnthropicMessages, Flavour::OpenaiEmbeddings] {
        let Ok(request) = read_model_request(data, flavour) else { continue };
        let Some(field) = creditgate::proxy::cap_field(flavour) else { continue };
        let edits = BodyEdits { cap: Some((field, 77)), include_usage: true, ..BodyEdits::default() };
        if request.max_output_tokens.is_some() {
            continue;
        }
        // A body the general path cannot rebuild (a number out of f64's range, say) is
        // refused by the gateway with 400; one it can must carry the held cap.
        let Some(rewritten) = edited_body(data, edits) else { continue };
        let again = read_model_request(&rewritten, flavour).expect("an edited body stays readable");
        assert_eq!(again.model, request.model);
        assert_eq!(again.max_output_tokens, Some(77));
        assert!(again.include_usage);
    }
});
