//! Usage extraction from upstream responses: JSON bodies, SSE streams and
//! tool headers. The meter watches bytes go by; it never holds them back,
//! except when it must remove the usage chunk the gateway itself asked for
//! (then it releases each SSE event as soon as the event is complete).

mod large_json;

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use serde::Deserialize;
use serde_json::Value;
use smallvec::SmallVec;

use large_json::LargeJson;

/// Most bytes of a non-streamed JSON body kept for usage parsing; a larger
/// body's usage is read as it passes (see `large_json`).
pub const MAX_METERED_JSON_BYTES: usize = 4 * 1024 * 1024;
/// Longest SSE line the meter keeps while looking for its end.
const MAX_SSE_LINE_BYTES: usize = 1024 * 1024;
/// Rough bytes per token used to estimate what a cut-short stream delivered.
const BYTES_PER_TOKEN_ESTIMATE: u64 = 4;

/// Token counts as reported (each `None` until seen).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reported {
    /// All input tokens, cached ones included.
    pub input_tokens: Option<u64>,
    pub cached_input_tokens: Option<u64>,
    /// Input written to a 5-minute (and a 1-hour) prompt cache (Anthropic).
    pub cache_write_5m_tokens: Option<u64>,
    pub cache_write_1h_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// Calls of the upstream's own (hosted) tools, by [`HostedTool`].
    pub hosted_calls: [u32; HostedTool::ALL.len()],
    /// The service tier the upstream says served the call (it may differ
    /// from the one asked for), as the document with the usage names it.
    pub served_tier: Option<ServiceTier>,
}

/// A service tier as a request asks for it or a response names the one
/// that served the call: OpenAI's `service_tier` (`default`, `flex`,
/// `priority`, `scale`), Anthropic's `usage.service_tier` (`standard`,
/// `priority`, `batch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceTier {
    /// The base prices: `default`, `standard`, `on_demand`, and the
    /// requests' `auto` and `standard_only`.
    Default,
    Priority,
    Flex,
    Scale,
    Batch,
    /// Any other name.
    Other,
}

impl ServiceTier {
    pub fn from_name(name: &str) -> ServiceTier {
        match name {
            // Groq names its standard tier `on_demand`.
            "default" | "standard" | "auto" | "standard_only" | "on_demand" => ServiceTier::Default,
            "priority" => ServiceTier::Priority,
            "flex" => ServiceTier::Flex,
            "scale" => ServiceTier::Scale,
            "batch" => ServiceTier::Batch,
            _ => ServiceTier::Other,
        }
    }

    /// Its name under a model's `service_tiers` in the price table.
    pub fn table_name(self) -> Option<&'static str> {
        match self {
            ServiceTier::Priority => Some("priority"),
            ServiceTier::Flex => Some("flex"),
            ServiceTier::Scale => Some("scale"),
            ServiceTier::Batch => Some("batch"),
            ServiceTier::Default | ServiceTier::Other => None,
        }
    }
}

/// A `service_tier` value: any JSON value, kept only if it is a string.
type TierField = Lenient<ServiceTier>;

impl FromJsonScalar for ServiceTier {
    fn from_str(value: &str) -> Option<ServiceTier> {
        Some(ServiceTier::from_name(value))
    }
}

fn tier_of(field: Option<TierField>) -> Option<ServiceTier> {
    field.and_then(|field| field.0)
}

/// A tool the upstream runs itself and bills per call. OpenAI's (Responses
/// API) are priced as the tool named by the output item a call leaves, e.g.
/// `[tools."web_search_call"]`; Anthropic's web search as
/// `[tools."web_search_requests"]`, the usage field that counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostedTool {
    WebSearch,
    FileSearch,
    CodeInterpreter,
    ImageGeneration,
    AnthropicWebSearch,
}

impl HostedTool {
    pub const ALL: [HostedTool; 5] = [
        HostedTool::WebSearch,
        HostedTool::FileSearch,
        HostedTool::CodeInterpreter,
        HostedTool::ImageGeneration,
        HostedTool::AnthropicWebSearch,
    ];

    /// The type of the output item a call leaves, which is also the name
    /// it is priced under.
    pub fn item_type(self) -> &'static str {
        match self {
            HostedTool::WebSearch => "web_search_call",
            HostedTool::FileSearch => "file_search_call",
            HostedTool::CodeInterpreter => "code_interpreter_call",
            HostedTool::ImageGeneration => "image_generation_call",
            HostedTool::AnthropicWebSearch => "web_search_requests",
        }
    }

    /// The name its calls are priced under. OpenAI bills the preview of
    /// web search apart from the tool (the preview, on a model that does
    /// not reason, at 2.5x), though both leave `web_search_call` items: a
    /// request that enables the preview is priced as `web_search_preview_call`.
    pub fn price_name(self, web_search_preview: bool) -> &'static str {
        match self {
            HostedTool::WebSearch if web_search_preview => "web_search_preview_call",
            tool => tool.item_type(),
        }
    }

    /// The hosted tool an Anthropic request's `tools[].type` enables
    /// (`web_search_20250305` and later versions).
    pub fn from_anthropic_type(kind: &str) -> Option<HostedTool> {
        kind.starts_with("web_search_").then_some(HostedTool::AnthropicWebSearch)
    }

    /// The hosted tool a request's `tools[].type` enables, if any.
    pub fn from_request_type(kind: &str) -> Option<HostedTool> {
        match kind {
            // Every dated version too (`web_search_preview_2025_03_11`).
            kind if kind == "web_search" || kind.starts_with("web_search_") => Some(HostedTool::WebSearch),
            "file_search" => Some(HostedTool::FileSearch),
            "code_interpreter" => Some(HostedTool::CodeInterpreter),
            "image_generation" => Some(HostedTool::ImageGeneration),
            _ => None,
        }
    }

    fn from_item_type(kind: &str) -> Option<HostedTool> {
        HostedTool::ALL.into_iter().find(|tool| tool.item_type() == kind)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Hosted-tool calls among a response's output items.
fn count_hosted_calls<'a>(types: impl Iterator<Item = &'a str>) -> [u32; HostedTool::ALL.len()] {
    let mut calls = [0u32; HostedTool::ALL.len()];
    for tool in types.filter_map(HostedTool::from_item_type) {
        calls[tool.index()] = calls[tool.index()].saturating_add(1);
    }
    calls
}

impl Reported {
    pub fn is_complete(&self) -> bool {
        self.input_tokens.is_some() && self.output_tokens.is_some()
    }

    /// Keep the larger of each count: Anthropic streams report output
    /// cumulatively (`message_start` says 1, `message_delta` the total).
    fn merge(&mut self, other: Reported) {
        fn max(a: Option<u64>, b: Option<u64>) -> Option<u64> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            }
        }
        self.input_tokens = max(self.input_tokens, other.input_tokens);
        self.cached_input_tokens = max(self.cached_input_tokens, other.cached_input_tokens);
        self.cache_write_5m_tokens = max(self.cache_write_5m_tokens, other.cache_write_5m_tokens);
        self.cache_write_1h_tokens = max(self.cache_write_1h_tokens, other.cache_write_1h_tokens);
        for (mine, theirs) in self.hosted_calls.iter_mut().zip(other.hosted_calls) {
            *mine = (*mine).max(theirs);
        }
        self.output_tokens = max(self.output_tokens, other.output_tokens);
        // The latest document that names one says what served the call.
        self.served_tier = other.served_tier.or(self.served_tier);
    }
}

/// The only parts of a response or event the meter reads. Everything else
/// is skipped by the parser without being built, which is most of the cost
/// of metering a JSON body.
#[derive(Deserialize)]
struct Envelope {
    usage: Option<UsageFields>,
    message: Option<Nested>,
    response: Option<Nested>,
    output: Option<Vec<OutputItem>>,
    service_tier: Option<TierField>,
}

#[derive(Deserialize)]
struct Nested {
    usage: Option<UsageFields>,
    output: Option<Vec<OutputItem>>,
    service_tier: Option<TierField>,
}

/// An item of a Responses API `output`: only its type is read.
#[derive(Deserialize)]
struct OutputItem {
    #[serde(rename = "type")]
    kind: Option<String>,
}

fn item_types(items: &[OutputItem]) -> impl Iterator<Item = &str> {
    items.iter().filter_map(|item| item.kind.as_deref())
}

/// The counts of a `usage` object, each `Count(None)` when present but not
/// a non-negative integer (as [`Value::as_u64`] reads it).
#[derive(Deserialize)]
struct UsageFields {
    prompt_tokens: Option<Count>,
    completion_tokens: Option<Count>,
    total_tokens: Option<Count>,
    input_tokens: Option<Count>,
    output_tokens: Option<Count>,
    cache_read_input_tokens: Option<Count>,
    cache_creation_input_tokens: Option<Count>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    cache_creation: Option<CacheCreation>,
    server_tool_use: Option<ServerToolUse>,
    service_tier: Option<TierField>,
}

