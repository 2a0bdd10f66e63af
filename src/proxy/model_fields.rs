//! The fields of a model request the gateway reads, and the keys it refuses
//! because an upstream could read them as one of those fields.
//!
//! Upstreams written in Go (one-api-style aggregators, Ollama) decode JSON
//! with `encoding/json`, which matches a key to a field case-insensitively,
//! folds `ſ` (U+017F) to `s` and `K` (U+212A) to `k`, and lets the last key
//! win. To such an upstream `{"model":"cheap","Model":"dear"}` asks for the
//! dear model while the gateway prices the cheap one. So a key that folds to
//! a name the gateway reads or checks, but is not spelled that way, is
//! refused. Parsed by hand because the derive skips unknown keys unseen.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::audio;

/// Everything else is skipped without being built. A key given twice is
/// refused (the upstream would read the last one, the gateway the first).
#[derive(Default)]
pub(super) struct ModelFields {
    pub model: Option<Value>,
    pub max_tokens: Option<Value>,
    pub max_completion_tokens: Option<Value>,
    pub max_output_tokens: Option<Value>,
    pub n: Option<Value>,
    pub best_of: Option<Value>,
    pub stream: Option<Value>,
    pub stream_options: Option<Value>,
    pub service_tier: Option<Value>,
    pub tools: Option<Vec<RequestTool>>,
    pub max_tool_calls: Option<Value>,
    pub background: Option<Value>,
    /// Output modalities (`["text", "audio"]`): `audio` asks for audio.
    pub modalities: Option<Value>,
    /// The audio output's settings: set, it asks for audio.
    pub audio: Option<Value>,
    /// Earlier audio replies in the conversation, which the upstream reads back.
    pub messages: Option<audio::AudioInMessages>,
    /// Options that change what the upstream bills for the same tokens, which
    /// the price table cannot state: Anthropic's fast mode and inference
    /// region, OpenRouter's fallback models and plugins (web results, PDF
    /// parsing), each billed at its own rates.
    /// (`"standard"` and `"global"` are the default prices, and pass.)
    pub speed: Option<Value>,
    pub inference_geo: Option<Value>,
    pub models: Option<IgnoredAny>,
    pub plugins: Option<IgnoredAny>,
    /// OpenRouter's provider routing (`order`, `only`, `sort`,
    /// `quantizations`, ...): OpenRouter bills the rate of the provider that
    /// served the call, so a client could steer a model to its dearest one.
    pub provider: Option<IgnoredAny>,
    /// Web search in Chat Completions: OpenAI's search options, xAI's Live
    /// Search. Each search (or source) is billed apart from the tokens.
    pub web_search_options: Option<Value>,
    pub search_parameters: Option<Value>,
    /// Azure's "On Your Data": a search the operator's resources run (and
    /// bill), under the operator's identity, adding retrieved text as input.
    pub data_sources: Option<IgnoredAny>,
    /// Groq's compound systems: web search, page visits and code execution,
    /// each billed per use.
    pub compound_custom: Option<IgnoredAny>,
    pub search_settings: Option<IgnoredAny>,
    /// Anthropic's server-side compaction: a summarising pass billed apart
    /// from the call's usage.
    pub compaction: Option<IgnoredAny>,
    /// Output caps other servers read in place of the API's own (llama.cpp's
    /// `n_predict`, Ollama's `num_predict` and its `options`, TGI's
    /// `max_new_tokens`): they would lift the cap the gateway holds for.
    pub n_predict: Option<IgnoredAny>,
    pub num_predict: Option<IgnoredAny>,
    pub max_new_tokens: Option<IgnoredAny>,
    pub options: Option<IgnoredAny>,
    /// Reasoning asked for (Anthropic's `thinking`, the Responses API's and
    /// OpenRouter's `reasoning`, Chat's `reasoning_effort`): reasoning the
    /// upstream bills in full and streams at most a summary of.
    pub thinking: Option<Value>,
    pub reasoning: Option<Value>,
    pub reasoning_effort: Option<Value>,
    /// Routers that serve a request with another model than it names, which
    /// the gateway priced: LiteLLM's client-side fallbacks (`fallbacks`,
    /// `context_window_fallback_dict`), its switch that fails the named model
    /// on purpose so the fallbacks serve (`mock_testing_fallbacks`, which
    /// also reaches fallbacks the proxy's own config sets) and its
    /// per-request router (`user_config`, a model list of the client's);
    /// OpenRouter's presets (`preset`, which can set fallback models,
    /// providers and plugins). The usage they report is the other model's.
    pub fallbacks: Option<IgnoredAny>,
    pub context_window_fallback_dict: Option<IgnoredAny>,
    pub mock_testing_fallbacks: Option<IgnoredAny>,
    pub user_config: Option<IgnoredAny>,
    pub preset: Option<IgnoredAny>,
}

