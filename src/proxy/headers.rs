//! Header rules for forwarding: hop-by-hop removal (RFC 9110 §7.6.1), the
//! credential swap, and request ids.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Header carrying the request id, in both directions.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Alternative client credential header (Anthropic style).
pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Headers that describe one connection, not the message, and so must not be
/// forwarded. `te` is kept when it is exactly `trailers` (needed by gRPC).
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// The place of `name` among the headers [`strip_hop_by_hop`] removes or
/// checks: [`HOP_BY_HOP`] by index, then `upgrade` and `te`. One match on
/// the name's text (which compiles to a switch on its length) instead of
/// nine name comparisons per header.
fn hop_by_hop(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "proxy-authenticate" => Some(3),
        "proxy-authorization" => Some(4),
        "trailer" => Some(5),
        "transfer-encoding" => Some(6),
        "upgrade" => Some(UPGRADE_AT),
        "te" => Some(TE_AT),
        _ => None,
    }
}

const UPGRADE_AT: usize = HOP_BY_HOP.len();
const TE_AT: usize = HOP_BY_HOP.len() + 1;

/// Remove hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them, and the rest one or two (a chunked
    // answer's `transfer-encoding`): one pass over the names present, then
    // a hashed removal only of those found.
    let mut present = [false; TE_AT + 1];
    for index in headers.keys().filter_map(hop_by_hop) {
        present[index] = true;
    }
    if present == [false; TE_AT + 1] {
        return;
    }
    if present[0] {
        // Headers a `Connection` names count only when `Connection` is there.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, present)| *present) {
        headers.remove(name);
    }
    if present[UPGRADE_AT] {
        headers.remove(header::UPGRADE);
    }
    // Every value: `TE: trailers` then `TE: gzip` is not `trailers`.
    if present[TE_AT] && headers.get_all(header::TE).iter().any(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

/// Response headers about the upstream's account or its own origin, not the
/// gateway's: which of the operator's accounts served the call, its
/// cookies, its HTTP/3 endpoint and HSTS policy, and a challenge for the
/// operator's credential. The upstream's own request id goes to the client
/// as `x-upstream-request-id` (the gateway's is `x-request-id`): it is what
/// a provider's support asks for.
static UPSTREAM_ONLY: [HeaderName; 7] = [
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
    HeaderName::from_static("anthropic-organization-id"),
    header::SET_COOKIE,
    header::ALT_SVC,
    header::STRICT_TRANSPORT_SECURITY,
    header::WWW_AUTHENTICATE,
];

/// The header carrying the upstream's own request id to the client.
pub static UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");

/// Removes [`UPSTREAM_ONLY`] headers, renames the upstream's request id and
/// makes a redirect to the upstream relative ([`relative_location`]). One
/// pass over the names present first: most answers carry few of them, and a
/// hashed lookup per name that might be there cost more.
pub fn strip_upstream_only(headers: &mut HeaderMap, upstream: &crate::config::Upstream) {
    let (mut strip, mut location) = (false, false);
    for name in headers.keys() {
        match name.as_str() {
            "openai-organization"
            | "openai-project"
            | "anthropic-organization-id"
            | "set-cookie"
            | "alt-svc"
            | "strict-transport-security"
            | "www-authenticate"
            | "x-request-id" => strip = true,
            "location" => location = true,
            _ => {}
        }
    }
    if strip {
        for name in &UPSTREAM_ONLY {
            headers.remove(name);
        }
        if let Some(id) = headers.remove(&REQUEST_ID) {
            headers.insert(&UPSTREAM_REQUEST_ID, id);
        }
    }
    if location {
        relative_location(headers, upstream);
    }
}

/// A redirect to the upstream's own host, made relative to the gateway:
/// the client neither learns the upstream's address nor follows it there
/// (with its gateway key). A redirect elsewhere is left as it is.
fn relative_location(headers: &mut HeaderMap, upstream: &crate::config::Upstream) {
    let Some(location) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) else { return };
    let Ok(uri) = location.parse::<http::Uri>() else { return };
    if uri
        .authority()
        .is_none_or(|authority| !authority.as_str().eq_ignore_ascii_case(upstream.authority.as_str()))
    {
        return;
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = path
        .strip_prefix(upstream.base_path.trim_end_matches('/'))
        .filter(|p| p.starts_with('/'))
        .unwrap_or(path);
    if let Ok(value) = HeaderValue::from_str(path) {
        headers.insert(header::LOCATION, value);
    }
}

/// Request headers meant for the gateway alone: the client's credentials
/// (never forwarded, including the names Azure's and Google's APIs read a
/// key from, where a client may have put its gateway key), the end user
/// (the operator's record, not the upstream's business), and the selectors
/// that pick which of the operator's upstream accounts pays (the
/// operator's choice, never the client's).
static CLIENT_ONLY: [HeaderName; 7] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("x-creditgate-end-user"),
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-goog-api-key"),
];