/// Anthropic's count of the server tools a call ran.
#[derive(Deserialize)]
struct ServerToolUse {
    web_search_requests: Option<Count>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<Count>,
    /// OpenRouter's cache writes (Anthropic's `cache_creation_input_tokens`).
    cache_write_tokens: Option<Count>,
}

/// Anthropic's split of `cache_creation_input_tokens` by cache lifetime.
#[derive(Deserialize)]
struct CacheCreation {
    ephemeral_5m_input_tokens: Option<Count>,
    ephemeral_1h_input_tokens: Option<Count>,
}

/// Any JSON value; keeps it only if it is a non-negative integer.
type Count = Lenient<u64>;

impl FromJsonScalar for u64 {
    fn from_u64(value: u64) -> Option<u64> {
        Some(value)
    }
    fn from_i64(value: i64) -> Option<u64> {
        u64::try_from(value).ok()
    }
}

/// What a lenient field keeps of a JSON scalar (nothing, unless said).
trait FromJsonScalar: Sized {
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
    fn from_i64(_: i64) -> Option<Self> {
        None
    }
    fn from_str(_: &str) -> Option<Self> {
        None
    }
}

/// A field that takes any JSON value and keeps it only where `T` reads it:
/// a value of another shape is not the parser's error (which would send the
/// whole document the slow way), only nothing read.
struct Lenient<T>(Option<T>);