/// The top-level names read above, then those whose presence the
/// server-context scan prices (stored responses, conversations, prompts,
/// tool servers): a folded spelling of any of them is refused.
const TOP_LEVEL: [&str; 44] = [
    "model",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "service_tier",
    "tools",
    "max_tool_calls",
    "background",
    "modalities",
    "audio",
    "messages",
    "speed",
    "inference_geo",
    "models",
    "plugins",
    "provider",
    "web_search_options",
    "search_parameters",
    "data_sources",
    "compound_custom",
    "search_settings",
    "compaction",
    "n_predict",
    "num_predict",
    "max_new_tokens",
    "options",
    "thinking",
    "reasoning",
    "reasoning_effort",
    "fallbacks",
    "context_window_fallback_dict",
    "mock_testing_fallbacks",
    "user_config",
    "preset",
    "previous_response_id",
    "conversation",
    "prompt",
    "mcp_servers",
    "container",
    "input",
];

/// A `tools[]` entry: only its type is read (function schemas are skipped).
#[derive(Default)]
pub(super) struct RequestTool {
    pub kind: Option<String>,
    /// Anthropic's bound on a server tool's calls.
    pub max_uses: Option<Value>,
    /// OpenAI's code interpreter container: an id, or `{"type": "auto",
    /// "memory_limit": ...}`, whose size sets what a session costs.
    pub container: Option<Value>,
}

const TOOL: [&str; 3] = ["type", "max_uses", "container"];

