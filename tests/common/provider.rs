//! A test upstream that behaves like the real providers, not like our mock:
//! it gzips when asked, frames SSE with CRLF, writes spaced JSON
//! (`"choices": []`), returns `n` choices, reads context the request does
//! not carry (`previous_response_id`, file ids, URLs), and can end a stream
//! without the final blank line. It honours the output cap it is sent, as
//! real APIs do, unless told to ignore it.
//!
//! Per-request controls (headers): `x-provider-output: N` output tokens per
//! choice it would like to write (default 30); `x-provider-ignore-cap: 1`;
//! `x-provider-context-tokens: N` input read from server-side context
//! (default 50,000); `x-provider-pace-ms: N` between stream events;
//! `x-provider-usage-delay-ms: N` before the usage event;
//! `x-provider-no-final-blank: 1`; `x-provider-no-done: 1` (a chat stream
//! without `data: [DONE]`); `x-provider-usage-every-chunk: 1` (a
//! running total on every chunk); `x-provider-gzip-anyway: 1` (compress
//! unasked); `x-provider-reset-after: N` (a stream breaks after N events);
//! `x-provider-head-delay-ms: N` (it thinks that long before the response
//! head, as a long call that does not stream does);
//! `x-provider-text-bytes: N` (a Responses answer's text is that long,
//! streamed or not; a chat stream's delta, for a server that ignores the cap);
//! `x-provider-stream-length: 1` (a stream sent whole, with its length);
//! `x-provider-units: N|none|garbage` for
//! the tool route; `x-provider-status: N` (a JSON answer with that status:
//! an edge's 524, say); `x-provider-served-tier: NAME` (the tier it says served
//! the call; by default the one asked for, `default` or Anthropic's
//! `standard` when none was); `x-provider-cache-write-5m: N` and `-1h: N` input tokens
//! a call wrote to its prompt cache (on `/v1/messages` reported apart, as
//! Anthropic does; on chat as one `cache_write_tokens`, as OpenRouter does).
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use creditgate::mock::MockBody;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// One request as the provider received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
    /// The usage the provider reported for it (input includes cache writes).
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_write_5m_tokens: u64,
    pub cache_write_1h_tokens: u64,
    /// Hosted tool calls it reported (Responses API `web_search_call` items).
    pub hosted_calls: u64,
}

