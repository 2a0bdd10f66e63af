//! Cache breakpoints in a model request. Anthropic (and OpenRouter for the
//! models behind it) write the prompt to a cache where a request marks
//! `cache_control`, and bill those writes above plain input (1.25x for five
//! minutes, 2x for an hour). A price table that states no write prices would
//! price them as plain input, so such a request is refused for such a model.

use std::sync::LazyLock;

use memchr::memmem::Finder;

use super::charge::UNICODE_ESCAPE;
use super::server_context::ascii_unescaped;

const KEY: &[u8] = b"\"cache_control\"";

static CACHE_CONTROL: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(KEY));

/// Whether the body has a `cache_control` key anywhere: the quoted name
/// followed by `:`, not text that mentions it (quotes inside a string are
/// escaped, so they never match). Spellings with `\u` escapes read the same
/// to the upstream, so they count too.
pub(super) fn marks_cache_breakpoints(body: &[u8]) -> bool {
    keyed(body) || (UNICODE_ESCAPE.find(body).is_some() && keyed(&ascii_unescaped(body)))
}

fn keyed(body: &[u8]) -> bool {
    CACHE_CONTROL
        .find_iter(body)
        .any(|at| body.get(at + KEY.len()..).is_some_and(|rest| rest.trim_ascii_start().starts_with(b":")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_control_key_counts_and_text_that_names_it_does_not() {
        let marked = br#"{"system":[{"type":"text","text":"x","cache_control":{"type":"ephemeral"}}]}"#;
        assert!(marks_cache_breakpoints(marked));
        assert!(marks_cache_breakpoints(br#"{"a":{"cache_control" : {"ttl":"1h"}}}"#));
        assert!(marks_cache_breakpoints(br#"{"a":{"\u0063ache_control":{}}}"#), "escaped");
        assert!(!marks_cache_breakpoints(br#"{"text":"set \"cache_control\": on"}"#), "mentioned");
        assert!(!marks_cache_breakpoints(br#"{"type":"cache_control"}"#), "a value");
    }
}
