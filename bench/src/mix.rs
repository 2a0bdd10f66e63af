//! The request mix. Request number `seq` always becomes the same request (a
//! hash of the seed and `seq` picks key, model or tool, size and streaming),
//! so every mode of a round sends the same kind of traffic and the audit can
//! rebuild any request, and the hold it needed, from its number alone.

use anyhow::{bail, Context};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use creditgate::pricing::{HoldRequest, PriceTable, TokenUsage};
use rust_decimal::Decimal;

/// Units the gateway holds for on a tool route that reads units from a
/// response header (its rule: the most a call may report, then settle at
/// most the hold).
pub const TOOL_HOLD_UNITS: u64 = 100;
/// The one tool of the mix (the mock serves it; config/prices.toml prices it).
pub const TOOL: &str = "web-search";
pub const TOOL_PATH: &str = "/v1/tools/web-search";

/// Which API shape a model is called through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Messages,
    Embeddings,
    Responses,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Messages => "/v1/messages",
            Api::Embeddings => "/v1/embeddings",
            Api::Responses => "/v1/responses",
        }
    }

    /// The mock streams chat and messages only.
    fn streams(self) -> bool {
        matches!(self, Api::Chat | Api::Messages)
    }
}

/// One entry of `--models`: `api:model=weight`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelChoice {
    pub api: Api,
    pub model: String,
    pub weight: u32,
}

impl ModelChoice {
    pub fn parse(text: &str) -> anyhow::Result<ModelChoice> {
        let (api, rest) = text.split_once(':').with_context(|| {
            format!("--models entry {text:?}: write `api:model=weight`, e.g. chat:mock-gpt=2")
        })?;
        let api = match api.trim() {
            "chat" => Api::Chat,
            "messages" => Api::Messages,
            "embeddings" => Api::Embeddings,
            "responses" => Api::Responses,
            other => bail!(
                "--models entry {text:?}: unknown api {other:?} (chat, messages, embeddings, responses)"
            ),
        };
        let (model, weight) = match rest.split_once('=') {
            Some((model, weight)) => (
                model.trim(),
                weight
                    .trim()
                    .parse::<u32>()
                    .with_context(|| format!("--models entry {text:?}: bad weight"))?,
            ),
            None => (rest.trim(), 1),
        };
        if model.is_empty() || weight == 0 {
            bail!("--models entry {text:?}: needs a model name and a weight of 1 or more");
        }
        Ok(ModelChoice { api, model: model.to_owned(), weight })
    }
}

/// What to send, before keys are known.
#[derive(Debug, Clone)]
pub struct MixConfig {
    pub models: Vec<ModelChoice>,
    pub tool_share: f64,
    pub stream_share: f64,
    pub body_bytes: Vec<usize>,
    pub max_tokens: u64,
    /// Share of requests sent with the small wallets' keys.
    pub dry_share: f64,
    /// Share of streamed requests whose client hangs up after the first
    /// chunk: the gateway must still charge the usage the upstream reports.
    pub abandon_share: f64,
    /// Share of funded model requests that name no output cap: the gateway
    /// holds and forwards the price table's default.
    pub no_cap_share: f64,
    pub seed: u64,
}

impl MixConfig {
    /// The fixed request of the concurrency-1 pass: a small non-streaming chat
    /// call with a funded key.
    pub fn latency_probe() -> MixConfig {
        MixConfig {
            models: vec![ModelChoice { api: Api::Chat, model: "mock-gpt".into(), weight: 1 }],
            tool_share: 0.0,
            stream_share: 0.0,
            body_bytes: vec![200],
            max_tokens: 16,
            dry_share: 0.0,
            abandon_share: 0.0,
            no_cap_share: 0.0,
            seed: 7,
        }
    }

    /// Every model and the tool must be priced, or the audit could not price them.
    pub fn check_priced(&self, prices: &PriceTable, now: DateTime<Utc>) -> anyhow::Result<()> {
        for choice in &self.models {
            if prices.model(&choice.model, now).is_none() {
                bail!("model {:?} of --models is not in the price file", choice.model);
            }
        }
        if self.tool_share > 0.0 && prices.tool(TOOL, now).is_none() {
            bail!("the tool {TOOL:?} is not in the price file");
        }
        Ok(())
    }
}

/// How many keys of each kind requests can pick from.
#[derive(Debug, Clone, Copy)]
pub struct KeyCounts {
    /// Funded keys are numbered `0..funded`.
    pub funded: usize,
    /// Keys of small wallets follow: `funded..funded + dry`.
    pub dry: usize,
}

/// What a request calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Model { api: Api, model: String, stream: bool, max_tokens: Option<u64> },
    Tool { num_results: u64 },
}

