//! Response bodies of the mock upstream, one builder per API flavour, with
//! usage computed by the documented deterministic rules.

use http::StatusCode;
use serde_json::{json, Value};

use super::{JournalEntry, MockUsage, Reply, DEFAULT_MAX_TOKENS, DEFAULT_TOOL_UNITS, MAX_TOOL_UNITS};

/// Fixed timestamp so responses are byte-for-byte reproducible.
const CREATED: u64 = 1_700_000_000;

/// Facts read from a model request body.
struct ModelRequest {
    model: String,
    stream: bool,
    include_usage: bool,
    usage: MockUsage,
}

impl ModelRequest {
    fn parse(body: &[u8], has_output: bool) -> Result<ModelRequest, String> {
        let value: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
        let model =
            value.get("model").and_then(Value::as_str).ok_or("missing string field `model`")?.to_owned();
        let max_tokens = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
            .iter()
            .find_map(|k| value.get(*k).and_then(Value::as_u64))
            .unwrap_or(DEFAULT_MAX_TOKENS);
        let seed = value.get("seed").and_then(Value::as_u64).unwrap_or(0);
        let output_tokens = if has_output { max_tokens.min(10 + seed % 41) } else { 0 };
        Ok(ModelRequest {
            model,
            stream: value.get("stream").and_then(Value::as_bool).unwrap_or(false),
            include_usage: value
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            usage: MockUsage {
                input_tokens: (body.len() as u64).div_ceil(4).max(1),
                output_tokens,
                units: 0,
            },
        })
    }
}

/// Build the answer for a request to `path`.
/// `input_tokens`, when given, is the input the answer reports whatever the
/// body's size (an upstream that read context the request does not carry).
pub(crate) fn answer(
    is_post: bool,
    path: &str,
    body: &[u8],
    input_tokens: Option<u64>,
    entry: &mut JournalEntry,
) -> Reply {
    if !is_post {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
    }
    if path == "/v1/tools/web-search" {
        return web_search(body);
    }
    let has_output = path != "/v1/embeddings";
    let mut request = match ModelRequest::parse(body, has_output) {
        Ok(request) => request,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    if let Some(input_tokens) = input_tokens {
        request.usage.input_tokens = input_tokens;
    }
    entry.model = Some(request.model.clone());
    match path {
        "/v1/chat/completions" if request.stream => chat_stream(&request),
        "/v1/chat/completions" => chat(&request),
        "/v1/embeddings" => embeddings(&request),
        "/v1/responses" => responses(&request),
        "/v1/messages" if request.stream => messages_stream(&request),
        "/v1/messages" => messages(&request),
        _ => error(StatusCode::NOT_FOUND, "the mock has no such endpoint"),
    }
}

pub(crate) fn error(status: StatusCode, message: &str) -> Reply {
    let body = json!({"error": {"type": "mock_error", "code": status.as_u16(), "message": message}});
    Reply::Json(status, body, None)
}

fn text(usage: &MockUsage) -> String {
    "tok ".repeat(usize::try_from(usage.output_tokens).unwrap_or(0))
}

fn chat(request: &ModelRequest) -> Reply {
    let u = request.usage;
    let body = json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": CREATED, "model": request.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text(&u)}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
                  "total_tokens": u.input_tokens + u.output_tokens},
    });
    Reply::Json(StatusCode::OK, body, Some(u))
}

fn chat_stream(request: &ModelRequest) -> Reply {
    let u = request.usage;
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": CREATED, "model": request.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        if request.include_usage {
            c["usage"] = Value::Null;
        }
        format!("data: {c}\n\n")
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    for _ in 0..u.output_tokens {
        events.push(chunk(json!({"content": "tok "}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if request.include_usage {
        let usage = json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": CREATED, "model": request.model,
            "choices": [],
            "usage": {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
                      "total_tokens": u.input_tokens + u.output_tokens},
        });
        events.push(format!("data: {usage}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_owned());
    Reply::Events(events, u)
}

fn embeddings(request: &ModelRequest) -> Reply {
    let u = request.usage;
    let body = json!({
        "object": "list", "model": request.model,
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.5, -0.5, 1.0]}],
        "usage": {"prompt_tokens": u.input_tokens, "total_tokens": u.input_tokens},
    });
    Reply::Json(StatusCode::OK, body, Some(u))
}

fn responses(request: &ModelRequest) -> Reply {
    let u = request.usage;
    let body = json!({
        "id": "resp_mock", "object": "response", "created_at": CREATED, "status": "completed", "model": request.model,
        "output": [{"type": "message", "id": "msg_mock", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text(&u), "annotations": []}]}],
        "usage": {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
                  "total_tokens": u.input_tokens + u.output_tokens},
    });
    Reply::Json(StatusCode::OK, body, Some(u))
}

fn messages(request: &ModelRequest) -> Reply {
    let u = request.usage;
    let body = json!({
        "id": "msg_mock", "type": "message", "role": "assistant", "model": request.model,
        "content": [{"type": "text", "text": text(&u)}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens},
    });
    Reply::Json(StatusCode::OK, body, Some(u))
}

fn messages_stream(request: &ModelRequest) -> Reply {
    let u = request.usage;
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![event(
        "message_start",
        json!({
            "type": "message_start",
            "message": {"id": "msg_mock", "type": "message", "role": "assistant", "model": request.model,
                        "content": [], "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": u.input_tokens, "output_tokens": 1}},
        }),
    )];
    events.push(event(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ));
    events.push(event("ping", json!({"type": "ping"})));
    for _ in 0..u.output_tokens {
        events.push(event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "tok "}})));
    }
    events.push(event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
    events.push(event(
        "message_delta",
        json!({
            "type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": u.output_tokens},
        }),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    Reply::Events(events, u)
}

fn web_search(body: &[u8]) -> Reply {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let units =
        value.get("num_results").and_then(Value::as_u64).unwrap_or(DEFAULT_TOOL_UNITS).min(MAX_TOOL_UNITS);
    let query = value.get("query").and_then(Value::as_str).unwrap_or("");
    let results: Vec<Value> = (0..units)
        .map(|i| json!({"title": format!("result {i} for {query}"), "url": format!("https://example.invalid/{i}")}))
        .collect();
    let usage = MockUsage { input_tokens: 0, output_tokens: 0, units };
    Reply::Json(StatusCode::OK, json!({"query": query, "results": results}), Some(usage))
}