/// The name in `names` that `key` reads as to an upstream matching keys as
/// Go does, when `key` is not spelled exactly that way.
fn folds_to(key: &str, names: &[&'static str]) -> Option<&'static str> {
    let folded = |c: char| match c {
        'ſ' => 's',
        'K' => 'k',
        c => c.to_ascii_lowercase(),
    };
    if key.is_ascii() {
        return names.iter().copied().find(|name| key.eq_ignore_ascii_case(name) && key != *name);
    }
    names.iter().copied().find(|name| key.len() >= name.len() && key.chars().map(folded).eq(name.chars()))
}

/// Whether `key` reads as `name` to an upstream matching keys as Go does.
pub(super) fn reads_as(key: &str, name: &'static str) -> bool {
    key == name || folds_to(key, &[name]).is_some()
}

fn refuse_folded<E: de::Error>(key: &str, names: &[&'static str]) -> Result<(), E> {
    match folds_to(key, names) {
        Some(name) => Err(E::custom(format_args!(
            "the key `{}` reads as `{name}` to upstreams that match keys regardless of case; spell it `{name}`",
            key.chars().take(64).collect::<String>()
        ))),
        None => Ok(()),
    }
}

/// A key as the parser gives it: borrowed from the body unless it had escapes.
pub(super) struct Key<'de>(pub Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(key)))
            }
            fn visit_str<E>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Which keys a map has had, for refusing one given twice.
struct Seen(u64);

impl Seen {
    fn first<E: de::Error>(&mut self, index: usize, name: &'static str) -> Result<(), E> {
        let bit = 1u64 << index;
        if self.0 & bit != 0 {
            return Err(E::duplicate_field(name));
        }
        self.0 |= bit;
        Ok(())
    }
}

impl<'de> Deserialize<'de> for ModelFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = ModelFields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ModelFields, A::Error> {
        let mut fields = ModelFields::default();
        let mut seen = Seen(0);
        while let Some(Key(key)) = map.next_key()? {
            // Each arm: the field's index in `TOP_LEVEL` and its slot.
            macro_rules! read {
                ($index:literal, $slot:ident) => {{
                    seen.first::<A::Error>($index, TOP_LEVEL[$index])?;
                    fields.$slot = map.next_value()?;
                }};
            }
            match &*key {
                "model" => read!(0, model),
                "max_tokens" => read!(1, max_tokens),
                "max_completion_tokens" => read!(2, max_completion_tokens),
                "max_output_tokens" => read!(3, max_output_tokens),
                "n" => read!(4, n),
                "best_of" => read!(5, best_of),
                "stream" => read!(6, stream),
                "stream_options" => read!(7, stream_options),
                "service_tier" => read!(8, service_tier),
                "tools" => read!(9, tools),
                "max_tool_calls" => read!(10, max_tool_calls),
                "background" => read!(11, background),
                "modalities" => read!(12, modalities),
                "audio" => read!(13, audio),
                "messages" => read!(14, messages),
                "speed" => read!(15, speed),
                "inference_geo" => read!(16, inference_geo),
                "models" => read!(17, models),
                "plugins" => read!(18, plugins),
                "provider" => read!(19, provider),
                "web_search_options" => read!(20, web_search_options),
                "search_parameters" => read!(21, search_parameters),
                "data_sources" => read!(22, data_sources),
                // Azure's older "On Your Data" spelling; ASP.NET reads keys
                // in any case.
                other if other.eq_ignore_ascii_case("dataSources") => read!(22, data_sources),
                "compound_custom" => read!(23, compound_custom),
                "search_settings" => read!(24, search_settings),
                "compaction" => read!(25, compaction),
                "n_predict" => read!(26, n_predict),
                "num_predict" => read!(27, num_predict),
                "max_new_tokens" => read!(28, max_new_tokens),
                "options" => read!(29, options),
                "thinking" => read!(30, thinking),
                "reasoning" => read!(31, reasoning),
                "reasoning_effort" => read!(32, reasoning_effort),
                "fallbacks" => read!(33, fallbacks),
                "context_window_fallback_dict" => read!(34, context_window_fallback_dict),
                "mock_testing_fallbacks" => read!(35, mock_testing_fallbacks),
                "user_config" => read!(36, user_config),
                "preset" => read!(37, preset),
                other => {
                    refuse_folded(other, &TOP_LEVEL)?;
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

impl<'de> Deserialize<'de> for RequestTool {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ToolVisitor)
    }
}

struct ToolVisitor;

impl<'de> Visitor<'de> for ToolVisitor {
    type Value = RequestTool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a tool object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RequestTool, A::Error> {
        let mut tool = RequestTool::default();
        let mut seen = Seen(0);
        while let Some(Key(key)) = map.next_key()? {
            match &*key {
                "type" => {
                    seen.first::<A::Error>(0, TOOL[0])?;
                    tool.kind = map.next_value()?;
                }
                "max_uses" => {
                    seen.first::<A::Error>(1, TOOL[1])?;
                    tool.max_uses = map.next_value()?;
                }
                "container" => {
                    seen.first::<A::Error>(2, TOOL[2])?;
                    tool.container = map.next_value()?;
                }
                other => {
                    refuse_folded(other, &TOOL)?;
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(tool)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ModelFields, String> {
        serde_json::from_str(body).map_err(|e| e.to_string())
    }

    #[test]
    fn keys_that_fold_to_a_read_name_are_refused_and_others_pass() {
        for body in [
            r#"{"model":"cheap","Model":"dear"}"#,
            r#"{"MODEL":"dear"}"#,
            r#"{"model":"m","Max_Completion_Tokens":100000}"#,
            r#"{"model":"m","ſtream":true}"#,
            r#"{"model":"m","max_toKens":5}"#,
            r#"{"model":"m","N":128}"#,
            r#"{"model":"m","Previous_Response_Id":"resp_1"}"#,
            r#"{"model":"m","\u004dodel":"dear"}"#,
            r#"{"model":"m","tools":[{"Type":"web_search_preview"}]}"#,
            r#"{"model":"m","tools":[{"type":"web_search","MAX_USES":9}]}"#,
        ] {
            let refused = parse(body).err().unwrap_or_else(|| panic!("{body} passed"));
            assert!(refused.contains("regardless of case"), "{body}: {refused}");
        }
        // Other keys pass, spelled any way; the read ones are read.
        let fields = parse(
            r#"{"model":"m","Temperature":1,"user":"u","metadata":{"Model":"x"},"tools":[{"type":"function","Name":"f"}],"n":2}"#,
        )
        .unwrap();
        assert_eq!(fields.model, Some(Value::from("m")));
        assert_eq!(fields.n, Some(Value::from(2)));
        assert_eq!(fields.tools.unwrap()[0].kind.as_deref(), Some("function"));
        // An escaped spelling of the exact name is that name.
        assert_eq!(parse(r#"{"mod\u0065l":"m"}"#).unwrap().model, Some(Value::from("m")));
    }

    #[test]
    fn a_key_given_twice_is_refused_even_after_a_null() {
        for body in [r#"{"model":"a","model":"b"}"#, r#"{"n":null,"n":5}"#, r#"{"models":null,"models":[]}"#]
        {
            assert!(parse(body).err().unwrap_or_default().contains("duplicate field"), "{body}");
        }
        let tool: Result<RequestTool, _> = serde_json::from_str(r#"{"type":"a","type":"b"}"#);
        assert!(tool.is_err());
        // Null reads as absent, as the derive read it.
        let fields = parse(r#"{"model":null,"models":null,"tools":null}"#).unwrap();
        assert!(fields.model.is_none() && fields.models.is_none() && fields.tools.is_none());
    }
}