/// One request of the mix.
#[derive(Debug, Clone)]
pub struct Spec {
    pub seq: u64,
    /// Index into the seeded keys.
    pub key: usize,
    pub call: Call,
    pub body: Bytes,
    /// The client reads the first chunk and hangs up.
    pub abandon: bool,
}

impl Spec {
    pub fn path(&self) -> &'static str {
        match &self.call {
            Call::Model { api, .. } => api.path(),
            Call::Tool { .. } => TOOL_PATH,
        }
    }

    pub fn streams(&self) -> bool {
        matches!(self.call, Call::Model { stream: true, .. })
    }

    /// What the gateway must hold for this request, from the documented
    /// rules: every body byte as an input token plus `max_tokens` of output
    /// plus the per-request fee; a tool's cost at [`TOOL_HOLD_UNITS`].
    pub fn hold(&self, prices: &PriceTable, now: DateTime<Utc>) -> anyhow::Result<Decimal> {
        match &self.call {
            Call::Model { model, max_tokens, .. } => {
                let price = prices.model(model, now).with_context(|| format!("{model} is not priced"))?;
                let request =
                    HoldRequest { input_bytes: self.body.len() as u64, max_output_tokens: *max_tokens };
                Ok(price.hold_amount(&request)?)
            }
            Call::Tool { .. } => {
                let price = prices.tool(TOOL, now).with_context(|| format!("{TOOL} is not priced"))?;
                Ok(price.hold_amount(TOOL_HOLD_UNITS)?)
            }
        }
    }

    /// What the request costs given the usage the upstream reported (tokens,
    /// or tool units): list price, a tool call never above its hold.
    pub fn cost(
        &self,
        prices: &PriceTable,
        now: DateTime<Utc>,
        usage: &TokenUsage,
        units: u64,
    ) -> anyhow::Result<Decimal> {
        match &self.call {
            Call::Model { model, .. } => {
                let price = prices.model(model, now).with_context(|| format!("{model} is not priced"))?;
                Ok(price.cost(usage)?)
            }
            Call::Tool { .. } => {
                let price = prices.tool(TOOL, now).with_context(|| format!("{TOOL} is not priced"))?;
                Ok(price.cost(units)?.min(price.hold_amount(TOOL_HOLD_UNITS)?))
            }
        }
    }
}

/// The mix with its key counts: request `seq` → [`Spec`].
#[derive(Debug, Clone)]
pub struct Mix {
    config: MixConfig,
    keys: KeyCounts,
    total_weight: u64,
}

impl Mix {
    pub fn new(config: MixConfig, keys: KeyCounts) -> Mix {
        let total_weight = config.models.iter().map(|m| u64::from(m.weight)).sum();
        Mix { config, keys, total_weight }
    }

    pub fn spec(&self, seq: u64) -> Spec {
        let mut draws = Draws::new(self.config.seed, seq);
        let key = if self.keys.dry > 0 && draws.chance(self.config.dry_share) {
            self.keys.funded + draws.below(self.keys.dry as u64) as usize
        } else {
            draws.below(self.keys.funded.max(1) as u64) as usize
        };
        let size = self.config.body_bytes[draws.below(self.config.body_bytes.len() as u64) as usize];
        let call = if self.total_weight == 0 || draws.chance(self.config.tool_share) {
            Call::Tool { num_results: 1 + draws.below(10) }
        } else {
            let mut pick = draws.below(self.total_weight);
            let choice = self
                .config
                .models
                .iter()
                .find(|m| {
                    let found = pick < u64::from(m.weight);
                    pick = pick.saturating_sub(u64::from(m.weight));
                    found
                })
                .unwrap_or(&self.config.models[0]);
            let stream = choice.api.streams() && draws.chance(self.config.stream_share);
            // A wallet that cannot pay the default cap gets a lower one: the
            // audit cannot know which, so only funded keys leave it out.
            let funded = key < self.keys.funded;
            let capped = !(funded && draws.chance(self.config.no_cap_share));
            let max_tokens = (choice.api != Api::Embeddings && capped).then_some(self.config.max_tokens);
            Call::Model { api: choice.api, model: choice.model.clone(), stream, max_tokens }
        };
        let abandon =
            matches!(call, Call::Model { stream: true, .. }) && draws.chance(self.config.abandon_share);
        let body = body(&call, seq, size);
        Spec { seq, key, call, body, abandon }
    }
}

/// Which phase built which request number: phases run one after another, so
/// each one's numbers form one range.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    phases: Vec<(std::ops::Range<u64>, Source)>,
}

/// How a phase built its requests.
#[derive(Debug, Clone)]
pub enum Source {
    Mix(Mix),
    /// The SSE pass: paced chat streams of `frames` events with key `key`.
    Stream {
        key: usize,
        frames: u64,
    },
}

impl Catalog {
    pub fn add(&mut self, range: std::ops::Range<u64>, source: Source) {
        self.phases.push((range, source));
    }

