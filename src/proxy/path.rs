//! The request path, normalised once: routing, pricing and the upstream all
//! see the same path, so `/v1/tools/x/../../chat/completions` cannot be
//! priced as one route and served as another.

use std::borrow::Cow;

use super::error::ProxyError;

/// Percent-encodings that would turn back into a separator or a dot segment
/// after routing (upstreams and frameworks decode them differently).
const REFUSED_ESCAPES: [&[u8; 3]; 3] = [b"%2f", b"%2e", b"%5c"];

/// The path with percent-encoded unreserved characters decoded (RFC 3986
/// §6.2.2.2: `/v1/chat/%63ompletions` is `/v1/chat/completions` to the
/// upstream, so it must be to routing too), dot segments removed (§5.2.4)
/// and empty segments (`//`) folded. Refuses encoded `/`, `.` and `\`, a raw
/// `\`, and a path that climbs above the root.
pub fn normalise(path: &str) -> Result<Cow<'_, str>, ProxyError> {
    if plainly_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    // A `%` that starts no escape could make one once its neighbours are
    // decoded (`%%36%33` -> `%63` -> `c`): refused, as the URI grammar says.
    let bytes = path.as_bytes();
    let broken = memchr::memchr_iter(b'%', bytes)
        .any(|at| !bytes.get(at + 1..at + 3).is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)));
    if broken {
        return Err(ProxyError::InvalidPath { reason: "has a '%' that starts no escape" });
    }
    match unreserved_decoded(path) {
        Some(decoded) => Ok(Cow::Owned(normalise_decoded(&decoded)?.into_owned())),
        None => normalise_decoded(path),
    }
}

/// Most paths start with `/` and have no `\`, no `%` and no empty or dot
/// segment, so are normal already: one pass over the bytes says so.
fn plainly_normal(bytes: &[u8]) -> bool {
    let odd_segment = |segment: &[u8]| {
        matches!(segment, b"" | b"." | b"..") || segment.starts_with(b".;") || segment.starts_with(b"..;")
    };
    if bytes.first() != Some(&b'/') {
        return false;
    }
    let mut segment = 1;
    for (at, &byte) in bytes.iter().enumerate().skip(1) {
        match byte {
            b'\\' | b'%' => return false,
            b'/' if odd_segment(&bytes[segment..at]) => return false,
            b'/' => segment = at + 1,
            _ => {}
        }
    }
    !odd_segment(&bytes[segment..])
}

/// `path` with each `%XX` of a letter, digit, `-`, `_` or `~` decoded;
/// `None` if it has none. Other escapes are kept as written.
fn unreserved_decoded(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let unreserved = |at: usize| {
        let hex = bytes.get(at + 1..at + 3)?;
        let byte = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
        (hex.iter().all(u8::is_ascii_hexdigit) && (byte.is_ascii_alphanumeric() || b"-_~".contains(&byte)))
            .then_some(byte)
    };
    let first = memchr::memchr_iter(b'%', bytes).find(|&at| unreserved(at).is_some())?;
    let mut decoded = String::with_capacity(path.len());
    decoded.push_str(&path[..first]);
    let mut at = first;
    while at < bytes.len() {
        match (bytes[at], unreserved(at)) {
            (b'%', Some(byte)) => {
                decoded.push(char::from(byte));
                at += 3;
            }
            _ => {
                let next =
                    bytes[at + 1..].iter().position(|&b| b == b'%').map_or(bytes.len(), |i| at + 1 + i);
                decoded.push_str(&path[at..next]);
                at = next;
            }
        }
    }
    Some(decoded)
}