impl<'de, T: FromJsonScalar> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LenientVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: FromJsonScalar> serde::de::Visitor<'de> for LenientVisitor<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E>(self, value: u64) -> Result<Lenient<T>, E> {
                Ok(Lenient(T::from_u64(value)))
            }
            fn visit_i64<E>(self, value: i64) -> Result<Lenient<T>, E> {
                Ok(Lenient(T::from_i64(value)))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Lenient<T>, E> {
                Ok(Lenient(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Lenient<T>, E> {
                Ok(Lenient(None))
            }
            fn visit_str<E>(self, value: &str) -> Result<Lenient<T>, E> {
                Ok(Lenient(T::from_str(value)))
            }
            fn visit_unit<E>(self) -> Result<Lenient<T>, E> {
                Ok(Lenient(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Lenient<T>, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Lenient(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Lenient<T>, A::Error> {
                while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(Lenient(None))
            }
        }
        deserializer.deserialize_any(LenientVisitor(std::marker::PhantomData))
    }
}

impl UsageFields {
    fn reported(self) -> Reported {
        let count = |field: &Option<Count>| field.as_ref().and_then(|count| count.0);
        fn cached(details: &Option<Details>) -> Option<&Count> {
            details.as_ref().and_then(|d| d.cached_tokens.as_ref())
        }
        let cached = cached(&self.prompt_tokens_details)
            .or_else(|| cached(&self.input_tokens_details))
            .and_then(|count| count.0);
        let split = |pick: fn(&CacheCreation) -> &Option<Count>| {
            self.cache_creation.as_ref().and_then(|c| pick(c).as_ref()).and_then(|count| count.0)
        };
        let searches =
            self.server_tool_use.as_ref().and_then(|s| s.web_search_requests.as_ref()).and_then(|c| c.0);
        let mut reported = counted(UsageCounts {
            prompt: count(&self.prompt_tokens),
            completion: count(&self.completion_tokens),
            total: count(&self.total_tokens),
            input: count(&self.input_tokens),
            output: count(&self.output_tokens),
            cache_read: count(&self.cache_read_input_tokens),
            cache_write: count(&self.cache_creation_input_tokens).or_else(|| {
                let details = self.prompt_tokens_details.as_ref()?;
                details.cache_write_tokens.as_ref().and_then(|count| count.0)
            }),
            cache_write_5m: split(|c| &c.ephemeral_5m_input_tokens),
            cache_write_1h: split(|c| &c.ephemeral_1h_input_tokens),
            cached,
        });
        reported.hosted_calls[HostedTool::AnthropicWebSearch.index()] =
            searches.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
        reported.served_tier = tier_of(self.service_tier);
        reported
    }
}

/// Usage in a JSON document, in any of the shapes the supported APIs use.
/// Anthropic's `message_start` (usage under `message`) opens a stream with
/// `output_tokens: 1`, a running count: its output is not read, so a stream
/// cut before `message_delta` has no output count and is charged as one
/// without usage, not as one token.
fn usage_from_bytes(json: &[u8]) -> Option<Reported> {
    match envelope_of(json) {
        Ok(envelope) => usage_in(envelope),
        // An unusual shape (`usage` that is not an object, a duplicated
        // key): read it the slow, general way.
        Err(_) => serde_json::from_slice::<Value>(json).ok().as_ref().and_then(usage_from_json),
    }
}

/// [`usage_from_bytes`] for a document in the usual shape only: `None` for
/// one the general way would have to read.
fn usage_from_usual_bytes(json: &[u8]) -> Option<Reported> {
    envelope_of(json).ok().and_then(usage_in)
}

fn envelope_of(json: &[u8]) -> Result<Envelope, serde_json::Error> {
    // Checked whole and at once, a body's keys are not each checked for
    // UTF-8 again as the slice reader would; a body that is not UTF-8 (in a
    // string the parser skips) is still read the slice reader's way.
    match std::str::from_utf8(json) {
        Ok(text) => serde_json::from_str::<Envelope>(text),
        Err(_) => serde_json::from_slice::<Envelope>(json),
    }
}

fn usage_in(mut envelope: Envelope) -> Option<Reported> {
    let output = envelope.output.as_deref().or(envelope.response.as_ref().and_then(|r| r.output.as_deref()));
    let hosted_calls = output.map(|items| count_hosted_calls(item_types(items))).unwrap_or_default();
    // The tier next to the usage: the document's, the response's or the
    // message's (OpenAI), else the usage's own (Anthropic).
    let served_tier = tier_of(envelope.service_tier.take())
        .or_else(|| tier_of(envelope.response.as_mut().and_then(|r| r.service_tier.take())))
        .or_else(|| tier_of(envelope.message.as_mut().and_then(|m| m.service_tier.take())));
    let (usage, opening) = match (envelope.usage, envelope.message.and_then(|m| m.usage)) {
        (Some(usage), _) => (usage, false),
        (None, Some(usage)) => (usage, true),
        (None, None) => (envelope.response.and_then(|r| r.usage)?, false),
    };
    let mut reported = usage.reported();
    reported.served_tier = served_tier.or(reported.served_tier);
    if opening {
        reported.output_tokens = None;
    }
    for (mine, from_output) in reported.hosted_calls.iter_mut().zip(hosted_calls) {
        *mine = (*mine).max(from_output);
    }
    Some(reported)
}

/// For the fuzzer: the usage of a JSON body as parsed whole and as read in
/// two parts split at `split` (the reader of bodies too large to hold);
/// `None` when `body` is not one JSON value in UTF-8. The reader must read
/// what the parse reads, or nothing (a body in an unusual shape, which it
/// leaves to be charged its hold). (Where a body is not UTF-8 they may
/// differ: the reader does not check text it skips.)
#[doc(hidden)]
pub fn json_usage_read_both_ways(body: &[u8], split: usize) -> Option<(Option<Reported>, Option<Reported>)> {
    serde_json::from_str::<serde::de::IgnoredAny>(std::str::from_utf8(body).ok()?).ok()?;
    let mut large = LargeJson::default();
    large.feed(&body[..split.min(body.len())]);
    large.feed(&body[split.min(body.len())..]);
    Some((usage_from_bytes(body), large.usage()))
}

/// The counts the APIs report, each `None` when absent or not a count.
struct UsageCounts {
    prompt: Option<u64>,
    completion: Option<u64>,
    total: Option<u64>,
    input: Option<u64>,
    output: Option<u64>,
    cache_read: Option<u64>,
    cache_write: Option<u64>,
    cache_write_5m: Option<u64>,
    cache_write_1h: Option<u64>,
    cached: Option<u64>,
}

fn counted(c: UsageCounts) -> Reported {
    let input = match c.prompt {
        // OpenAI chat and embeddings: prompt_tokens includes cached tokens.
        Some(prompt) => Some(prompt),
        // Responses API includes cached tokens in input_tokens; Anthropic
        // reports cache reads and writes beside input_tokens.
        None => c.input.map(|input| {
            input.saturating_add(c.cache_read.unwrap_or(0)).saturating_add(c.cache_write.unwrap_or(0))
        }),
    };
    // Cache writes without a split are 5-minute writes (the default lifetime).
    let (write_5m, write_1h) = match (c.cache_write_5m, c.cache_write_1h) {
        (None, None) => (c.cache_write, None),
        (five, hour) => {
            (five.or_else(|| c.cache_write.map(|all| all.saturating_sub(hour.unwrap_or(0)))), hour)
        }
    };
    // Some providers (xAI) leave reasoning out of completion_tokens but count
    // it in total_tokens, and bill it: output is at least total less input.
    let output = match (c.completion.or(c.output), c.total, c.prompt.or(c.input)) {
        (Some(output), Some(total), Some(input)) => Some(output.max(total.saturating_sub(input))),
        (output, _, _) => output,
    };
    Reported {
        input_tokens: input,
        cached_input_tokens: c.cached.or(c.cache_read),
        cache_write_5m_tokens: write_5m,
        cache_write_1h_tokens: write_1h,
        output_tokens: output,
        hosted_calls: Default::default(),
        served_tier: None,
    }
}

/// Read a `usage` object in any of the shapes the supported APIs use.
fn usage_from_json(value: &Value) -> Option<Reported> {
    let top = value.get("usage").filter(|u| u.is_object());
    let opening = top.is_none() && value.pointer("/message/usage").is_some();
    let usage =
        top.or_else(|| value.pointer("/message/usage")).or_else(|| value.pointer("/response/usage"))?;
    let output = value.get("output").or_else(|| value.pointer("/response/output")).and_then(Value::as_array);
    let types = output.into_iter().flatten().filter_map(|item| item.get("type").and_then(Value::as_str));
    let mut reported = usage_from_object(usage)?;
    if opening {
        reported.output_tokens = None;
    }
    let tier = |pointer: &str| value.pointer(pointer).and_then(Value::as_str).map(ServiceTier::from_name);
    reported.served_tier = tier("/service_tier")
        .or_else(|| tier("/response/service_tier"))
        .or_else(|| tier("/message/service_tier"))
        .or(reported.served_tier);
    for (mine, from_output) in reported.hosted_calls.iter_mut().zip(count_hosted_calls(types)) {
        *mine = (*mine).max(from_output);
    }
    Some(reported)
}

fn usage_from_object(usage: &Value) -> Option<Reported> {
    if !usage.is_object() {
        return None;
    }
    let count = |key: &str| usage.get(key).and_then(Value::as_u64);
    let cached = usage
        .pointer("/prompt_tokens_details/cached_tokens")
        .or_else(|| usage.pointer("/input_tokens_details/cached_tokens"))
        .and_then(Value::as_u64);
    let mut reported = counted(UsageCounts {
        prompt: count("prompt_tokens"),
        completion: count("completion_tokens"),
        total: count("total_tokens"),
        input: count("input_tokens"),
        output: count("output_tokens"),
        cache_read: count("cache_read_input_tokens"),
        cache_write: count("cache_creation_input_tokens")
            .or_else(|| usage.pointer("/prompt_tokens_details/cache_write_tokens").and_then(Value::as_u64)),
        cache_write_5m: usage.pointer("/cache_creation/ephemeral_5m_input_tokens").and_then(Value::as_u64),
        cache_write_1h: usage.pointer("/cache_creation/ephemeral_1h_input_tokens").and_then(Value::as_u64),
        cached,
    });
    let searches = usage.pointer("/server_tool_use/web_search_requests").and_then(Value::as_u64);
    reported.hosted_calls[HostedTool::AnthropicWebSearch.index()] =
        searches.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
    reported.served_tier = usage.get("service_tier").and_then(Value::as_str).map(ServiceTier::from_name);
    Some(reported)
}

/// Watches one response body and collects its usage.
#[derive(Debug)]
pub struct Meter {
    mode: Mode,
    reported: Reported,
    /// Bytes of generated text seen in stream deltas (for cut-short streams).
    text_bytes: u64,
    /// Remove the usage-only chunk and `"usage":null` fields the gateway
    /// asked for on the client's behalf.
    strip_injected_usage: bool,
    /// The stream reached the event that ends its usage (see [`ends_usage`]):
    /// what was reported is the bill, not a running total.
    usage_final: bool,
}

#[derive(Debug)]
enum Mode {
    /// A whole JSON body, parsed at the end.
    /// The first chunk is kept, not copied: most bodies are one chunk,
    /// parsed where it lies. Later chunks are copied into `rest`, so what
    /// is held stays near the body's size: a chunk kept is a slice of the
    /// connection's read buffer and keeps all of that buffer alive.
    /// Past [`MAX_METERED_JSON_BYTES`] what is held goes to `large`, which
    /// reads the usage as the rest passes and keeps nothing else.
    Json { first: Option<Bytes>, rest: BytesMut, large: Option<Box<LargeJson>> },
    /// Server-sent events, parsed line by line as they pass. A line longer
    /// than [`MAX_SSE_LINE_BYTES`] (a Responses call's `response.completed`
    /// carrying generated images) is read as it passes by `long_line`.
    Sse { line: BytesMut, pending_event: BytesMut, long_line: Option<LongLine> },
}

/// A line too long to keep, read to its end.
#[derive(Debug)]
enum LongLine {
    /// A `data:` line: its JSON is read as it passes.
    Data(Box<LargeJson>),
    /// Anything else: skipped.
    Other,
}

impl LongLine {
    /// For a line that begins with `first` and goes on with `then`.
    fn starting(first: &[u8], then: &[u8]) -> LongLine {
        let head: SmallVec<[u8; 6]> = first.iter().chain(then).take(6).copied().collect();
        let field = match &head[..] {
            [b'd', b'a', b't', b'a', b':', b' '] => 6,
            [b'd', b'a', b't', b'a', b':', ..] => 5,
            _ => return LongLine::Other,
        };
        let mut reader = Box::<LargeJson>::default();
        let in_first = field.min(first.len());
        reader.feed(&first[in_first..]);
        reader.feed(&then[field - in_first..]);
        LongLine::Data(reader)
    }

    fn feed(&mut self, bytes: &[u8]) {
        if let LongLine::Data(reader) = self {
            reader.feed(bytes);
        }
    }
}

impl Meter {
    /// A meter for a response whose head says whether it is an event stream.
    pub fn new(event_stream: bool, strip_injected_usage: bool) -> Self {
        let mode = if event_stream {
            Mode::Sse { line: BytesMut::new(), pending_event: BytesMut::new(), long_line: None }
        } else {
            Mode::Json { first: None, rest: BytesMut::new(), large: None }
        };
        Meter { mode, reported: Reported::default(), text_bytes: 0, strip_injected_usage, usage_final: false }
    }

    /// Look at one chunk; returns what the client should get (the chunk
    /// itself unless injected usage must be removed).
    pub fn observe(&mut self, chunk: Bytes) -> Bytes {
        match &mut self.mode {
            Mode::Json { first, rest, large } => {
                if let Some(large) = large {
                    large.feed(&chunk);
                } else if json_held(first, rest) + chunk.len() <= MAX_METERED_JSON_BYTES {
                    match first {
                        None => *first = Some(chunk.clone()),
                        Some(_) => rest.extend_from_slice(&chunk),
                    }
                } else {
                    let mut reader = Box::<LargeJson>::default();
                    reader.feed(first.take().as_deref().unwrap_or_default());
                    reader.feed(&std::mem::take(rest));
                    reader.feed(&chunk);
                    *large = Some(reader);
                }
                chunk
            }
            Mode::Sse { .. } if self.strip_injected_usage => self.observe_sse_rewriting(chunk),
            Mode::Sse { .. } => {
                self.scan_lines(&chunk, true);
                chunk
            }
        }
    }

    /// The body has ended: whatever the rewriter still holds (a last event
    /// without its blank line) goes to the client, minus injected usage.
    pub fn end_of_body(&mut self) -> Bytes {
        let Mode::Sse { pending_event, .. } = &mut self.mode else {
            return Bytes::new();
        };
        if pending_event.is_empty() {
            return Bytes::new();
        }
        let event = pending_event.split().freeze();
        let usage = UsageKeys::of(&event);
        self.scan_lines(&event, usage.other);
        // A last line without its terminator is still a line.
        self.scan_lines(b"\n", usage.other);
        self.rewritten_event(event, usage)
    }

    /// Usage once the body has ended.
    pub fn finish(&mut self) -> Reported {
        match &self.mode {
            Mode::Json { first, rest, large } => {
                let found = match (first, large) {
                    (_, Some(large)) => large.usage(),
                    (Some(first), None) if rest.is_empty() => usage_from_bytes(first),
                    (Some(first), None) => usage_from_bytes(&[&first[..], &rest[..]].concat()),
                    (None, None) => usage_from_bytes(rest),
                };
                if let Some(found) = found {
                    // A JSON document that parsed arrived whole: its usage is the bill.
                    self.reported.merge(found);
                    self.usage_final = true;
                }
            }
            Mode::Sse { long_line: Some(_), .. } => {
                // A final long line the upstream never terminated.
                self.scan_lines(b"\n", true);
            }
            Mode::Sse { line, .. } if !line.is_empty() => {
                // A final `data:` line the upstream never terminated.
                let last = line.clone();
                self.on_line(&last, true);
            }
            _ => {}
        }
        self.reported
    }

    /// Estimated output tokens delivered so far (for a response cut short):
    /// the text of every kind of delta a stream carried, or the bytes of a
    /// JSON body.
    pub fn delivered_output_estimate(&self) -> u64 {
        let bytes = match &self.mode {
            Mode::Json { large: Some(large), .. } => large.len(),
            Mode::Json { first, rest, .. } => json_held(first, rest) as u64,
            Mode::Sse { .. } => self.text_bytes,
        };
        bytes.div_ceil(BYTES_PER_TOKEN_ESTIMATE)
    }

    pub fn reported(&self) -> Reported {
        self.reported
    }

    /// Whether [`Meter::delivered_output_estimate`] counts generated text
    /// (a stream's deltas), not a whole body's bytes (ids, metadata and
    /// structure with the text).
    pub fn estimate_counts_text(&self) -> bool {
        matches!(self.mode, Mode::Sse { .. })
    }

    /// The usage came in the event that ends a stream (or `[DONE]` came), or
    /// in a whole JSON body: a stream cut before that has seen at most a
    /// running total. Meaningful once [`Meter::finish`] has run.
    pub fn usage_is_final(&self) -> bool {
        self.usage_final
    }

    /// The rewriter holds bytes of an event it has not seen the end of.
    pub fn holds_bytes(&self) -> bool {
        matches!(&self.mode, Mode::Sse { pending_event, .. } if !pending_event.is_empty())
    }

    /// Hands each complete line to `on_line`: straight from the chunk when
    /// no earlier part of it is pending, so most lines are never copied.
    /// Lines end at LF, CR or CRLF (the SSE grammar); a CRLF split across
    /// chunks only adds an empty line, which means nothing to the meter.
    /// `may_carry_usage: false` says the caller already found no usage in
    /// these bytes but `"usage": null` (see [`UsageKeys`]).
    fn scan_lines(&mut self, chunk: &[u8], may_carry_usage: bool) {
        let Mode::Sse { line, long_line, .. } = &mut self.mode else {
            return;
        };
        let mut pending = std::mem::take(line);
        let mut long = long_line.take();
        let mut rest = chunk;
        while let Some(at) = memchr::memchr2(b'\n', b'\r', rest) {
            if let Some(mut reading) = long.take() {
                reading.feed(&rest[..at]);
                self.on_long_line(reading);
            } else if pending.is_empty() {
                self.on_line(&rest[..at], may_carry_usage);
            } else if pending.len() + at <= MAX_SSE_LINE_BYTES {
                pending.extend_from_slice(&rest[..at]);
                // The pending part came from an earlier chunk, unseen by the caller.
                self.on_line(&pending, true);
                pending.clear();
            } else {
                self.on_long_line(LongLine::starting(&pending, &rest[..at]));
                pending.clear();
            }
            rest = &rest[at + 1..];
        }
        if let Some(reading) = &mut long {
            reading.feed(rest);
        } else if pending.len() + rest.len() <= MAX_SSE_LINE_BYTES {
            pending.extend_from_slice(rest);
        } else {
            long = Some(LongLine::starting(&pending, rest));
            // Given back: a long line keeps nothing.
            pending = BytesMut::new();
        }
        if let Mode::Sse { line, long_line, .. } = &mut self.mode {
            *line = pending;
            *long_line = long;
        }
    }

    /// A line too long to keep has ended: its usage, and whether its event
    /// ends the usage (told by its top-level `type`), as the reader read
    /// them. Its text is not counted toward a cut stream's estimate: a line
    /// this long is an event that repeats the output, not a delta.
    fn on_long_line(&mut self, line: LongLine) {
        let LongLine::Data(reader) = line else { return };
        if let Some(found) = reader.usage() {
            self.reported.merge(found);
            self.usage_final |= reader.ends_usage();
        }
    }

    fn on_line(&mut self, line: &[u8], may_carry_usage: bool) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data.starts_with(b"[DONE]") {
            self.usage_final = true;
            return;
        }
        self.text_bytes += delta_text_len(data);
        // Cheap scan before parsing: most events carry no usage, or only
        // the `"usage": null` that asking for it adds to every chunk.
        if may_carry_usage && carries_usage(data) {
            if let Some(found) = usage_from_bytes(data) {
                self.reported.merge(found);
                self.usage_final |= ends_usage(data);
            }
        }
    }

    /// Pass whole events through, minus the injected usage: the usage-only
    /// chunk is dropped and `"usage": null` fields are removed. An event
    /// still unfinished past [`MAX_SSE_EVENT_BYTES`] ends the rewriting: what
    /// is held goes out as it is and the rest of the stream passes untouched.
    /// Events are cut from the chunk itself when nothing is pending, so a
    /// chunk holding one event the rewrite leaves alone is never copied.
    fn observe_sse_rewriting(&mut self, chunk: Bytes) -> Bytes {
        let Mode::Sse { pending_event, .. } = &mut self.mode else {
            return chunk;
        };
        let mut input = if pending_event.is_empty() {
            chunk
        } else {
            pending_event.extend_from_slice(&chunk);
            if pending_event.len() <= MAX_SSE_EVENT_BYTES && event_end(pending_event).is_none() {
                // A long event arriving in pieces: keep appending, no copy back.
                return Bytes::new();
            }
            pending_event.split().freeze()
        };
        let mut out = Outgoing::default();
        while let Some(end) = event_end(&input) {
            let event = input.split_to(end);
            let usage = UsageKeys::of(&event);
            self.scan_lines(&event, usage.other);
            out.push(self.rewritten_event(event, usage));
        }
        if input.len() > MAX_SSE_EVENT_BYTES {
            self.strip_injected_usage = false;
            self.scan_lines(&input, true);
            out.push(input);
        } else if let Mode::Sse { pending_event, .. } = &mut self.mode {
            pending_event.extend_from_slice(&input);
        }
        out.into_bytes()
    }

    /// One whole event as the client gets it: nothing for the usage-only
    /// chunk the gateway asked for, otherwise the event without its
    /// `"usage": null` field.
    fn rewritten_event(&self, event: Bytes, usage: UsageKeys) -> Bytes {
        if usage.other && is_usage_only(&event) {
            return Bytes::new();
        }
        usage.without_nulls.unwrap_or(event)
    }
}

/// What the rewriter sends for one chunk: usually one event, passed on as
/// it is; several are joined.
#[derive(Default)]
enum Outgoing {
    #[default]
    Nothing,
    One(Bytes),
    Joined(BytesMut),
}

impl Outgoing {
    fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        *self = match std::mem::take(self) {
            Outgoing::Nothing => Outgoing::One(bytes),
            Outgoing::One(first) => {
                let mut joined = BytesMut::with_capacity(first.len() + bytes.len());
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&bytes);
                Outgoing::Joined(joined)
            }
            Outgoing::Joined(mut joined) => {
                joined.extend_from_slice(&bytes);
                Outgoing::Joined(joined)
            }
        };
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Outgoing::Nothing => Bytes::new(),
            Outgoing::One(bytes) => bytes,
            Outgoing::Joined(joined) => joined.freeze(),
        }
    }
}

/// Bytes of a JSON body the meter holds: its first chunk and the rest.
fn json_held(first: &Option<Bytes>, rest: &BytesMut) -> usize {
    first.as_ref().map_or(0, Bytes::len) + rest.len()
}

/// Longest SSE event the rewriter holds back while waiting for its end.
const MAX_SSE_EVENT_BYTES: usize = 1024 * 1024;

/// Where the first event in `buffer` ends (after its blank line), with lines
/// ended by LF, CRLF or CR. A CR at the very end waits for the next byte,
/// which may be its LF.
fn event_end(buffer: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    while let Some(offset) = memchr::memchr2(b'\n', b'\r', &buffer[line_start..]) {
        let end = line_start + offset;
        let next = match buffer[end] {
            b'\r' => match buffer.get(end + 1) {
                Some(b'\n') => end + 2,
                Some(_) => end + 1,
                None => return None,
            },
            _ => end + 1,
        };
        if end == line_start {
            // An empty line: the event ends here.
            return Some(next);
        }
        line_start = next;
    }
    None
}

/// Whether a data line's usage is the call's last word: OpenAI's usage-only
/// chunk (`choices` empty), a Responses API ending (`response.completed`,
/// `.incomplete`, `.failed`) or Anthropic's `message_delta`. A provider that
/// reports a running total on every chunk (vLLM's continuous usage stats)
/// sends usage before its end too: a floor, not the bill.
fn ends_usage(data: &[u8]) -> bool {
    let choices_empty = || {
        CHOICES_KEY.find_iter(data).any(|at| {
            let colon = skip_whitespace(data, at + CHOICES_KEY.needle().len());
            let open = skip_whitespace(data, colon + 1);
            data.get(colon) == Some(&b':')
                && data.get(open) == Some(&b'[')
                && data.get(skip_whitespace(data, open + 1)) == Some(&b']')
        })
    };
    FINAL_EVENTS.iter().any(|kind| kind.find(data).is_some()) || choices_empty()
}

/// The event is the usage-only chunk: `choices` an empty array and `usage`
/// an object, however the JSON is spaced.
fn is_usage_only(event: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Chunk {
        choices: Option<Vec<serde::de::IgnoredAny>>,
        usage: Option<Value>,
    }
    if !carries_usage(event) || CHOICES_KEY.find(event).is_none() {
        return false;
    }
    event_data(event).is_some_and(|data| {
        serde_json::from_slice::<Chunk>(&data).is_ok_and(|chunk| {
            chunk.choices.is_some_and(|c| c.is_empty()) && chunk.usage.is_some_and(|u| u.is_object())
        })
    })
}

/// The data of an event: its `data:` lines joined by LF.
fn event_data(event: &[u8]) -> Option<Vec<u8>> {
    let mut data: Option<Vec<u8>> = None;
    for line in event.split(|b| *b == b'\n' || *b == b'\r') {
        if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            let joined = data.get_or_insert_with(Vec::new);
            if !joined.is_empty() {
                joined.push(b'\n');
            }
            joined.extend_from_slice(value);
        }
    }
    data
}