    /// Request `seq` as it was sent, if one of the phases sent it.
    pub fn spec(&self, seq: u64) -> Option<Spec> {
        let (_, source) = self.phases.iter().find(|(range, _)| range.contains(&seq))?;
        Some(match source {
            Source::Mix(mix) => mix.spec(seq),
            Source::Stream { key, frames } => stream_spec(seq, *key, *frames),
        })
    }
}

/// A chat stream that asks for its own usage (so the gateway injects nothing)
/// and makes the mock write exactly `frames` content events.
pub fn stream_spec(seq: u64, key: usize, frames: u64) -> Spec {
    let body = format!(
        r#"{{"model":"mock-gpt","max_tokens":{frames},"seed":{},"stream":true,"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"frames"}}]}}"#,
        frames.saturating_sub(10)
    );
    let call =
        Call::Model { api: Api::Chat, model: "mock-gpt".into(), stream: true, max_tokens: Some(frames) };
    Spec { seq, key, call, body: Bytes::from(body), abandon: false }
}

/// The request body, padded with prompt text to about `size` bytes.
fn body(call: &Call, seq: u64, size: usize) -> Bytes {
    let skeleton = |pad: &str| match call {
        Call::Tool { num_results } => {
            format!(r#"{{"query":"load {seq} {pad}","num_results":{num_results}}}"#)
        }
        Call::Model { api: Api::Embeddings, model, .. } => {
            format!(r#"{{"model":"{model}","input":"{pad}"}}"#)
        }
        Call::Model { api: Api::Responses, model, max_tokens, .. } => format!(
            r#"{{"model":"{model}",{}"seed":{seq},"input":"{pad}"}}"#,
            cap("max_output_tokens", *max_tokens)
        ),
        Call::Model { model, stream, max_tokens, .. } => format!(
            r#"{{"model":"{model}",{}"seed":{seq},"stream":{stream},"messages":[{{"role":"user","content":"{pad}"}}]}}"#,
            cap("max_tokens", *max_tokens)
        ),
    };
    let bare = skeleton("").len();
    let pad = "lorem ipsum ".repeat(size.saturating_sub(bare).div_ceil(12));
    let pad = &pad[..size.saturating_sub(bare)];
    Bytes::from(skeleton(pad))
}

/// The output cap member of a body (with its comma), or nothing.
fn cap(field: &str, max_tokens: Option<u64>) -> String {
    max_tokens.map(|n| format!(r#""{field}":{n},"#)).unwrap_or_default()
}

/// Deterministic draws for one request (splitmix64 over seed and sequence).
struct Draws(u64);

impl Draws {
    fn new(seed: u64, seq: u64) -> Draws {
        Draws(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, share: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < share
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix() -> Mix {
        let config = MixConfig {
            models: vec![
                ModelChoice::parse("chat:mock-gpt=3").expect("parses"),
                ModelChoice::parse("embeddings:mock-embed").expect("parses"),
            ],
            tool_share: 0.1,
            stream_share: 0.5,
            body_bytes: vec![100, 5000],
            max_tokens: 32,
            dry_share: 0.1,
            abandon_share: 0.2,
            no_cap_share: 0.2,
            seed: 3,
        };
        Mix::new(config, KeyCounts { funded: 4, dry: 2 })
    }

    #[test]
    fn the_same_number_is_the_same_request() {
        let (a, b) = (mix().spec(41), mix().spec(41));
        assert_eq!((a.key, &a.call, &a.body), (b.key, &b.call, &b.body), "deterministic per seq");
    }

    #[test]
    fn bodies_are_json_of_about_the_asked_size() {
        let mix = mix();
        for seq in 0..200 {
            let spec = mix.spec(seq);
            let value: serde_json::Value = serde_json::from_slice(&spec.body).expect("body is JSON");
            assert!(value.is_object(), "seq {seq}");
            assert!(
                spec.body.len() >= 100 && spec.body.len() <= 5100,
                "seq {seq}: {} bytes",
                spec.body.len()
            );
        }
    }

    #[test]
    fn shares_come_out_near_what_was_asked() {
        let mix = mix();
        let specs: Vec<Spec> = (0..10_000).map(|seq| mix.spec(seq)).collect();
        let tools = specs.iter().filter(|s| matches!(s.call, Call::Tool { .. })).count();
        let dry = specs.iter().filter(|s| s.key >= 4).count();
        assert!((800..1200).contains(&tools), "tool share 0.1: {tools} of 10000");
        assert!((800..1200).contains(&dry), "dry share 0.1: {dry} of 10000");
        assert!(specs.iter().all(|s| s.key < 6), "keys in range");
    }

    #[test]
    fn bad_model_entries_are_errors_not_panics() {
        for bad in ["mock-gpt", "video:x", "chat:", "chat:x=0", "chat:x=many"] {
            assert!(ModelChoice::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