fn normalise_decoded(path: &str) -> Result<Cow<'_, str>, ProxyError> {
    let bytes = path.as_bytes();
    if !path.starts_with('/') {
        return Err(ProxyError::InvalidPath { reason: "does not start with '/'" });
    }
    if bytes.contains(&b'\\') {
        return Err(ProxyError::InvalidPath { reason: "contains a backslash" });
    }
    let escaped = bytes.contains(&b'%')
        && bytes.windows(3).any(|w| REFUSED_ESCAPES.iter().any(|e| w.eq_ignore_ascii_case(*e)));
    if escaped {
        return Err(ProxyError::InvalidPath { reason: "percent-encodes '/', '.' or '\\'" });
    }
    // Servers that cut `;` parameters off segments before resolving dot
    // segments (Tomcat, Jetty) read `..;x` as `..`: a path priced as one
    // route could climb to another there.
    if path[1..].split('/').any(|segment| segment.starts_with(".;") || segment.starts_with("..;")) {
        return Err(ProxyError::InvalidPath { reason: "has a dot segment with parameters ('..;')" });
    }
    // Most paths are already normal: seen so without building anything.
    if !path[1..].split('/').any(|segment| matches!(segment, "" | "." | "..")) {
        return Ok(Cow::Borrowed(path));
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in path[1..].split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(ProxyError::InvalidPath { reason: "climbs above the root" });
                }
            }
            _ => segments.push(segment),
        }
    }
    // A path that ended in a separator or a dot segment names a directory.
    let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    let mut normalised = String::with_capacity(path.len());
    for segment in &segments {
        normalised.push('/');
        normalised.push_str(segment);
    }
    if trailing || normalised.is_empty() {
        normalised.push('/');
    }
    Ok(Cow::Owned(normalised))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::normalise;

    #[test]
    fn dot_segments_and_empty_segments_are_folded() {
        let cases = [
            ("/v1/chat/completions", "/v1/chat/completions"),
            ("/v1/tools/web-search/../../chat/completions", "/v1/chat/completions"),
            ("/v1//chat///completions", "/v1/chat/completions"),
            ("/v1/./chat/completions", "/v1/chat/completions"),
            ("/v1/chat/completions/", "/v1/chat/completions/"),
            ("/v1/chat/..", "/v1/"),
            ("/", "/"),
            ("//", "/"),
            ("/a/b/./../c", "/a/c"),
            ("/v1/%41bc", "/v1/Abc"),
            ("/v1/chat/%63ompletions", "/v1/chat/completions"),
            ("/v1/%2D%5f%7e%20x", "/v1/-_~%20x"),
            ("/v1/%C3%A9/%2b", "/v1/%C3%A9/%2b"),
        ];
        for (path, expected) in cases {
            assert_eq!(normalise(path).unwrap(), expected, "{path}");
        }
        // The one-pass check agrees with the full one wherever it says "normal".
        for path in
            ["/v1/chat/completions", "/", "/a/./b", "/a//b", "/a/..", "/a/.b/..c/", "/v1/%41", "/.", "/a/b."]
        {
            if super::plainly_normal(path.as_bytes()) {
                assert!(
                    matches!(super::normalise_decoded(path), Ok(std::borrow::Cow::Borrowed(p)) if p == path),
                    "{path}"
                );
            }
        }
        assert!(super::plainly_normal(b"/a/.b/..c") && !super::plainly_normal(b"/a/./b"));
        let normal = normalise("/v1/chat/completions").unwrap();
        assert!(matches!(normal, std::borrow::Cow::Borrowed(_)), "a normal path is not copied");
    }

    #[test]
    fn encoded_separators_backslashes_and_escapes_above_the_root_are_refused() {
        for path in [
            "/v1/tools%2F..%2Fchat",
            "/v1/%2e%2e/chat",
            "/v1/%2E./x",
            "/v1\\..\\chat",
            "/..",
            "/a/../..",
            "*",
            "/v1/chat/%%36%33ompletions",
            "/v1/chat/%6%33ompletions",
            "/v1/%6",
            "/v1/x%",
            "/v1/tools/web-search/..;/..;/chat/completions",
            "/v1/tools/x/.;a/y",
        ] {
            assert!(normalise(path).is_err(), "{path} is refused");
        }
    }
}
