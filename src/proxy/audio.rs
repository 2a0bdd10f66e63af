//! Audio in a model request. Providers bill audio tokens at their own
//! rates, several times the text ones (OpenAI's audio models: 16x on input,
//! 8x on output), and the price table states no audio rates, so a request
//! that sends or asks for audio is refused rather than charged as text.

use std::sync::LazyLock;

use memchr::memmem::Finder;

use super::charge::UNICODE_ESCAPE;
use super::server_context::ascii_unescaped;

/// The quoted type of an audio content part (OpenAI chat, and the
/// OpenAI-compatible APIs of other providers).
static INPUT_AUDIO: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"input_audio\""));

/// Whether the body holds a content part of type `input_audio`: the string
/// as the value of a `"type"` key, not text that mentions it (quotes inside
/// a string are escaped, so they never match). Spellings with `\u` escapes
/// read the same to the upstream, so they count too.
pub(super) fn has_input_audio(body: &[u8]) -> bool {
    typed_input_audio(body)
        || (UNICODE_ESCAPE.find(body).is_some() && typed_input_audio(&ascii_unescaped(body)))
}

fn typed_input_audio(body: &[u8]) -> bool {
    INPUT_AUDIO.find_iter(body).any(|at| {
        let Some(key) = body[..at].trim_ascii_end().strip_suffix(b":") else { return false };
        key.trim_ascii_end().ends_with(b"\"type\"")
    })
}

#[cfg(test)]
mod tests {
    use super::has_input_audio;

    #[test]
    fn an_audio_part_is_found_and_text_mentioning_one_is_not() {
        let found = |body: &str| has_input_audio(body.as_bytes());
        let part = r#"{"messages":[{"role":"user","content":[{"type": "input_audio","input_audio":{"data":"AA","format":"wav"}}]}]}"#;
        assert!(found(part));
        assert!(found(
            r#"{"content":[{"type"	:
            "input_audio"}]}"#
        ));
        assert!(found(r#"{"content":[{"\u0074ype":"\u0069nput_audio"}]}"#));
        assert!(!found(r#"{"content":"send {\"type\": \"input_audio\"} parts"}"#));
        assert!(!found(r#"{"content":"input_audio","type":"text"}"#));
        assert!(!found(r#"{"name":"input_audio"}"#));
        assert!(!found(r#"{"content":[{"type":"input_text","text":"x"}]}"#));
    }
}