#[derive(Clone, Default)]
pub struct Provider {
    pub addr: Option<SocketAddr>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Provider {
    pub async fn start() -> Provider {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let provider = Provider { addr: Some(listener.local_addr().unwrap()), ..Provider::default() };
        let serving = provider.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let provider = serving.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let provider = provider.clone();
                        async move { Ok::<_, std::convert::Infallible>(provider.answer(request).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        provider
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.unwrap()
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn last(&self) -> Received {
        self.received().pop().expect("the provider received a request")
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<MockBody> {
        let (parts, body) = request.into_parts();
        let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let path = parts.uri.path().to_owned();
        let headers = parts.headers;
        let number = |name: &str, default: u64| {
            headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(default)
        };
        if path.starts_with("/v1/tools/") {
            return self.tool(&path, headers, bytes);
        }
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        // As a real provider does, it reads the JSON: a key spelled with
        // `\u` escapes is the same key.
        let decoded = body.to_string();
        let reads_context = ["previous_response_id", "conversation", "file_id", "image_url"]
            .iter()
            .any(|key| decoded.contains(key) || bytes.windows(key.len()).any(|w| w == key.as_bytes()));
        // Anthropic bills input its body does not carry when tools are
        // given: a tool-use system prompt (346 tokens on Claude 4 models),
        // and the built-in client tools' own definitions and prompts (bash
        // 245, the text editor 700, computer use 735 + 499).
        let tools = body.get("tools").and_then(Value::as_array).filter(|tools| !tools.is_empty());
        let hidden_tool_tokens = match tools {
            Some(tools) if path.starts_with("/v1/messages") => {
                346 + tools
                    .iter()
                    .filter_map(|tool| tool.get("type")?.as_str())
                    .map(|kind| match kind {
                        kind if kind.starts_with("bash_") => 245,
                        kind if kind.starts_with("text_editor_") => 700,
                        kind if kind.starts_with("computer_") => 735 + 499,
                        _ => 0,
                    })
                    .sum::<u64>()
            }
            _ => 0,
        };
        let input_tokens = (bytes.len() as u64).div_ceil(4)
            + hidden_tool_tokens
            + if reads_context { number("x-provider-context-tokens", 50_000) } else { 0 };
        let cap = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .iter()
            .find_map(|field| body.get(field).and_then(Value::as_u64))
            .unwrap_or(4096);
        let wanted = number("x-provider-output", 30);
        let per_choice = if headers.contains_key("x-provider-ignore-cap") { wanted } else { wanted.min(cap) };
        let choices = body.get("n").and_then(Value::as_u64).unwrap_or(1);
        let output_tokens = per_choice * choices;
        let (write_5m, write_1h) =
            (number("x-provider-cache-write-5m", 0), number("x-provider-cache-write-1h", 0));
        // Web searches it would run, within the request's max_tool_calls.
        let wanted_calls = number("x-provider-tool-calls", 0);
        let bound = body.get("max_tool_calls").and_then(Value::as_u64).or_else(|| {
            // Anthropic bounds each server tool with max_uses.
            body.get("tools")?.as_array()?.iter().find_map(|tool| tool.get("max_uses")?.as_u64())
        });
        let hosted_calls = match bound {
            Some(bound) if !headers.contains_key("x-provider-ignore-cap") => wanted_calls.min(bound),
            _ => wanted_calls,
        };
        self.received.lock().unwrap().push(Received {
            path: path.clone(),
            headers: headers.clone(),
            body: body.clone(),
            input_tokens: input_tokens + write_5m + write_1h,
            output_tokens,
            cache_write_5m_tokens: write_5m,
            cache_write_1h_tokens: write_1h,
            hosted_calls,
        });
        let head_delay = number("x-provider-head-delay-ms", 0);
        if head_delay > 0 {
            tokio::time::sleep(Duration::from_millis(head_delay)).await;
        }
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        // `x-provider-gzip-anyway`: an upstream that compresses unasked.
        let gzip =
            headers.get("accept-encoding").and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("gzip"))
                || headers.contains_key("x-provider-gzip-anyway");
        let anthropic = path.starts_with("/v1/messages");
        // As the providers do, every answer names the tier that served it.
        let asked = body.get("service_tier").and_then(Value::as_str).filter(|t| *t != "auto");
        let default_tier = if anthropic { "standard" } else { "default" };
        let served_tier = headers
            .get("x-provider-served-tier")
            .and_then(|v| v.to_str().ok())
            .or(asked)
            .unwrap_or(default_tier)
            .to_owned();
        if !stream {
            let document = if path.starts_with("/v1/responses") {
                let mut output: Vec<Value> = (0..hosted_calls)
                    .map(|i| json!({"type": "web_search_call", "id": format!("ws_{i}"), "status": "completed"}))
                    .collect();
                // `x-provider-text-bytes: N`: a long answer (the body past what a meter can hold).
                let line = "a \"quoted\" line\n";
                let long = line.repeat(number("x-provider-text-bytes", 0) as usize / line.len());
                output.push(json!({"type": "message", "content": [{"type": "output_text", "text": format!("hi{long}")}]}));
                json!({"id": "resp_1", "object": "response", "output": output, "service_tier": served_tier,
                       "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}})
            } else if anthropic {
                json!({"id": "msg_1", "type": "message", "content": [{"type": "text", "text": "hi"}],
                       "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                                 "service_tier": served_tier,
                                 "server_tool_use": {"web_search_requests": hosted_calls},
                                 "cache_creation_input_tokens": write_5m + write_1h,
                                 "cache_creation": {"ephemeral_5m_input_tokens": write_5m,
                                                    "ephemeral_1h_input_tokens": write_1h}}})
            } else {
                let choices: Vec<Value> = (0..choices)
                    .map(|i| json!({"index": i, "message": {"role": "assistant", "content": "hi"}}))
                    .collect();
                // Cache writes as OpenRouter reports them: in the prompt,
                // one count whatever their lifetime.
                let mut usage = json!({"prompt_tokens": input_tokens + write_5m + write_1h,
                                       "completion_tokens": output_tokens});
                if write_5m + write_1h > 0 {
                    usage["prompt_tokens_details"] =
                        json!({"cached_tokens": 0, "cache_write_tokens": write_5m + write_1h});
                }
                json!({"id": "chatcmpl-1", "object": "chat.completion", "choices": choices,
                       "service_tier": served_tier, "usage": usage})
            };
            let text = serde_json::to_string_pretty(&document).unwrap();
            let mut response = respond(text.into_bytes(), "application/json", gzip);
            if let Some(status) = headers.get("x-provider-status").map(|_| number("x-provider-status", 200)) {
                *response.status_mut() = StatusCode::from_u16(u16::try_from(status).unwrap()).unwrap();
            }
            return in_two_parts(response, number("x-provider-pace-ms", 0));
        }
        let include_usage =
            body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
        let mut events: Vec<(u64, String)> = Vec::new();
        let pace = number("x-provider-pace-ms", 0);
        if path.starts_with("/v1/responses") {
            // The Responses API's events, its usage (and the whole output) in the last.
            let line = "a \"quoted\" line\n";
            let long = line.repeat(number("x-provider-text-bytes", 0) as usize / line.len());
            let mut output: Vec<Value> = (0..hosted_calls)
                .map(|i| json!({"type": "web_search_call", "id": format!("ws_{i}"), "status": "completed"}))
                .collect();
            output.push(json!({"type": "message", "content": [{"type": "output_text", "text": format!("hello there{long}")}]}));
            let created = json!({"type": "response.created", "response": {"id": "resp_1", "output": []}});
            let delta = json!({"type": "response.output_text.delta", "delta": "hello there"});
            let completed = json!({"type": "response.completed", "response": {"id": "resp_1", "output": output,
                                   "service_tier": served_tier,
                                   "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}});
            events.push((0, format!("event: response.created\r\ndata: {created}\r\n\r\n")));
            events.push((pace, format!("event: response.output_text.delta\r\ndata: {delta}\r\n\r\n")));
            events.push((
                number("x-provider-usage-delay-ms", pace),
                format!("event: response.completed\r\ndata: {completed}\r\n\r\n"),
            ));
        } else if anthropic {
            events.push((0, format!("event: message_start\r\ndata: {{\"type\": \"message_start\", \"message\": {{\"usage\": {{\"input_tokens\": {input_tokens}, \"output_tokens\": 1, \"service_tier\": \"{served_tier}\"}}}}}}\r\n\r\n")));
            events.push((pace, "event: content_block_delta\r\ndata: {\"type\": \"content_block_delta\", \"delta\": {\"type\": \"text_delta\", \"text\": \"hello there\"}}\r\n\r\n".into()));
            events.push((number("x-provider-usage-delay-ms", pace), format!("event: message_delta\r\ndata: {{\"type\": \"message_delta\", \"usage\": {{\"output_tokens\": {output_tokens}}}}}\r\n\r\n")));
        } else {
            // vLLM's continuous usage stats: a running total on every chunk.
            let running = headers.contains_key("x-provider-usage-every-chunk");
            let text = match number("x-provider-text-bytes", 0) {
                0 => "hello there".to_owned(),
                bytes => "a".repeat(bytes as usize),
            };
            for i in 0..choices {
                let usage_field = match (include_usage, running) {
                    (true, true) => format!(
                        ", \"usage\": {{\"prompt_tokens\": {input_tokens}, \"completion_tokens\": {}}}",
                        i + 1
                    ),
                    (true, false) => ", \"usage\": null".to_owned(),
                    (false, _) => String::new(),
                };
                events.push((pace, format!("data: {{\"id\": \"c1\", \"choices\": [{{\"index\": {i}, \"delta\": {{\"content\": \"{text}\"}}}}], \"service_tier\": \"{served_tier}\"{usage_field}}}\r\n\r\n")));
            }
            if include_usage {
                events.push((number("x-provider-usage-delay-ms", pace), format!("data: {{\"id\": \"c1\", \"choices\": [], \"service_tier\": \"{served_tier}\", \"usage\": {{\"prompt_tokens\": {input_tokens}, \"completion_tokens\": {output_tokens}}}}}\r\n\r\n")));
            }
            let no_final_blank = headers.contains_key("x-provider-no-final-blank");
            if headers.contains_key("x-provider-no-done") {
                // The stream ends with its last chunk, which with
                // `x-provider-no-final-blank` lacks its blank line too.
                if let Some((_, last)) = events.last_mut().filter(|_| no_final_blank) {
                    last.truncate(last.trim_end().len());
                }
            } else {
                let done = if no_final_blank { "data: [DONE]" } else { "data: [DONE]\r\n\r\n" };
                events.push((pace, done.into()));
            }
        }
        // `x-provider-stream-length: 1`: the whole stream at once, with its
        // `content-length` (as some buffering upstreams send it).
        if gzip || headers.contains_key("x-provider-stream-length") {
            let all: String = events.iter().map(|(_, e)| e.as_str()).collect();
            return respond(all.into_bytes(), "text/event-stream", gzip);
        }
        // `x-provider-reset-after: N`: the connection breaks after N events.
        let reset_after = headers.get("x-provider-reset-after").map(|_| number("x-provider-reset-after", 0));
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for (sent, (delay_ms, event)) in events.into_iter().enumerate() {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                if reset_after == Some(sent as u64) {
                    let _ = tx.send(Err("the provider's connection broke".into())).await;
                    return;
                }
                if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                    return;
                }
            }
        });
        let mut response = Response::new(MockBody::Channel(rx));
        response.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
        response
    }

    fn tool(&self, path: &str, headers: HeaderMap, _body: Bytes) -> Response<MockBody> {
        let units = headers.get("x-provider-units").and_then(|v| v.to_str().ok()).unwrap_or("5").to_owned();
        self.received.lock().unwrap().push(Received {
            path: path.to_owned(),
            headers,
            body: Value::Null,
            input_tokens: 0,
            output_tokens: 0,
            cache_write_5m_tokens: 0,
            cache_write_1h_tokens: 0,
            hosted_calls: 0,
        });
        let mut response = respond(b"{\"results\": []}".to_vec(), "application/json", false);
        match units.as_str() {
            "none" => {}
            "garbage" => {
                response.headers_mut().insert("x-usage-units", "lots".parse().unwrap());
            }
            n => {
                response.headers_mut().insert("x-usage-units", n.parse().unwrap());
            }
        }
        response
    }
}

/// With a pace, the body goes as two frames that far apart (so a client can
/// leave in the middle of it).
fn in_two_parts(response: Response<MockBody>, pace_ms: u64) -> Response<MockBody> {
    let (parts, body) = response.into_parts();
    let MockBody::Full(Some(bytes)) = body else { return Response::from_parts(parts, body) };
    if pace_ms == 0 {
        return Response::from_parts(parts, MockBody::Full(Some(bytes)));
    }
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let half = bytes.len() / 2;
        let _ = tx.send(Ok(Frame::data(bytes.slice(..half)))).await;
        tokio::time::sleep(Duration::from_millis(pace_ms)).await;
        let _ = tx.send(Ok(Frame::data(bytes.slice(half..)))).await;
    });
    Response::from_parts(parts, MockBody::Channel(rx))
}

fn respond(body: Vec<u8>, content_type: &str, gzip: bool) -> Response<MockBody> {
    let body = if gzip {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&body).unwrap();
        encoder.finish().unwrap()
    } else {
        body
    };
    let mut response = Response::new(MockBody::Full(Some(Bytes::from(body))));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert("content-type", content_type.parse().unwrap());
    if gzip {
        response.headers_mut().insert("content-encoding", "gzip".parse().unwrap());
    }
    response
}