/// The place of `name` in [`CLIENT_ONLY`]: one match on its text.
fn client_only(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "authorization" => Some(0),
        "x-api-key" => Some(1),
        "x-creditgate-end-user" => Some(2),
        "openai-organization" => Some(3),
        "openai-project" => Some(4),
        "api-key" => Some(5),
        "x-goog-api-key" => Some(6),
        _ => None,
    }
}

/// Remove the [`CLIENT_ONLY`] headers. One pass over the names present,
/// then a hashed removal only of those found, not of all of them.
pub fn strip_client_only(headers: &mut HeaderMap) {
    let mut present = [false; CLIENT_ONLY.len()];
    for index in headers.keys().filter_map(client_only) {
        present[index] = true;
    }
    for (name, _) in CLIENT_ONLY.iter().zip(present).filter(|(_, present)| *present) {
        headers.remove(name);
    }
}

/// The method-override header `headers` carry, if any: the names
/// frameworks and Google's APIs read in place of the request's method.
/// One pass over the names present, as for the other header rules.
pub fn method_override(headers: &HeaderMap) -> Option<&'static str> {
    headers.keys().find_map(|name| match name.as_str() {
        "x-http-method-override" => Some("x-http-method-override"),
        "x-http-method" => Some("x-http-method"),
        "x-method-override" => Some("x-method-override"),
        _ => None,
    })
}

/// Keep only the `allowed` headers (an upstream's `forward_headers`).
pub fn keep_only(headers: &mut HeaderMap, allowed: &[HeaderName]) {
    let refused: Vec<HeaderName> = headers.keys().filter(|name| !allowed.contains(name)).cloned().collect();
    for name in refused {
        headers.remove(name);
    }
}

