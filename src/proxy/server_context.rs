//! Whether a model request makes the upstream read input it does not carry
//! (stored responses and conversations, files, URLs, tool servers, hosted
//! search and fetch) or carries media whose tokens its bytes do not bound:
//! such a request is held for the route's `context_budget_tokens` more
//! input, or refused where that is 0.

use super::charge::UNICODE_ESCAPE;

/// The server-context marker a body names, if any: a key or value that makes
/// the upstream read input from its own storage, the web or a tool server, or
/// that carries media whose tokens its bytes do not bound (base64 images and
/// documents). A key or value spelled with `\u` escapes (`"\u0070revious_response_id"`) reads
/// the same to the upstream, so a body with any is also searched with its
/// escaped printable ASCII spelled out.
pub(super) fn marker(body: &[u8]) -> Option<&'static str> {
    marker_in_strings(body)
        .or_else(|| UNICODE_ESCAPE.find(body).and_then(|_| marker_in_strings(&ascii_unescaped(body))))
}

/// The first string of a JSON text that is a marker. Each string is looked
/// at once, from its opening quote, and skipped to its end (an escaped
/// quote inside is text): quotes that close strings are never tried, and
/// no quote needs the backslashes before it counted. The body parsed as
/// JSON before it gets here, so every quote outside a string opens one.
fn marker_in_strings(bytes: &[u8]) -> Option<&'static str> {
    let mut at = 0;
    while let Some(found) = memchr::memchr(b'"', bytes.get(at..)?) {
        at += found + 1;
        if let Some(marker) = marker_after_quote(&bytes[at..]) {
            return Some(marker);
        }
        // To the string's closing quote.
        loop {
            at += memchr::memchr2(b'"', b'\\', bytes.get(at..)?)?;
            if bytes[at] == b'"' {
                at += 1;
                break;
            }
            at += 2;
        }
    }
    None
}

/// The marker a string starting at `rest` (what follows an opening quote)
/// is: the whole string, so text inside a message (where quotes are escaped)
/// never matches, and a false match only makes the hold larger. Tool types
/// also match in every dated version (`web_search_preview_2025_03_11`,
/// `web_fetch_20250910`), but not a client's own tool named
/// `web_search_google`. One match on the first letter (a pass per marker
/// cost more, and an automaton more still, on the short bodies most
/// requests send).
fn marker_after_quote(rest: &[u8]) -> Option<&'static str> {
    let (whole, dated): (&[&'static str], &[&'static str]) = match rest.first()?.to_ascii_lowercase() {
        b'p' => (&["previous_response_id", "prompt"], &[]),
        // Gemini's cached contents (`extra_body.google.cached_content`).
        b'c' => (&["conversation", "connector_id", "container", "cached_content", "cachedContent"], &[]),
        // Mistral's documents fetched by URL.
        b'd' => (&["document_url"], &[]),
        b'i' => (&["item_reference", "image_url"], &[]),
        b'f' => (&["file_id", "file_url", "file_data", "file_search"], &[]),
        b'u' => (&["url"], &[]),
        b'b' => (&["base64"], &[]),
        b'v' => (&["vector_store_ids"], &[]),
        b's' => (&["server_url"], &[]),
        b'w' => (&[], &["web_search", "web_fetch"]),
        b'm' => (&["mcp", "mcp_servers", "mcp_toolset"], &[]),
        _ => return None,
    };
    // The string's text after `name`, if it starts with `name` and ends.
    // Spelled in another case it is the marker only as a key, which an
    // upstream matching keys as Go does reads as the marker.
    let tail = |name: &str| {
        let (head, tail) = rest.split_at_checked(name.len())?;
        if !head.eq_ignore_ascii_case(name.as_bytes()) {
            return None;
        }
        let end = tail.iter().position(|&b| b == b'"')?;
        let is_key = || tail[end + 1..].trim_ascii_start().starts_with(b":");
        (head == name.as_bytes() || is_key()).then_some(&tail[..end])
    };
    let exact = |name: &str| tail(name).is_some_and(<[u8]>::is_empty);
    // `_preview`, then dates and numbers: `_2025_03_11`, `_20250910`.
    let version = |name: &str| {
        tail(name).is_some_and(|tail| {
            let tail = tail.strip_prefix(b"_preview").unwrap_or(tail);
            tail.iter().all(|&b| b == b'_' || b.is_ascii_digit())
        })
    };
    whole
        .iter()
        .copied()
        .find(|name| exact(name))
        .or_else(|| dated.iter().copied().find(|name| version(name)))
}