/// Whether `json` may carry a usage object: it has a `"usage"` that is not
/// a key whose value is `null`. Inside a JSON string a quote is escaped, so
/// the bytes `"usage"` are a key or a whole string value; a value is never
/// followed by a colon. So when every one is followed by `: null`, no
/// parse can find usage in it, and the chunks a stream sends with
/// `include_usage` are passed without one.
fn carries_usage(json: &[u8]) -> bool {
    let mut from = 0;
    while let Some(found) = USAGE_KEY.find(&json[from..]) {
        from += found + USAGE_KEY.needle().len();
        let colon = skip_whitespace(json, from);
        if json.get(colon) != Some(&b':') || !json[skip_whitespace(json, colon + 1)..].starts_with(b"null") {
            return true;
        }
    }
    false
}

/// One pass over an event's `"usage"` keys: the event without the
/// `"usage": null` fields the gateway asked for (`None`: it has none), and
/// whether any other `"usage"` is in it, which [`carries_usage`] would call
/// usage. Without one, no line of the event carries usage.
struct UsageKeys {
    without_nulls: Option<Bytes>,
    other: bool,
}

impl UsageKeys {
    fn of(event: &[u8]) -> UsageKeys {
        // The byte ranges to cut, found first so that the rewritten event is
        // built at its exact size (a `Vec` with spare room becomes `Bytes`
        // through a second allocation).
        let mut cuts: SmallVec<[(usize, usize); 2]> = SmallVec::new();
        let mut other = false;
        let mut copied = 0;
        let mut from = 0;
        while let Some(found) = USAGE_KEY.find(&event[from..]) {
            let key = from + found;
            from = key + USAGE_KEY.needle().len();
            let after = skip_whitespace(event, from);
            let Some(b':') = event.get(after) else {
                other = true;
                continue;
            };
            let value = skip_whitespace(event, after + 1);
            if !event[value..].starts_with(b"null") {
                other = true;
                continue;
            }
            // Take the comma before the key, and the spaces around it, with
            // it; not a line end, which would join two lines of the event.
            let mut start = key;
            while start > copied && matches!(event[start - 1], b' ' | b'\t') {
                start -= 1;
            }
            if start == copied || event[start - 1] != b',' {
                continue;
            }
            start -= 1;
            cuts.push((start, value + 4));
            copied = value + 4;
            from = copied;
        }
        let without_nulls = (!cuts.is_empty()).then(|| {
            let removed: usize = cuts.iter().map(|(start, end)| end - start).sum();
            let mut buffer = Vec::with_capacity(event.len() - removed);
            let mut kept = 0;
            for (start, end) in cuts {
                buffer.extend_from_slice(&event[kept..start]);
                kept = end;
            }
            buffer.extend_from_slice(&event[kept..]);
            Bytes::from(buffer)
        });
        UsageKeys { without_nulls, other }
    }
}

