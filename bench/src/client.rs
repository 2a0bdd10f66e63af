//! The HTTP client the harness drives load with, and admin API calls.

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub type Http = Client<HttpConnector, Full<Bytes>>;

/// A pooled HTTP/1.1 client keeping up to `idle` connections per host.
pub fn http(idle: usize) -> Http {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(idle).build(connector)
}

/// Send a request and read the whole answer.
pub async fn call(http: &Http, request: Request<Full<Bytes>>) -> anyhow::Result<(u16, Bytes)> {
    let response = http.request(request).await?;
    let status = response.status().as_u16();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

/// Send a request, read its status and first chunk, and hang up (a client
/// that leaves a stream early). An error body is still read whole.
pub async fn call_and_hang_up(http: &Http, request: Request<Full<Bytes>>) -> anyhow::Result<(u16, Bytes)> {
    let response = http.request(request).await?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    if status != 200 {
        return Ok((status, body.collect().await?.to_bytes()));
    }
    let first = match body.frame().await {
        Some(frame) => frame?.into_data().unwrap_or_default(),
        None => Bytes::new(),
    };
    Ok((status, first))
}

/// The `error.code` of a gateway error body (`{"error":{"type","code","message"}}`).
pub fn error_code(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let code = value.pointer("/error/code")?;
    Some(code.as_str().map_or_else(|| code.to_string(), str::to_owned))
}

/// The admin API of one gateway.
#[derive(Clone)]
pub struct Admin {
    pub http: Http,
    /// `host:port` of the admin listener.
    pub addr: String,
    pub token: String,
}

impl Admin {
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(Method::POST, path, Some(body)).await
    }

    async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let request = Request::builder()
            .method(method.clone())
            .uri(format!("http://{}{path}", self.addr))
            .header("authorization", format!("Bearer {}", self.token));
        let body = body.map(Value::to_string).unwrap_or_default();
        let (status, bytes) = call(&self.http, request.body(Full::new(Bytes::from(body)))?)
            .await
            .with_context(|| format!("admin {method} {path}"))?;
        if !(200..300).contains(&status) {
            bail!("admin {method} {path} answered {status}: {}", String::from_utf8_lossy(&bytes));
        }
        serde_json::from_slice(&bytes).with_context(|| format!("admin {method} {path}: body is not JSON"))
    }
}
