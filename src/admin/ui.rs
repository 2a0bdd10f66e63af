//! The dashboard: static pages under `/ui/` on the admin listener, built
//! into the binary from the `ui/` folder, so it works with no network and no
//! CDN. This file serves those files and nothing else; the pages read and
//! change everything through `/admin/v1`, exactly as any API client does.
//!
//! Signing in: the page keeps the operator or org token in the tab's
//! `sessionStorage` and sends it as `Authorization: Bearer`. There are no
//! cookies, so a page of another site cannot make the browser act for the
//! user (no CSRF), and an org token sees its own org only because the API
//! says so, not because the page hides anything.
//!
//! Every answer carries a strict Content-Security-Policy: scripts, styles,
//! images and API calls come from this origin only, nothing inline runs, and
//! no other site may frame the pages.
//!
//! Charts are SVG drawn by `ui/app.js` itself (a stacked bar chart and a lot
//! timeline), not a vendored library: they are a few dozen lines, need no
//! update process or licence tracking, and keep the CSP free of
//! `'unsafe-inline'` (which some chart libraries need for their styles).

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};

use crate::proxy::GatewayBody;

/// Where the dashboard lives; `/ui` redirects here.
pub const UI_PATH: &str = "/ui/";

const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One embedded file: its path under `/ui/`, type and bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

/// An embedded file of `ui/`, served at `/ui/{served}`.
macro_rules! asset {
    ($served:literal, $file:literal, $content_type:literal) => {
        Asset {
            path: concat!("/ui/", $served),
            content_type: $content_type,
            bytes: include_bytes!(concat!("../../ui/", $file)),
        }
    };
}

const ASSETS: &[Asset] = &[
    asset!("", "index.html", "text/html; charset=utf-8"),
    asset!("app.js", "app.js", "text/javascript; charset=utf-8"),
    asset!("app.css", "app.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "favicon.svg", "image/svg+xml"),
];

/// Answers a request for `path` (which starts with `/ui`).
pub fn serve(method: &Method, path: &str) -> Response<GatewayBody> {
    if method != Method::GET && method != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "the dashboard answers GET and HEAD\n");
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    if path == "/ui" {
        let mut response = plain(StatusCode::PERMANENT_REDIRECT, "");
        response.headers_mut().insert(header::LOCATION, HeaderValue::from_static(UI_PATH));
        return response;
    }
    let Some(asset) = ASSETS.iter().find(|asset| asset.path == path) else {
        return plain(StatusCode::NOT_FOUND, "no such dashboard file\n");
    };
    let body = if method == Method::HEAD { Bytes::new() } else { Bytes::from_static(asset.bytes) };
    let mut response = Response::new(GatewayBody::local(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(asset.bytes.len()));
    secure(headers);
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<GatewayBody> {
    let mut response = Response::new(GatewayBody::local(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    secure(headers);
    response
}

/// The headers every dashboard answer carries.
fn secure(headers: &mut http::HeaderMap) {
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // Served from the binary: a new build must not be hidden by a cache.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_file_is_served_with_the_policy_and_nothing_else_is() {
        // Proves the CSP and nosniff on every answer, 404 for unknown files, 405 for writes.
        for asset in ASSETS {
            let response = serve(&Method::GET, asset.path);
            assert_eq!(response.status(), StatusCode::OK, "{}", asset.path);
            let csp = response.headers().get(header::CONTENT_SECURITY_POLICY).unwrap().to_str().unwrap();
            assert!(csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe"), "{csp}");
            assert_eq!(response.headers().get(header::X_CONTENT_TYPE_OPTIONS).unwrap(), "nosniff");
        }
        assert_eq!(serve(&Method::GET, "/ui/../Cargo.toml").status(), StatusCode::NOT_FOUND);
        assert_eq!(serve(&Method::POST, "/ui/").status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(serve(&Method::GET, "/ui").status(), StatusCode::PERMANENT_REDIRECT);
    }

    #[test]
    fn the_page_loads_nothing_inline() {
        // Proves index.html has no inline script or style the CSP would block.
        let html = std::str::from_utf8(ASSETS[0].bytes).unwrap();
        assert!(!html.contains("<script>") && !html.contains("style="), "inline code in index.html");
        assert!(!html.contains("http://") && !html.contains("https://"), "no outside resources");
    }
}