fn skip_whitespace(bytes: &[u8], mut at: usize) -> usize {
    while bytes.get(at).is_some_and(|b| *b == b' ' || *b == b'\t') {
        at += 1;
    }
    at
}

/// Length of the generated text in a stream delta, of every kind the APIs
/// send: OpenAI `content`, `refusal`, tool-call `arguments`, reasoning text;
/// Responses API `delta`; Anthropic `text`, `thinking` and `partial_json`.
/// Every API puts the generated text in a `delta` (the text itself, or an
/// object holding it), so only the value of each `"delta"` key is read: one
/// search for the key, then a walk over that value alone. Text outside a
/// delta (a `done` event repeating it, logprobs) does not count, and every
/// choice of an `n`-choice chunk does. Read without parsing the event; a
/// non-string value counts nothing.
fn delta_text_len(data: &[u8]) -> u64 {
    let mut total = 0;
    let mut from = 0;
    while let Some(at) = DELTA_KEY.find(&data[from..]) {
        let (text, end) = delta_value_text(data, from + at + DELTA_KEY.needle().len());
        total += text;
        from = end;
    }
    total
}

/// Keys whose string value is generated text, inside a delta.
const TEXT_KEYS: [&[u8]; 8] = [
    b"content",
    b"text",
    b"arguments",
    b"refusal",
    b"reasoning_content",
    b"reasoning",
    b"thinking",
    b"partial_json",
];

/// The text in the value of the key that ends at `at` (a string: its
/// length; an object: the string values of its [`TEXT_KEYS`], at any
/// depth), and where that value ends. A byte loop: a delta is short, and
/// walking it once costs less than a substring search per key.
fn delta_value_text(json: &[u8], at: usize) -> (u64, usize) {
    let colon = skip_whitespace(json, at);
    if json.get(colon) != Some(&b':') {
        return (0, at);
    }
    let start = skip_whitespace(json, colon + 1);
    match json.get(start) {
        Some(b'"') => match string_end(json, start + 1) {
            Some((close, weight)) => (weight, close + 1),
            None => (0, json.len()),
        },
        Some(b'{') => {
            let (mut total, mut depth, mut i) = (0, 0usize, start);
            while i < json.len() {
                match json[i] {
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return (total, i + 1);
                        }
                    }
                    b'"' => {
                        let Some((close, _)) = string_end(json, i + 1) else { break };
                        let name = &json[i + 1..close];
                        i = close + 1;
                        let colon = skip_whitespace(json, i);
                        if json.get(colon) == Some(&b':') && TEXT_KEYS.contains(&name) {
                            let value = skip_whitespace(json, colon + 1);
                            if json.get(value) == Some(&b'"') {
                                let Some((end, weight)) = string_end(json, value + 1) else { break };
                                total += weight;
                                i = end + 1;
                            }
                        }
                        continue;
                    }
                    _ => {}
                }
                i += 1;
            }
            (total, json.len())
        }
        _ => (0, start),
    }
}

/// Where the JSON string whose text starts at `from` ends (its closing
/// quote; `None` when it does not end in `bytes`), and the text's weight
/// for a cut-short estimate: its bytes, a character beyond ASCII counted as
/// four (about a token each; CJK text at four bytes a token would be
/// charged a third).
fn string_end(bytes: &[u8], mut from: usize) -> Option<(usize, u64)> {
    let start = from;
    let mut extra = 0u64;
    while from < bytes.len() {
        match bytes[from] {
            b'"' => return Some((from, (from - start) as u64 + extra)),
            // An escape: the byte after the backslash does not end the string.
            b'\\' => from += 2,
            lead => {
                // A UTF-8 lead byte: 2, 3 or 4 bytes make the character.
                extra += match lead {
                    0xC0..=0xDF => 2,
                    0xE0..=0xEF => 1,
                    _ => 0,
                };
                from += 1;
            }
        }
    }
    None
}

/// A substring searcher built once: building one costs more than most
/// searches of a short event.
type Needle = LazyLock<Finder<'static>>;

