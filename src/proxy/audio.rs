//! Audio in a model request. Providers bill audio tokens at their own
//! rates, several times the text ones (OpenAI's audio models: 16x on input,
//! 8x on output), and the price table states no audio rates, so a request
//! that sends or asks for audio is refused rather than charged as text. The
//! catalog import already skips models with audio prices; this guards a
//! hand-written table and a catalog entry that leaves them out.

use std::fmt;
use std::sync::LazyLock;

use memchr::memmem::Finder;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::charge::UNICODE_ESCAPE;
use super::model_fields::{reads_as, Key};
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
        // In any case: upstreams written in Go match keys so.
        let key = key.trim_ascii_end();
        key.len() >= 6 && key[key.len() - 6..].eq_ignore_ascii_case(b"\"type\"")
    })
}

/// Whether a `messages` list holds a message with a non-null `audio`: an
/// assistant's earlier audio reply, named by id, which the upstream reads
/// back and bills as audio input. The rest of the list is skipped unbuilt,
/// and a value of another shape is left for the upstream to refuse.
pub(super) struct AudioInMessages(pub bool);

/// Visits values of any shape; only `visit_seq` (a list of messages) or
/// `visit_map` (one message) looks inside, as `list` says.
struct Lenient {
    list: bool,
}

impl<'de> Deserialize<'de> for AudioInMessages {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Lenient { list: true })
    }
}

/// One element of the list, read as [`Lenient`] with `list: false`.
struct Message(bool);

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Lenient { list: false }).map(|AudioInMessages(audio)| Message(audio))
    }
}

impl<'de> Visitor<'de> for Lenient {
    type Value = AudioInMessages;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(AudioInMessages(false))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(AudioInMessages(false))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(AudioInMessages(false))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(AudioInMessages(false))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(AudioInMessages(false))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(AudioInMessages(false))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut audio = false;
        if self.list {
            while let Some(Message(found)) = seq.next_element()? {
                audio |= found;
            }
        } else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
        }
        Ok(AudioInMessages(audio))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut audio = false;
        // A message's `audio`, spelled in any case a Go upstream reads as it.
        while let Some(Key(key)) = map.next_key()? {
            if !self.list && reads_as(&key, "audio") {
                audio |= !map.next_value::<Value>()?.is_null();
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(AudioInMessages(audio))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{has_input_audio, AudioInMessages};

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
        assert!(found(r#"{"content":[{"Type":"input_audio"}]}"#), "a key in another case");
    }

    #[test]
    fn an_earlier_audio_reply_in_the_messages_is_found() {
        let audio = |messages: &str| serde_json::from_str::<AudioInMessages>(messages).unwrap().0;
        assert!(audio(r#"[{"role":"user","content":"hi"},{"role":"assistant","audio":{"id":"audio_1"}}]"#));
        assert!(audio(r#"[{"role":"assistant","\u0061udio":{"id":"a"},"content":null}]"#));
        assert!(!audio(r#"[{"role":"assistant","audio":null,"content":"x"}]"#));
        assert!(audio(r#"[{"role":"assistant","Audio":{"id":"a"}}]"#), "a key in another case");
        assert!(audio(r#"[{"role":"assistant","AUDIO":{"id":"a"}}]"#));
        assert!(!audio(r#"[{"role":"user","content":[{"type":"text","text":"audio"}],"name":"audio"}]"#));
        // Other shapes are left for the upstream to refuse.
        assert!(!audio(r#""audio""#));
        assert!(!audio(r#"{"audio":{"id":"a"}}"#));
        assert!(!audio(r#"[1, "x", null, [{"audio":{"id":"a"}}]]"#));
    }
}
