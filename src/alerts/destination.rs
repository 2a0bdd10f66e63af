//! Where alert webhooks may go: public addresses only, unless the operator
//! allows more.
//!
//! A webhook URL is chosen by whoever holds an org token, so without a check
//! the gateway would POST into its own network (loopback, private ranges,
//! cloud metadata at 169.254.169.254). The check runs twice: on the URL when
//! a rule is added (IP literals and local names), and on every address the
//! name resolves to when a delivery connects. The second is the one that
//! counts: the connector connects only to the addresses [`GuardedResolver`]
//! returns, so a name that resolves to a public address at add time and to
//! 127.0.0.1 later (DNS rebinding) is still refused.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The one reason every refusal gives, so the answer says nothing about
/// what lies behind an address (no oracle for probing the network).
pub const REFUSED: &str = "not an allowed webhook destination: use a public http:// or https:// address \
                           (the operator may allow others with [admin] alert_webhook_allow)";

/// IPv4 ranges that are not public beyond what `Ipv4Addr`'s stable methods
/// cover: shared address space (CGNAT), IETF protocol assignments (some
/// clouds' metadata lives there), benchmarking, reserved.
static NON_PUBLIC_V4: LazyLock<Vec<Ipv4Net>> = LazyLock::new(|| {
    ["100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15", "240.0.0.0/4", "0.0.0.0/8"]
        .iter()
        .filter_map(|net| net.parse().ok())
        .collect()
});

/// IPv6 ranges that are not public beyond `Ipv6Addr`'s stable methods:
/// documentation, the deprecated site-local range, discard-only.
static NON_PUBLIC_V6: LazyLock<Vec<Ipv6Net>> = LazyLock::new(|| {
    ["2001:db8::/32", "fec0::/10", "100::/64"].iter().filter_map(|net| net.parse().ok()).collect()
});

/// Whether `ip` is a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_unspecified()
        || ip.is_multicast()
        || NON_PUBLIC_V4.iter().any(|net| net.contains(&ip)))
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    // Addresses that carry an IPv4 address are judged by it: mapped
    // (::ffff:a.b.c.d), NAT64 (64:ff9b::/96) and 6to4 (2002::/16).
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let segments = ip.segments();
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [a, b] = segments[6].to_be_bytes();
        let [c, d] = segments[7].to_be_bytes();
        return is_public_v4(Ipv4Addr::new(a, b, c, d));
    }
    if segments[0] == 0x2002 {
        let [a, b] = segments[1].to_be_bytes();
        let [c, d] = segments[2].to_be_bytes();
        return is_public_v4(Ipv4Addr::new(a, b, c, d));
    }
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_unique_local()
        || ip.is_unicast_link_local()
        || NON_PUBLIC_V6.iter().any(|net| net.contains(&ip)))
}

/// Public addresses plus whatever the operator allows.
#[derive(Debug, Clone, Default)]
pub struct DestinationPolicy {
    /// Networks the operator opened (`[admin] alert_webhook_allow`).
    pub allow: Vec<IpNet>,
}

impl DestinationPolicy {
    pub fn allows(&self, ip: IpAddr) -> bool {
        // Judge a mapped IPv4 address as itself, also against the allow-list.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        is_public(ip) || self.allow.iter().any(|net| net.contains(&ip))
    }

    /// Checks a webhook URL as far as it can be checked without resolving:
    /// scheme, syntax, IP literals, local names. `Err` carries [`REFUSED`]
    /// or a syntax hint, never what was found at the address.
    pub fn check_url(&self, url: &str) -> Result<(), &'static str> {
        let uri: http::Uri = url.parse().map_err(|_| "an http:// or https:// URL")?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err("an http:// or https:// URL");
        }
        let host = uri.host().ok_or("an http:// or https:// URL with a host")?;
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err("an http:// or https:// URL without user information");
        }
        match literal_ip(host) {
            Some(ip) if self.allows(ip) => Ok(()),
            Some(_) => Err(REFUSED),
            None if is_local_name(host) => Err(REFUSED),
            None => Ok(()),
        }
    }
}

/// The IP address a URL host spells out, if it is one (`[::1]` included).
pub fn literal_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Names that resolve locally on any sane resolver; refused early so the
/// answer comes at once (the resolver would refuse them anyway).
fn is_local_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost"
        || host.ends_with(".localhost")
        || host.ends_with(".internal")
        || host.ends_with(".local")
}

/// A resolver for the webhook client that drops every address the policy
/// does not allow, so the connection goes only where the policy says.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    pub policy: Arc<DestinationPolicy>,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let allowed: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|address| policy.allows(address.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, REFUSED));
            }
            Ok(allowed.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn internal_addresses_are_not_public() {
        // Proves every range an attacker would aim at is refused by default.
        for text in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "192.0.0.192",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "ff02::1",
        ] {
            assert!(!is_public(ip(text)), "{text} must not count as public");
        }
        for text in ["93.184.215.14", "1.1.1.1", "2606:4700:4700::1111"] {
            assert!(is_public(ip(text)), "{text} is public");
        }
    }

    #[test]
    fn urls_are_checked_before_any_connection() {
        // Proves literal and local-name URLs are refused at once, and the allow-list opens them.
        let strict = DestinationPolicy::default();
        for url in [
            "http://127.0.0.1:9/x",
            "http://[::1]/x",
            "http://10.0.0.8/x",
            "http://169.254.169.254/latest/meta-data/",
            "http://localhost:8081/admin",
            "http://metadata.google.internal/",
        ] {
            assert_eq!(strict.check_url(url), Err(REFUSED), "{url}");
        }
        assert!(strict.check_url("ftp://example.com/").is_err());
        assert!(strict.check_url("http://user:pw@example.com/").is_err());
        assert_eq!(strict.check_url("https://hooks.example.com/alerts"), Ok(()));
        let open =
            DestinationPolicy { allow: vec!["127.0.0.1/32".parse().unwrap_or_else(|_| IpNet::default())] };
        assert_eq!(open.check_url("http://127.0.0.1:9/x"), Ok(()));
        assert_eq!(open.check_url("http://127.0.0.2:9/x"), Err(REFUSED), "only what was allowed");
    }

    #[tokio::test]
    async fn the_resolver_drops_addresses_the_policy_refuses() {
        // Proves the connect-time check: a name that resolves to loopback is refused.
        use tower_service::Service;
        let mut strict = GuardedResolver { policy: Arc::new(DestinationPolicy::default()) };
        let name: Name = "localhost".parse().unwrap_or_else(|_| unreachable!("a valid name"));
        let refused = strict.call(name.clone()).await;
        assert_eq!(refused.map(|_| ()).map_err(|e| e.kind()), Err(std::io::ErrorKind::PermissionDenied));
        let allow = vec![
            "127.0.0.0/8".parse().unwrap_or_else(|_| IpNet::default()),
            "::1/128".parse().unwrap_or_else(|_| IpNet::default()),
        ];
        let mut open = GuardedResolver { policy: Arc::new(DestinationPolicy { allow }) };
        let addresses: Vec<SocketAddr> = open.call(name).await.map(Iterator::collect).unwrap_or_default();
        assert!(!addresses.is_empty() && addresses.iter().all(|a| a.ip().is_loopback()), "{addresses:?}");
    }
}
