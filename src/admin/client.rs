//! `creditgate admin ...`: the operator's commands, talking to the admin API
//! over HTTP with a token from the environment.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// How long the CLI waits for an answer before giving up (and saying how
/// to retry safely).
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What went wrong talking to the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{status}: {message}")]
    Refused { status: StatusCode, message: String },
}

pub struct AdminClient {
    base: String,
    token: String,
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    pub fn new(base: &str, token: &str) -> Self {
        AdminClient {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Send one request; a non-2xx answer becomes an error carrying the
    /// API's message.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Bytes, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json");
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let unreachable = |reason: String| ClientError::Unreachable { url: url.clone(), reason };
        let request = request.body(Full::new(body)).map_err(|e| unreachable(e.to_string()))?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.http.request(request))
            .await
            .map_err(|_| unreachable(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| unreachable(e.to_string()))?.to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        Err(ClientError::Refused { status, message })
    }

    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> Result<Value, ClientError> {
        let bytes = self.send(method, path, body, key).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Refused {
            status: StatusCode::OK,
            message: format!("the answer is not JSON: {e}"),
        })
    }
}

/// Render rows as a plain text table with aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.clone()));
    }
    out
}
