//! Header rules for forwarding: hop-by-hop removal (RFC 9110 §7.6.1), the
//! credential swap, and request ids.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Header carrying the request id, in both directions.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Alternative client credential header (Anthropic style).
pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Headers that describe one connection, not the message, and so must not be
/// forwarded. `te` is kept when it is exactly `trailers` (needed by gRPC).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Remove hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

/// Remove the client's own credentials so they never reach the upstream.
pub fn strip_client_credentials(headers: &mut HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    headers.remove(&X_API_KEY);
}

/// The client's request id if it is well formed, otherwise a fresh UUIDv7.
/// Well formed means a UUID (hyphenated or 32 hex digits): the same id then
/// names the request in the response header, the access log, the trace span
/// and the ledger entry, and it is always safe to log.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(value) = headers.get(&REQUEST_ID) {
        let is_uuid = value.to_str().is_ok_and(|text| uuid::Uuid::try_parse(text).is_ok());
        if is_uuid {
            return value.clone();
        }
    }
    let id = uuid::Uuid::now_v7().simple().to_string();
    // A simple uuid is 32 hex digits: always a valid header value.
    HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret-hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "only the end-to-end header survives: {h:?}");
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn te_trailers_survives() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert!(h.contains_key(header::TE));
    }

    #[test]
    fn request_id_is_reused_only_when_well_formed() {
        let mut h = HeaderMap::new();
        h.insert(&REQUEST_ID, HeaderValue::from_static("0192f0c4-7a1b-7cde-8f00-1234567890ab"));
        assert_eq!(request_id(&h), "0192f0c4-7a1b-7cde-8f00-1234567890ab");
        h.insert(&REQUEST_ID, HeaderValue::from_static("client-id_1.2:3"));
        assert_eq!(request_id(&h).len(), 32, "a non-UUID id is replaced");
        h.insert(&REQUEST_ID, HeaderValue::from_static("bad id with spaces"));
        let generated = request_id(&h);
        assert_eq!(generated.len(), 32, "generated ids are simple uuids");
        h.insert(&REQUEST_ID, HeaderValue::from_str(&"a".repeat(129)).unwrap());
        assert_ne!(request_id(&h).len(), 129);
    }
}