/// `body` with each `\uXXXX` escape of a printable ASCII character other than
/// a quote or a backslash replaced by that character; every other escape is
/// kept as written (so an escaped quote still cannot end a string).
pub(super) fn ascii_unescaped(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut at = 0;
    while let Some(found) = memchr::memchr(b'\\', &body[at..]) {
        let slash = at + found;
        out.extend_from_slice(&body[at..slash]);
        let spelled = body
            .get(slash + 1..slash + 6)
            .filter(|escape| escape[0] == b'u' && escape[1..].iter().all(u8::is_ascii_hexdigit))
            .and_then(|escape| std::str::from_utf8(&escape[1..]).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match spelled {
            Some(c @ (b' '..=b'~')) if c != b'"' && c != b'\\' => {
                out.push(c);
                at = slash + 6;
            }
            // Any other escape (or a backslash at the end) is copied whole.
            _ => {
                let end = (slash + 2).min(body.len());
                out.extend_from_slice(&body[slash..end]);
                at = end;
            }
        }
    }
    out.extend_from_slice(&body[at..]);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{ascii_unescaped, marker};

    #[test]
    fn a_marker_spelled_with_escapes_is_found_and_escaped_quotes_stay_text() {
        let marker = |body: &str| marker(body.as_bytes());
        assert_eq!(marker(r#"{"previous_response_id":"r"}"#), Some("previous_response_id"));
        assert_eq!(marker(r#"{"\u0070revious_response_id":"r"}"#), Some("previous_response_id"));
        assert_eq!(marker(r#"{"tools":[{"type":"web_s\u0065\u0061rch"}]}"#), Some("web_search"));
        assert_eq!(marker(r#"{"x":"\u00e9","\u0055RL":1,"u\u0072l":2}"#), Some("url"));
        // Keys in another case read as the marker to upstreams that fold
        // keys (Go); values in another case are text.
        assert_eq!(marker(r#"{"Previous_Response_ID" :"r"}"#), Some("previous_response_id"));
        assert_eq!(marker(r#"{"content":[{"Image_Url":{"URL":"u"}}]}"#), Some("image_url"));
        assert_eq!(marker(r#"{"content":"URL","role":"Prompt"}"#), None);
        assert_eq!(marker(r#"{"tools":[{"type":"web_fetch_20250910"}]}"#), Some("web_fetch"));
        assert_eq!(marker(r#"{"tools":[{"type":"mcp","server_label":"x"}]}"#), Some("mcp"));
        assert_eq!(marker(r#"{"source":{"type": "base64","data":"AA"}}"#), Some("base64"));
        assert_eq!(marker(r#"{"model":"m","messages":[{"content":"file_id url","role":"p"}]}"#), None);
        assert_eq!(marker(r#"{"prompt_cache_key":"k","urls":1,"webs":"w","f":"""#), None);
        // Versions of a tool type match; a client's own tool, or text quoting one, does not.
        assert_eq!(marker(r#"{"tools":[{"type":"web_search_20250305"}]}"#), Some("web_search"));
        assert_eq!(marker(r#"{"tools":[{"type":"function","name":"web_search_google"}]}"#), None);
        assert_eq!(marker(r#"{"content":"what does \"web_search\" or {\"mcpServers\": {}} do"}"#), None);
        assert_eq!(marker(r#"{"content":"a backslash \\","url":"u"}"#), Some("url"));
        // Long bodies (strings skipped whole); the same answers.
        let pad = "a \\\"url\\\" ".repeat(100);
        assert_eq!(marker(&format!(r#"{{"input":"{pad}","conversation":"c"}}"#)), Some("conversation"));
        assert_eq!(marker(&format!(r#"{{"input":"{pad}"}}"#)), None);
        // Quotes inside text are escaped however they are spelled.
        assert_eq!(marker(r#"{"input":"a \"prompt\" and a \u0022prompt\u0022"}"#), None);
        // An escaped backslash before `u0070` is a backslash, then text.
        assert_eq!(ascii_unescaped(br#""\\u0070rompt""#), br#""\\u0070rompt""#.to_vec());
        assert_eq!(ascii_unescaped(br#""\u0041\u00e9\u005c\n\"#), br#""A\u00e9\u005c\n\"#.to_vec());
        assert_eq!(ascii_unescaped(br#"\u+070 \u00"#), br#"\u+070 \u00"#.to_vec());
    }
}
