//! Cache breakpoints in a model request. Anthropic (and OpenRouter for the
//! models behind it) write the prompt to a cache where a request marks
//! `cache_control`, and bill those writes above plain input (1.25x for five
//! minutes, 2x for an hour). A price table that states no write prices would
//! price them as plain input, so such a request is refused for such a model.

use std::sync::LazyLock;

use memchr::memmem::Finder;

use super::charge::UNICODE_ESCAPE;
use super::server_context::ascii_unescaped;

const TTL: &[u8] = b"\"ttl\"";

static TTL_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(TTL));

/// Whether the body has a `cache_control` key anywhere: the quoted name
/// followed by `:`, not text that mentions it (quotes inside a string are
/// escaped, so they never match). Spellings with `\u` escapes read the same
/// to the upstream, so they count too.
pub(super) fn marks_cache_breakpoints(body: &[u8]) -> bool {
    keyed(body) || (UNICODE_ESCAPE.find(body).is_some() && keyed(&ascii_unescaped(body)))
}

/// The key in any case (upstreams written in Go read `"Cache_Control"` as
/// it): found from its underscore, which few bytes of a body are.
fn keyed(body: &[u8]) -> bool {
    memchr::memchr_iter(b'_', body).any(|at| {
        let (head, tail) = (b"\"cache", b"control\"");
        at >= head.len()
            && body[at - head.len()..at].eq_ignore_ascii_case(head)
            && body.get(at + 1..at + 1 + tail.len()).is_some_and(|word| word.eq_ignore_ascii_case(tail))
            && body[at + 1 + tail.len()..].trim_ascii_start().starts_with(b":")
    })
}

/// Whether a breakpoint may ask for a lifetime other than the default five
/// minutes: a `ttl` key (in any case, as Go upstreams read keys) whose
/// value is a string other than `"5m"` (Anthropic offers `"1h"`, billed at
/// 2x input against 1.25x; a tool schema's `"ttl": {...}` property is no
/// lifetime). Usage that reports cache writes without splitting them by
/// lifetime (OpenRouter's `cache_write_tokens`) is then charged at the
/// hour's price, the dearer. Run only on bodies that mark breakpoints, so
/// the lower-cased copy costs the others nothing.
pub(super) fn asks_longer_cache_lifetime(body: &[u8]) -> bool {
    let body = if UNICODE_ESCAPE.find(body).is_some() { ascii_unescaped(body) } else { body.to_vec() };
    longer_ttl(&body.to_ascii_lowercase())
}

fn longer_ttl(body: &[u8]) -> bool {
    TTL_KEY.find_iter(body).any(|at| {
        let Some(value) = body[at + TTL.len()..].trim_ascii_start().strip_prefix(b":") else {
            return false;
        };
        let value = value.trim_ascii_start();
        value.starts_with(b"\"") && !value.starts_with(b"\"5m\"")
    })
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
        assert!(marks_cache_breakpoints(br#"{"a":{"Cache_Control":{}}}"#), "a key in another case");
        assert!(marks_cache_breakpoints(br#"{"a":{"CACHE_CONTROL" :{}}}"#));
        assert!(!marks_cache_breakpoints(br#"{"a":"x_y","cache_controls":{},"_":1}"#), "other keys");
    }

    #[test]
    fn a_lifetime_other_than_five_minutes_is_found() {
        assert!(asks_longer_cache_lifetime(br#"{"a":{"cache_control":{"type":"ephemeral","ttl" : "1h"}}}"#));
        assert!(asks_longer_cache_lifetime(br#"{"a":{"cache_control":{"t\u0074l":"1h"}}}"#), "escaped");
        assert!(asks_longer_cache_lifetime(br#"{"cache_control":{"ttl":"60m"}}"#), "any other value");
        assert!(!asks_longer_cache_lifetime(br#"{"cache_control":{"ttl":"5m"}}"#));
        assert!(!asks_longer_cache_lifetime(br#"{"cache_control":{"type":"ephemeral"}}"#));
        assert!(!asks_longer_cache_lifetime(br#"{"text":"a \"ttl\": 1h","type":"ttl"}"#), "text and values");
        assert!(asks_longer_cache_lifetime(br#"{"cache_control":{"TTL":"1h"}}"#), "a key in another case");
        let schema =
            br#"{"tools":[{"parameters":{"properties":{"ttl":{"type":"integer"}}}}],"cache_control":{}}"#;
        assert!(!asks_longer_cache_lifetime(schema), "a schema's property is no lifetime");
    }
}
