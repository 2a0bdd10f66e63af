//! A small WebDriver client over hyper, enough to drive Debian's
//! `chromium` through `chromedriver`: sessions, navigation, elements,
//! scripts, window size, screenshots and the browser's console log.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use serde_json::{json, Value};

use super::send;

/// The key W3C WebDriver names an element reference with.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Longest wait for something to show on a page.
pub const WAIT: Duration = Duration::from_secs(20);

/// A running chromedriver, stopped (by its own process id) when dropped.
pub struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// Starts `chromedriver` on a free loopback port and waits until it is ready.
    pub async fn start() -> Driver {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver is not installed: run .ci/install-test-deps (Debian: chromium chromium-driver)",
            );
        let driver = Driver { child, url: format!("http://127.0.0.1:{port}") };
        let started = Instant::now();
        loop {
            let request =
                Request::get(format!("{}/status", driver.url)).body(Full::new(Bytes::new())).unwrap();
            let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http();
            if let Ok(Ok(response)) =
                tokio::time::timeout(Duration::from_secs(2), client.request(request)).await
            {
                if response.status().is_success() {
                    return driver;
                }
            }
            assert!(started.elapsed() < WAIT, "chromedriver did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new headless Chromium session that keeps the browser's console log.
    pub async fn session(&self, width: u32, height: u32) -> Session {
        let mut args = vec![
            "--headless=new".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--hide-scrollbars".to_owned(),
            format!("--window-size={width},{height}"),
        ];
        // Chromium's sandbox cannot start as root; only then is it turned off.
        if running_as_root() {
            args.push("--no-sandbox".to_owned());
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let value = call(Method::POST, &format!("{}/session", self.url), Some(capabilities)).await;
        let id = value["sessionId"].as_str().expect("no session id").to_owned();
        Session { base: format!("{}/session/{id}", self.url) }
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// One WebDriver command; answers its `value`, panicking on an error.
async fn call(method: Method, url: &str, body: Option<Value>) -> Value {
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let request = Request::builder()
        .method(method.clone())
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap();
    let reply = send(request).await;
    let value: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    assert!(reply.status.is_success(), "WebDriver {method} {url}: {} {value}", reply.status);
    value["value"].clone()
}

pub struct Session {
    base: String,
}

impl Session {
    async fn command(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        call(method, &format!("{}{path}", self.base), body).await
    }

    pub async fn goto(&self, url: &str) {
        self.command(Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    pub async fn resize(&self, width: u32, height: u32) {
        self.command(Method::POST, "/window/rect", Some(json!({"width": width, "height": height}))).await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and answers its return value.
    pub async fn script(&self, script: &str, args: Value) -> Value {
        self.command(Method::POST, "/execute/sync", Some(json!({"script": script, "args": args}))).await
    }

    /// The first element matching `css`, if any.
    pub async fn find(&self, css: &str) -> Option<String> {
        let body = json!({"using": "css selector", "value": css});
        let url = format!("{}/elements", self.base);
        let found = call(Method::POST, &url, Some(body)).await;
        found.as_array()?.first()?.get(ELEMENT_KEY)?.as_str().map(str::to_owned)
    }

    /// Waits until an element matches `css` and answers it.
    pub async fn wait_for(&self, css: &str) -> String {
        let started = Instant::now();
        loop {
            if let Some(element) = self.find(css).await {
                return element;
            }
            if started.elapsed() > WAIT {
                let url = self.command(Method::GET, "/url", None).await;
                let source = self.command(Method::GET, "/source", None).await;
                let source = source.as_str().unwrap_or("").chars().take(3000).collect::<String>();
                panic!("nothing matched {css:?} within {WAIT:?} at {url}:\n{source}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn click(&self, element: &str) {
        self.command(Method::POST, &format!("/element/{element}/click"), Some(json!({}))).await;
    }

    pub async fn clear(&self, element: &str) {
        self.command(Method::POST, &format!("/element/{element}/clear"), Some(json!({}))).await;
    }

    pub async fn type_text(&self, element: &str, text: &str) {
        self.command(Method::POST, &format!("/element/{element}/value"), Some(json!({ "text": text }))).await;
    }

    pub async fn text(&self, element: &str) -> String {
        self.command(Method::GET, &format!("/element/{element}/text"), None)
            .await
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    pub async fn attribute(&self, element: &str, name: &str) -> Option<String> {
        self.command(Method::GET, &format!("/element/{element}/attribute/{name}"), None)
            .await
            .as_str()
            .map(str::to_owned)
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        let encoded = self.command(Method::GET, "/screenshot", None).await;
        decode_base64(encoded.as_str().unwrap_or(""))
    }

    /// The browser console entries since the last call (chromedriver's log endpoint).
    pub async fn console(&self) -> Vec<Value> {
        let entries = self.command(Method::POST, "/se/log", Some(json!({"type": "browser"}))).await;
        entries.as_array().cloned().unwrap_or_default()
    }

    pub async fn quit(&self) {
        self.command(Method::DELETE, "", None).await;
    }
}

/// Standard base64 (with padding) to bytes; screenshots arrive this way.
fn decode_base64(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for byte in text.bytes().filter(|b| !b.is_ascii_whitespace() && *b != b'=') {
        let value = ALPHABET.iter().position(|&a| a == byte).expect("not base64") as u32;
        buffer = (buffer << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    out
}