static USAGE_KEY: Needle = LazyLock::new(|| Finder::new(b"\"usage\""));
static CHOICES_KEY: Needle = LazyLock::new(|| Finder::new(b"\"choices\""));
static DELTA_KEY: Needle = LazyLock::new(|| Finder::new(b"\"delta\""));
/// Event types whose usage ends a stream's.
static FINAL_EVENTS: LazyLock<[Finder<'static>; 4]> = LazyLock::new(|| {
    [
        Finder::new(b"\"response.completed\""),
        Finder::new(b"\"response.incomplete\""),
        Finder::new(b"\"response.failed\""),
        Finder::new(b"\"message_delta\""),
    ]
});

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn feed_split(meter: &mut Meter, text: &[u8], at: usize) -> Vec<u8> {
        let mut out = meter.observe(Bytes::copy_from_slice(&text[..at])).to_vec();
        out.extend_from_slice(&meter.observe(Bytes::copy_from_slice(&text[at..])));
        out
    }

    const OPENAI_STREAM: &str = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"hello\"}}],\"id\":\"x\",\"usage\":null}\n\n",
        "data: {\"choices\":[],\"id\":\"x\",\"usage\":{\"completion_tokens\":7,\"prompt_tokens\":11,\"total_tokens\":18}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn only_null_usage_keys_are_known_to_carry_no_usage() {
        for none in [
            &br#"{"id":"x","usage":null}"#[..],
            br#"{"usage" :  null,"choices":[]}"#,
            br#"{"choices":[{"delta":{"content":"say \"usage\": {\"total_tokens\": 9}"}}]}"#,
            br#"{"a":{"usage":null},"usage":null}"#,
            b"{}",
        ] {
            assert!(!carries_usage(none), "{}", String::from_utf8_lossy(none));
        }
        for some in [
            &br#"{"choices":[],"usage":{"total_tokens":3}}"#[..],
            br#"{"a":{"usage":null},"usage":{"total_tokens":3}}"#,
            br#"{"usage":	{"total_tokens":3},"b":{"usage":null}}"#,
            br#"{"usage":"odd"}"#,
            br#"{"role":"usage","usage":null}"#,
            br#"{"usage"}"#,
        ] {
            assert!(carries_usage(some), "{}", String::from_utf8_lossy(some));
        }
    }

    #[test]
    fn openai_stream_usage_is_found_at_every_split_point() {
        for at in 0..=OPENAI_STREAM.len() {
            let mut meter = Meter::new(true, false);
            let out = feed_split(&mut meter, OPENAI_STREAM.as_bytes(), at);
            assert_eq!(out, OPENAI_STREAM.as_bytes(), "bytes pass unchanged (split at {at})");
            let r = meter.finish();
            assert_eq!((r.input_tokens, r.output_tokens), (Some(11), Some(7)), "split at {at}");
        }
    }

    #[test]
    fn injected_usage_is_removed_at_every_split_point() {
        let expected =
            "data: {\"choices\":[{\"delta\":{\"content\":\"hello\"}}],\"id\":\"x\"}\n\ndata: [DONE]\n\n";
        for at in 0..=OPENAI_STREAM.len() {
            let mut meter = Meter::new(true, true);
            let out = feed_split(&mut meter, OPENAI_STREAM.as_bytes(), at);
            assert_eq!(String::from_utf8(out).unwrap(), expected, "split at {at}");
            assert_eq!(meter.finish().output_tokens, Some(7));
        }
    }

    /// Feed `text` split at `at`, then end the body; what the client gets.
    fn feed_to_end(meter: &mut Meter, text: &[u8], at: usize) -> Vec<u8> {
        let mut out = feed_split(meter, text, at);
        out.extend_from_slice(&meter.end_of_body());
        out
    }

    #[test]
    fn crlf_framed_spaced_json_loses_only_the_injected_usage_at_every_split_point() {
        // Proves the rewriter finds events by any SSE line ending and the usage chunk however
        // its JSON is spaced: a real provider writes CRLF and `"choices": []`.
        let stream = concat!(
            "data: {\"id\": \"x\", \"choices\": [{\"delta\": {\"content\": \"hello\"}}], \"usage\": null}\r\n\r\n",
            "data: {\"id\": \"x\", \"choices\": [], \"usage\": {\"prompt_tokens\": 11, \"completion_tokens\": 7}}\r\n\r\n",
            "data: [DONE]\r\n\r\n",
        );
        let expected =
            "data: {\"id\": \"x\", \"choices\": [{\"delta\": {\"content\": \"hello\"}}]}\r\n\r\ndata: [DONE]\r\n\r\n";
        for at in 0..=stream.len() {
            let mut meter = Meter::new(true, true);
            let out = feed_to_end(&mut meter, stream.as_bytes(), at);
            assert_eq!(String::from_utf8(out).unwrap(), expected, "split at {at}");
            let r = meter.finish();
            assert_eq!((r.input_tokens, r.output_tokens), (Some(11), Some(7)), "split at {at}");
        }
    }

    #[test]
    fn the_rewrite_is_the_same_however_the_stream_is_cut_into_chunks() {
        // Usage in a chunk that still has choices is read and kept; only the
        // usage-only chunk and the `"usage":null` members go.
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"he\"}}],\"usage\":null}\n\n",
            ": a comment\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"llo\"}}], \"usage\" : null}\r\n\r\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7}}\n\n",
            "data: [DONE]\n\n",
        );
        let expected = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"he\"}}]}\n\n",
            ": a comment\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"llo\"}}]}\r\n\r\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        );
        for size in [1, 2, 3, 7, 64, stream.len()] {
            let mut meter = Meter::new(true, true);
            let mut out = Vec::new();
            for chunk in stream.as_bytes().chunks(size) {
                out.extend_from_slice(&meter.observe(Bytes::copy_from_slice(chunk)));
            }
            out.extend_from_slice(&meter.end_of_body());
            assert_eq!(String::from_utf8(out).unwrap(), expected, "chunks of {size}");
            let r = meter.finish();
            assert_eq!((r.input_tokens, r.output_tokens), (Some(11), Some(7)), "chunks of {size}");
            assert_eq!(meter.delivered_output_estimate(), 2, "5 bytes of text, chunks of {size}");
        }
    }

    /// Lines an upstream's stream is made of, some of them odd: usage
    /// spaced or not, in the usage-only chunk or beside choices, a key cut
    /// from its value by a line end, comments, blank lines.
    fn any_line() -> impl proptest::strategy::Strategy<Value = &'static str> {
        proptest::sample::select(vec![
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}",
            "data: {\"choices\":[{\"delta\":{\"content\":\"a b\"}}], \"usage\" : null}",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7}}",
            "data: {\"choices\": [], \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 9}}",
            "data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}",
            "data: [DONE]",
            ": keep-alive",
            "event: message",
            "data: {\"usage\"",
            "data: :null}",
            "\"usage\":null",
            "data: {\"a\":1,",
            "",
        ])
    }

    /// What the client gets, the usage and the cut-short estimate when the
    /// stream arrives cut at `cuts`.
    fn metered(stream: &[u8], cuts: &[usize], strip: bool) -> (Vec<u8>, Reported, u64) {
        let mut meter = Meter::new(true, strip);
        let mut out = Vec::new();
        let mut from = 0;
        for &at in cuts.iter().chain([&stream.len()]) {
            out.extend_from_slice(&meter.observe(Bytes::copy_from_slice(&stream[from..at])));
            from = at;
        }
        out.extend_from_slice(&meter.end_of_body());
        (out, meter.finish(), meter.delivered_output_estimate())
    }

    proptest::proptest! {
        #[test]
        fn what_the_client_gets_and_the_usage_do_not_depend_on_where_the_stream_is_cut(
            lines in proptest::collection::vec(
                (any_line(), proptest::sample::select(vec!["\n", "\r\n", "\r"])), 0..24),
            cuts in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..12),
            strip in proptest::prelude::any::<bool>(),
        ) {
            let stream: Vec<u8> = lines.iter().flat_map(|(line, end)| [*line, *end].concat().into_bytes()).collect();
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            cuts.sort_unstable();
            let whole = metered(&stream, &[], strip);
            proptest::prop_assert_eq!(metered(&stream, &cuts, strip), whole);
        }
    }

    #[test]
    fn a_null_usage_on_a_line_of_its_own_is_not_removed_with_the_line_end_before_it() {
        // Taking `,\r` with it would join the event's two lines into one.
        let event = "data: {\"a\":1,\r\"usage\":null}\n\n";
        let mut meter = Meter::new(true, true);
        assert_eq!(meter.observe(Bytes::from_static(event.as_bytes())), event.as_bytes());
    }

    #[test]
    fn an_event_the_rewrite_leaves_alone_is_passed_on_without_a_copy() {
        let mut meter = Meter::new(true, true);
        let event = Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
        let out = meter.observe(event.clone());
        assert_eq!(out, event);
        assert_eq!(out.as_ptr(), event.as_ptr(), "the chunk itself, not a copy");
    }

    #[test]
    fn a_last_event_without_its_blank_line_still_reaches_the_client_and_the_meter() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}";
        for strip in [true, false] {
            for at in 0..=stream.len() {
                let mut meter = Meter::new(true, strip);
                let out = feed_to_end(&mut meter, stream.as_bytes(), at);
                assert_eq!(String::from_utf8(out).unwrap(), stream, "strip {strip}, split at {at}");
                let r = meter.finish();
                assert_eq!(
                    (r.input_tokens, r.output_tokens),
                    (Some(3), Some(2)),
                    "strip {strip}, split at {at}"
                );
            }
        }
    }

    #[test]
    fn an_event_that_never_ends_is_passed_on_not_held_without_bound() {
        let mut meter = Meter::new(true, true);
        let chunk = Bytes::from(vec![b'a'; 64 * 1024]);
        let mut passed = 0;
        for _ in 0..(MAX_SSE_EVENT_BYTES / chunk.len() + 2) {
            passed += meter.observe(chunk.clone()).len();
        }
        assert!(passed > 0, "the held bytes went out once the bound was passed");
        assert!(!meter.holds_bytes() || passed >= MAX_SSE_EVENT_BYTES);
        assert_eq!(meter.observe(Bytes::from_static(b"data: x\n\n")).len(), 9, "later bytes pass at once");
    }

    #[test]
    fn every_kind_of_delta_counts_toward_a_cut_short_estimate() {
        // 8 bytes of text in each event, in the delta kinds of each API.
        let events = [
            r#"{"choices":[{"delta":{"content":"abcdefgh"}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{\"ab\"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"reasoning_content":"thinking"}}]}"#,
            r#"{"type":"response.output_text.delta","delta":"abcdefgh"}"#,
            r#"{"type":"response.function_call_arguments.delta","delta":"abcdefgh"}"#,
            r#"{"type":"content_block_delta","delta":{"type":"thinking_delta","thinking":"abcdefgh"}}"#,
            r#"{"type":"content_block_delta","delta":{"type":"input_json_delta","partial_json":"abcdefgh"}}"#,
            r#"{"type": "content_block_delta", "delta": {"type": "text_delta", "text": "abcdefgh"}}"#,
        ];
        for event in events {
            let mut meter = Meter::new(true, false);
            meter.observe(Bytes::from(format!("data: {event}\n\n")));
            assert_eq!(meter.delivered_output_estimate(), 2, "{event}");
        }
        // Each choice of an `n`-choice chunk counts; text outside a delta
        // (a `done` event repeating it, logprobs) does not.
        for (event, bytes) in [
            (
                r#"{"choices":[{"index":0,"delta":{"content":"abcdefgh"}},{"index":1,"delta":{"content":"abcdefgh"}}]}"#,
                16,
            ),
            (
                r#"{"choices":[{"index":0,"logprobs":{"content":"abcdefgh"},"delta":{"content":"abcdefgh"}}]}"#,
                8,
            ),
            (r#"{"type":"response.output_text.done","text":"abcdefghabcdefgh"}"#, 0),
            // An event cut off inside its delta counts what it holds.
            (r#"{"choices":[{"delta":{"content":"abcdefgh","refusal":"abc"#, 8),
            // An escaped quote, and a key's name inside a value, are not keys.
            (r#"{"choices":[{"delta":{"content":"a\"text\": \"b","role":"text"}}]}"#, 14),
            (
                r#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{}"}},{"function":{"arguments":"[]"}}]}}]}"#,
                4,
            ),
            // A character beyond ASCII weighs four (about a token): CJK (3 bytes), Cyrillic (2),
            // an emoji (4); an escaped one is its six bytes.
            (r#"{"choices":[{"delta":{"content":"你好"}}]}"#, 8),
            (r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":"да😀"}}"#, 12),
            (r#"{"delta":"a\u4f60"}"#, 7),
        ] {
            assert_eq!(delta_text_len(event.as_bytes()), bytes, "{event}");
        }
        let mut meter = Meter::new(false, false);
        meter.observe(Bytes::from_static(br#"{"choices":[{"message":{"content":"cut"#));
        assert!(meter.delivered_output_estimate() > 0, "a JSON body cut short counts its bytes");
    }

    #[test]
    fn anthropic_stream_takes_input_from_start_and_output_from_delta() {
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":20,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"abcdefgh\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n",
        );
        for at in 0..=stream.len() {
            let mut meter = Meter::new(true, false);
            feed_split(&mut meter, stream.as_bytes(), at);
            let r = meter.finish();
            assert_eq!((r.input_tokens, r.output_tokens), (Some(20), Some(9)), "split at {at}");
            assert_eq!(meter.delivered_output_estimate(), 2, "8 text bytes ~ 2 tokens");
        }
    }

    #[test]
    fn openrouter_cache_writes_are_read() {
        // OpenRouter reports Anthropic's cache writes beside OpenAI's cached reads.
        let body = br#"{"usage":{"completion_tokens":2,"cost":0.95,"prompt_tokens":194,"prompt_tokens_details":{"cached_tokens":10,"cache_write_tokens":100,"audio_tokens":0},"total_tokens":196}}"#;
        let r = usage_from_bytes(body).unwrap();
        assert_eq!(
            (r.input_tokens, r.cached_input_tokens, r.cache_write_5m_tokens),
            (Some(194), Some(10), Some(100))
        );
        assert_eq!(r.output_tokens, Some(2));
    }

    #[test]
    fn the_tier_that_served_the_call_is_read_beside_its_usage() {
        // OpenAI names it beside the usage (a body, a stream's usage chunk,
        // a Responses ending); Anthropic inside the usage.
        let cases: [(&[u8], Option<ServiceTier>); 6] = [
            (br#"{"service_tier":"priority","usage":{"prompt_tokens":1,"completion_tokens":1}}"#, Some(ServiceTier::Priority)),
            (br#"{"choices": [], "service_tier": "default", "usage": {"prompt_tokens":1,"completion_tokens":1}}"#, Some(ServiceTier::Default)),
            (br#"{"type":"response.completed","response":{"service_tier":"flex","usage":{"input_tokens":1,"output_tokens":1}}}"#, Some(ServiceTier::Flex)),
            (br#"{"usage":{"input_tokens":1,"output_tokens":1,"service_tier":"standard"}}"#, Some(ServiceTier::Default)),
            (br#"{"usage":{"input_tokens":1,"output_tokens":1,"service_tier":"priority"},"service_tier":7}"#, Some(ServiceTier::Priority)),
            (br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#, None),
        ];
        for (body, tier) in cases {
            let read = usage_from_bytes(body).unwrap();
            assert_eq!(read.served_tier, tier, "{}", String::from_utf8_lossy(body));
        }
        // In a stream: the usage chunk's, which the rewrite leaves in place.
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"service_tier\":\"priority\",\"usage\":null}\r\n\r\ndata: {\"choices\":[],\"service_tier\":\"priority\",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\r\n\r\ndata: [DONE]\r\n\r\n";
        let mut meter = Meter::new(true, true);
        meter.observe(Bytes::from_static(stream));
        assert_eq!(meter.finish().served_tier, Some(ServiceTier::Priority));
    }

    #[test]
    fn output_is_at_least_total_less_input() {
        // xAI counts reasoning in total_tokens but not in completion_tokens, and bills it.
        let xai = br#"{"usage":{"prompt_tokens":20,"completion_tokens":151,"total_tokens":553,"completion_tokens_details":{"reasoning_tokens":382}}}"#;
        assert_eq!(usage_from_bytes(xai).unwrap().output_tokens, Some(533));
        let openai = br#"{"usage":{"prompt_tokens":20,"completion_tokens":151,"total_tokens":171}}"#;
        assert_eq!(usage_from_bytes(openai).unwrap().output_tokens, Some(151));
        let responses = br#"{"usage":{"input_tokens":4,"output_tokens":6,"total_tokens":10}}"#;
        assert_eq!(usage_from_bytes(responses).unwrap().output_tokens, Some(6));
        let embeddings = br#"{"usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(usage_from_bytes(embeddings).unwrap().output_tokens, None);
    }

    #[test]
    fn usage_is_final_only_from_the_event_that_ends_it() {
        let cases: [(&str, bool); 9] = [
            ("data: {\"choices\": [{\"delta\": {}}], \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 1}}\n\n", false),
            ("data: {\"choices\": [], \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 9}}\n\n", true),
            ("data: {\"choices\":[ ],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":9}}\n\n", true),
            ("data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n", false),
            ("data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n", true),
            ("data: {\"type\":\"response.in_progress\",\"response\":{\"usage\":null}}\n\n", false),
            ("data: {\"type\":\"response.incomplete\",\"response\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":9}}}\n\n", true),
            ("data: {\"choices\": [{\"delta\": {\"content\": \"[]\"}}]}\n\n", false),
            ("data: [DONE]\n\n", true),
        ];
        for (event, ends) in cases {
            let mut meter = Meter::new(true, false);
            meter.observe(Bytes::from(event));
            assert_eq!(meter.usage_is_final(), ends, "{event}");
        }
        // A JSON body that parses arrived whole; one cut short does not parse.
        for (body, ends) in [
            (&br#"{"usage":{"prompt_tokens":3,"completion_tokens":9}}"#[..], true),
            (&br#"{"usage":{"#[..], false),
        ] {
            let mut meter = Meter::new(false, false);
            meter.observe(Bytes::from_static(body));
            meter.finish();
            assert_eq!(meter.usage_is_final(), ends);
        }
    }

    #[test]
    fn a_json_body_in_pieces_is_read_whole() {
        let body = br#"{"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}"#;
        for at in 0..=body.len() {
            for second in at..=body.len() {
                let mut meter = Meter::new(false, false);
                for part in [&body[..at], &body[at..second], &body[second..]] {
                    let out = meter.observe(Bytes::copy_from_slice(part));
                    assert_eq!(&out[..], part, "a JSON body passes as it came");
                }
                assert_eq!(meter.delivered_output_estimate(), (body.len() as u64).div_ceil(4));
                let r = meter.finish();
                assert_eq!(
                    (r.input_tokens, r.output_tokens),
                    (Some(5), Some(7)),
                    "split at {at} and {second}"
                );
            }
        }
    }

    #[test]
    fn only_the_first_json_chunk_is_held_where_it_lies() {
        let first = Bytes::from(br#"{"usage":"#.to_vec());
        let second = Bytes::from(br#"{"prompt_tokens":1,"completion_tokens":2}}"#.to_vec());
        let mut meter = Meter::new(false, false);
        drop(meter.observe(first.clone()));
        drop(meter.observe(second.clone()));
        assert!(!first.is_unique(), "the first chunk is kept, not copied");
        // A chunk is a slice of the connection's read buffer: one kept would
        // keep all of that buffer alive, for every chunk of a long body.
        assert!(second.is_unique(), "a later chunk is copied, not kept");
        let r = meter.finish();
        assert_eq!((r.input_tokens, r.output_tokens), (Some(1), Some(2)));
    }

    #[test]
    fn json_bodies_of_each_flavour() {
        let cases = [
            (
                r#"{"usage":{"prompt_tokens":5,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":2}}}"#,
                (5, 2, 3),
            ),
            (r#"{"usage":{"prompt_tokens":5,"total_tokens":5}}"#, (5, 0, 0)),
            (
                r#"{"usage":{"input_tokens":6,"output_tokens":4,"input_tokens_details":{"cached_tokens":1}}}"#,
                (6, 1, 4),
            ),
            (r#"{"usage":{"input_tokens":6,"output_tokens":4,"cache_read_input_tokens":10}}"#, (16, 10, 4)),
        ];
        for (body, (input, cached, output)) in cases {
            let mut meter = Meter::new(false, false);
            feed_split(&mut meter, body.as_bytes(), body.len() / 2);
            let r = meter.finish();
            assert_eq!(r.input_tokens, Some(input), "{body}");
            assert_eq!(r.cached_input_tokens.unwrap_or(0), cached, "{body}");
            assert_eq!(r.output_tokens.unwrap_or(0), output, "{body}");
        }
    }

    #[test]
    fn hosted_tool_calls_are_counted_from_a_streamed_responses_call() {
        let stream = concat!(
            "event: response.output_item.done\ndata: {\"type\":\"response.output_item.done\",\"item\":{\"type\":\"web_search_call\"}}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"output\":[{\"type\":\"web_search_call\"},{\"type\":\"file_search_call\"},{\"type\":\"web_search_call\"},{\"type\":\"message\"}],\"usage\":{\"input_tokens\":9,\"output_tokens\":4}}}\n\n",
        );
        let mut meter = Meter::new(true, false);
        meter.observe(Bytes::from_static(stream.as_bytes()));
        let r = meter.finish();
        assert_eq!(r.hosted_calls[HostedTool::WebSearch.index()], 2);
        assert_eq!(r.hosted_calls[HostedTool::FileSearch.index()], 1);
        assert_eq!((r.input_tokens, r.output_tokens), (Some(9), Some(4)));
    }

    #[test]
    fn anthropic_cache_writes_are_read_by_lifetime() {
        let body = br#"{"usage":{"input_tokens":10,"output_tokens":2,"cache_read_input_tokens":5,"cache_creation_input_tokens":300,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200}}}"#;
        let mut meter = Meter::new(false, false);
        meter.observe(Bytes::from_static(body));
        let r = meter.finish();
        assert_eq!(r.input_tokens, Some(315), "plain + cache reads + cache writes");
        assert_eq!((r.cache_write_5m_tokens, r.cache_write_1h_tokens), (Some(100), Some(200)));
        let general = serde_json::from_slice::<Value>(body).ok().as_ref().and_then(usage_from_json);
        assert_eq!(general, Some(r), "the general parse agrees");
        let mut meter = Meter::new(false, false);
        meter.observe(Bytes::from_static(
            br#"{"usage":{"input_tokens":1,"output_tokens":1,"cache_creation_input_tokens":7}}"#,
        ));
        let r = meter.finish();
        assert_eq!(
            (r.cache_write_5m_tokens, r.cache_write_1h_tokens),
            (Some(7), None),
            "unsplit writes are 5-minute writes"
        );
    }

    #[test]
    fn negative_or_garbage_usage_is_not_believed() {
        let mut meter = Meter::new(false, false);
        meter.observe(Bytes::from_static(br#"{"usage":{"prompt_tokens":-5,"completion_tokens":"many"}}"#));
        let r = meter.finish();
        assert_eq!((r.input_tokens, r.output_tokens), (None, None));
        let mut meter = Meter::new(false, false);
        meter.observe(Bytes::from_static(b"not json at all"));
        assert!(!meter.finish().is_complete());
    }

    #[test]
    fn usage_is_read_past_bytes_that_are_not_utf8_in_a_skipped_string() {
        // The whole-body UTF-8 check fails; the slice reader, which checks
        // only what it reads, still finds the usage, as before that check.
        let mut body = br#"{"choices":[{"message":{"content":"caf"#.to_vec();
        body.extend_from_slice(b"\xe9");
        body.extend_from_slice(br#""}}],"usage":{"prompt_tokens":5,"completion_tokens":7}}"#);
        assert!(std::str::from_utf8(&body).is_err());
        let mut meter = Meter::new(false, false);
        meter.observe(Bytes::from(body));
        let r = meter.finish();
        assert_eq!((r.input_tokens, r.output_tokens), (Some(5), Some(7)));
    }

    #[test]
    fn the_fast_parse_reads_what_the_general_one_reads() {
        let documents: [&[u8]; 15] = [
            br#"{"usage":{"prompt_tokens":20,"completion_tokens":151,"total_tokens":553}}"#,
            br#"{"usage":{"prompt_tokens":194,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":10,"cache_write_tokens":100}}}"#,
            br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":5,"completion_tokens":7,"prompt_tokens_details":{"cached_tokens":2}}}"#,
            br#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":9,"output_tokens":1,"cache_read_input_tokens":3}}}"#,
            br#"{"type":"response.completed","response":{"output":[],"usage":{"input_tokens":4,"output_tokens":6,"input_tokens_details":{"cached_tokens":1}}}}"#,
            br#"{"usage":null,"message":{"usage":{"input_tokens":2,"output_tokens":3}}}"#,
            br#"{"usage":"lots","response":{"usage":{"input_tokens":1,"output_tokens":1}}}"#,
            br#"{"message":"a string","usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            br#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":8,"completion_tokens":2}}"#,
            br#"{"usage":{"prompt_tokens":-1,"completion_tokens":1.5}}"#,
            br#"[1,2,3]"#,
            br#"{"message":{"usage":[]}}"#,
            br#"{"usage":{"prompt_tokens":{"a":[1]},"completion_tokens":[1,{}],"input_tokens":7,"output_tokens":true}}"#,
            br#"{"usage":{"prompt_tokens_details":{"cached_tokens":"x"},"input_tokens_details":{"cached_tokens":3},"prompt_tokens":4}}"#,
            br#"{"usage":{"input_tokens":18446744073709551615,"cache_read_input_tokens":5,"output_tokens":0}}"#,
        ];
        for document in documents {
            let general = serde_json::from_slice::<Value>(document).ok().as_ref().and_then(usage_from_json);
            let general = general.filter(|r| *r != Reported::default());
            let fast = usage_from_bytes(document).filter(|r| *r != Reported::default());
            assert_eq!(fast, general, "{}", String::from_utf8_lossy(document));
        }
    }
}