/// A fresh request id (a UUIDv7 as 32 hex digits). The gateway mints one for
/// every request and never takes the client's: the id keys the request's
/// hold, and a client that could choose it could replay another request's
/// settlement.
pub fn mint_request_id() -> HeaderValue {
    let mut digits = [0u8; uuid::fmt::Simple::LENGTH];
    let id = new_request_uuid();
    let id = id.simple().encode_lower(&mut digits);
    // A simple uuid is 32 hex digits: always a valid header value.
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// A UUIDv7 unique to this process: the time, then a per-thread random
/// nonce and a per-thread count (from a random start) in the bits the
/// version and variant leave whole. uuid's `now_v7` asked the kernel for
/// random bytes twice an id (two `getrandom` system calls a request); this
/// asks once a thread.
pub fn new_request_uuid() -> uuid::Uuid {
    thread_local! {
        static MINT: std::cell::Cell<(u32, u64)> = std::cell::Cell::new({
            let seed = uuid::Uuid::new_v4().as_u128();
            (seed as u32, (seed >> 64) as u64)
        });
    }
    let (nonce, count) = MINT.with(|mint| {
        let (nonce, count) = mint.get();
        mint.set((nonce, count.wrapping_add(1)));
        (nonce, count)
    });
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
    // Bytes 6..16 of the UUID: 6 and 8 give up bits to the version and the
    // variant; 10..16 (the count's low 48 bits) are kept whole.
    let mut random = [0u8; 10];
    random[..4].copy_from_slice(&nonce.to_le_bytes());
    random[4..].copy_from_slice(&count.to_le_bytes()[..6]);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// Longest client request id kept for the log.
const MAX_CLIENT_REQUEST_ID_LEN: usize = 128;

/// The client's own request id, if it is short visible ASCII (safe to log).
pub fn client_request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    let value = headers.get(&REQUEST_ID)?;
    let printable = value.as_bytes().iter().all(|b| b.is_ascii_graphic());
    (printable && !value.is_empty() && value.len() <= MAX_CLIENT_REQUEST_ID_LEN).then(|| value.clone())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_version_7_and_unique_across_threads() {
        let before = std::time::SystemTime::now();
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..20_000).map(|_| new_request_uuid()).collect::<Vec<_>>()))
            .collect();
        let ids: Vec<uuid::Uuid> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        for id in &ids {
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            let (seconds, _) = id.get_timestamp().unwrap().to_unix();
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
            assert!(at + std::time::Duration::from_secs(1) >= before, "the id carries the time");
        }
    }

    #[test]
    fn every_client_only_header_is_removed_alone_or_together_and_nothing_else() {
        assert!(CLIENT_ONLY.contains(&X_API_KEY) && CLIENT_ONLY.contains(&super::super::charge::END_USER));
        for name in ["api-key", "x-goog-api-key"] {
            assert!(CLIENT_ONLY.iter().any(|n| n == name), "{name}");
        }
        let request = |names: &[&HeaderName]| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.append("x-custom", HeaderValue::from_static("1"));
            for name in names {
                // Twice: every value goes, not only the first.
                h.append((*name).clone(), HeaderValue::from_static("secret"));
                h.append((*name).clone(), HeaderValue::from_static("secret"));
            }
            h
        };
        for name in &CLIENT_ONLY {
            let mut h = request(&[name]);
            strip_client_only(&mut h);
            assert!(h.get(name).is_none(), "{name} was forwarded");
            assert_eq!(h.len(), 2, "{name}: the other headers stay");
        }
        let mut all = request(&CLIENT_ONLY.iter().collect::<Vec<_>>());
        strip_client_only(&mut all);
        assert_eq!(all, request(&[]));
    }

    #[test]
    fn each_hop_by_hop_header_is_removed_even_when_it_is_the_only_one() {
        let alone: Vec<HeaderName> =
            HOP_BY_HOP.iter().cloned().chain([header::UPGRADE, header::TE]).collect();
        for name in alone {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(name.clone(), HeaderValue::from_static("gzip"));
            strip_hop_by_hop(&mut h);
            assert!(h.get(&name).is_none(), "{name} was forwarded");
            assert_eq!(h.len(), 1, "{name}: the end-to-end header stays");
        }
        let mut every = HeaderMap::new();
        every.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for name in HOP_BY_HOP.iter().chain([&header::UPGRADE, &header::TE]) {
            // Twice: every value goes, not only the first.
            every.append(name.clone(), HeaderValue::from_static("gzip"));
            every.append(name.clone(), HeaderValue::from_static("x-named"));
        }
        every.insert("x-named", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut every);
        assert_eq!(every.keys().collect::<Vec<_>>(), [header::CONTENT_TYPE], "all of them at once");
        let mut plain = HeaderMap::new();
        plain.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        plain.append("x-custom", HeaderValue::from_static("1"));
        plain.append("x-custom", HeaderValue::from_static("2"));
        let before = plain.clone();
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain, before, "a message without hop-by-hop headers is left as it is");
    }

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
        h.append(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::TE), "a second value that is not `trailers` takes it away");
    }

    #[test]
    fn request_ids_are_minted_and_the_clients_is_only_kept_when_printable() {
        let mut h = HeaderMap::new();
        assert_ne!(mint_request_id(), mint_request_id(), "every request gets its own id");
        assert_eq!(mint_request_id().len(), 32);
        h.insert(&REQUEST_ID, HeaderValue::from_static("0192f0c4-7a1b-7cde-8f00-1234567890ab"));
        assert_eq!(client_request_id(&h).unwrap(), "0192f0c4-7a1b-7cde-8f00-1234567890ab");
        h.insert(&REQUEST_ID, HeaderValue::from_static("bad id with spaces"));
        assert!(client_request_id(&h).is_none());
        h.insert(&REQUEST_ID, HeaderValue::from_str(&"a".repeat(129)).unwrap());
        assert!(client_request_id(&h).is_none());
    }
}
