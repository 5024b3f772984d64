//! The SSRF guard: webhook URLs come from tenants, so a URL must not reach Herald's own network
//! (loopback, private ranges, link-local cloud metadata, …) unless an operator allow-listed it.
//!
//! The check is on the addresses the connection actually goes to: [`client`] builds a reqwest
//! client whose resolver drops every address [`Allow::permits`] refuses and fails when none is
//! left, so a name cannot pass a check with one address and connect to another. Address
//! literals never reach a resolver, so [`check_url`] checks them before the request. Redirects
//! are not followed (a public URL could redirect to a private one) and no proxy is used (it
//! would resolve the name itself, around the guard).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// Whether an address is on the public internet (std's `is_global` is not stable). Refused:
/// unspecified, loopback, private (10/8, 172.16/12, 192.168/16), link-local (169.254/16),
/// carrier-grade NAT (100.64/10), benchmarking (198.18/15), documentation, broadcast,
/// multicast, 0/8 and 240/4; for IPv6 the same through v4-mapped (`::ffff:a.b.c.d`) and
/// v4-compatible addresses, plus `::1`, `::`, unique-local `fc00::/7`, link-local `fe80::/10`,
/// site-local `fec0::/10`, multicast `ff00::/8`, documentation `2001:db8::/32`, NAT64
/// `64:ff9b::/96` of a non-public v4 address, and discard `100::/64`.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(v4: Ipv4Addr) -> bool {
    let [a, b, ..] = v4.octets();
    !(v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT 100.64.0.0/10
        || (a == 198 && (18..20).contains(&b)) // benchmarking 198.18.0.0/15
        || a >= 240)
}

fn is_public_v6(v6: Ipv6Addr) -> bool {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = v6.segments();
    // NAT64 (64:ff9b::/96) carries a v4 address in its last 32 bits.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_public_v4(Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ));
    }
    // The deprecated v4-compatible form (::a.b.c.d), which includes :: and ::1.
    if s[..6] == [0; 6] {
        return false;
    }
    !(v6.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation 2001:db8::/32
        || s[..4] == [0x100, 0, 0, 0]) // discard 100::/64
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowError {
    #[error("`{0}` is not an address, a CIDR block or a host name")]
    Invalid(String),
}

/// What an operator lets through although it is not public: address blocks (`127.0.0.1/32`,
/// `10.0.0.0/8`, `fd00::/8`; a bare address is its own block) and host names (as written in
/// URLs, case-insensitive). Blocks match v4-mapped v6 addresses by their v4 address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allow {
    hosts: HashSet<String>,
    nets: Vec<IpNet>,
}

impl Allow {
    /// Parses an allow-list: each entry a CIDR block, an address or a host name.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, AllowError> {
        let mut allow = Allow::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            let bare = entry.trim_matches(['[', ']']);
            if let Ok(net) = bare.parse::<IpNet>() {
                allow.nets.push(net.trunc());
            } else if let Ok(ip) = bare.parse::<IpAddr>() {
                allow.nets.push(IpNet::from(ip.to_canonical()));
            } else if is_host_name(bare) {
                allow.hosts.insert(bare.to_ascii_lowercase());
            } else {
                return Err(AllowError::Invalid(entry.to_string()));
            }
        }
        Ok(allow)
    }

    /// Whether `ip`, reached as `host`, may be connected to.
    pub fn permits(&self, host: &str, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        is_public(ip)
            || self.nets.iter().any(|net| net.contains(&canonical))
            || self.hosts.contains(&normal_host(host))
    }
}

fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn normal_host(host: &str) -> String {
    host.trim_matches(['[', ']']).to_ascii_lowercase()
}

/// A target refused by the guard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{host} is not a public address ({address})")]
pub struct Refused {
    pub host: String,
    /// The first refused address.
    pub address: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("invalid webhook URL: {0}")]
    InvalidUrl(String),
    #[error("refused target: {0}")]
    Refused(#[from] Refused),
}

/// Parses a webhook URL and checks what can be checked before connecting: an `http` or
/// `https` scheme, a host, and an address literal's address (names are checked by the
/// resolver of [`client`]).
pub fn check_url(url: &str, allow: &Allow) -> Result<reqwest::Url, TargetError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| TargetError::InvalidUrl(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(TargetError::InvalidUrl(format!(
            "scheme `{}`",
            parsed.scheme()
        )));
    }
    let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) else {
        return Err(TargetError::InvalidUrl("no host".into()));
    };
    if let Ok(address) = normal_host(host).parse::<IpAddr>()
        && !allow.permits(host, address)
    {
        return Err(Refused {
            host: normal_host(host),
            address,
        }
        .into());
    }
    Ok(parsed)
}

/// `scheme://host[:port]` of a URL, for logs and error texts: paths and queries of webhook
/// URLs often carry tokens.
pub fn masked(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(parsed) => {
            let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://{}{port}/…",
                parsed.scheme(),
                parsed.host_str().unwrap_or("?")
            )
        }
        Err(_) => "<invalid URL>".into(),
    }
}

/// Resolves names and keeps only the addresses the allow-list permits; the connection goes to
/// exactly these.
struct GuardedResolver {
    allow: Arc<Allow>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = normal_host(name.as_str());
        let allow = self.allow.clone();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let refused = found
                .iter()
                .map(SocketAddr::ip)
                .find(|ip| !allow.permits(&host, *ip));
            let kept: Vec<SocketAddr> = found
                .into_iter()
                .filter(|address| allow.permits(&host, address.ip()))
                .collect();
            match (kept.is_empty(), refused) {
                (true, Some(address)) => Err(Box::new(Refused { host, address }) as _),
                (true, None) => Err(format!("{host} resolves to no address").into()),
                (false, _) => Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// A client for webhook targets: `builder` (timeouts, user agent) plus the guarded resolver,
/// no redirects and no proxy.
pub fn client(
    allow: Arc<Allow>,
    builder: reqwest::ClientBuilder,
) -> Result<reqwest::Client, reqwest::Error> {
    builder
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver { allow }))
        .build()
}

/// The guard's refusal behind a failed request, if that is why it failed.
pub fn refusal(error: &reqwest::Error) -> Option<Refused> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<Refused>() {
            return Some(refused.clone());
        }
        source = cause.source();
    }
    None
}

/// A request error with its causes (reqwest's `Display` hides them), without the URL.
pub fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Reads at most `limit` bytes of an answer's body (the rest is dropped with the response):
/// a receiver cannot make Herald buffer an unbounded answer.
pub async fn read_bounded(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= limit {
            break;
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn non_public_v4_addresses_are_refused() {
        for private in [
            "127.0.0.1",
            "127.1.2.3",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "198.18.0.1",
            "192.0.2.1",
            "240.0.0.1",
        ] {
            assert!(!is_public(ip(private)), "{private}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
        ] {
            assert!(is_public(ip(public)), "{public}");
        }
    }

    #[test]
    fn non_public_v6_addresses_are_refused() {
        for private in [
            "::1",
            "::",
            "fe80::1",
            "febf::1",
            "fd00::1",
            "fc00::1",
            "ff02::1",
            "fec0::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:100.64.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "100::1",
        ] {
            assert!(!is_public(ip(private)), "{private}");
        }
        for public in [
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            "::ffff:1.1.1.1",
            "64:ff9b::101:101",
        ] {
            assert!(is_public(ip(public)), "{public}");
        }
    }

    #[test]
    fn the_allow_list_takes_blocks_addresses_and_names() {
        let allow = Allow::parse(&["127.0.0.1/32", "10.0.0.0/8", "fd00::/8", "Hooks.Internal"])
            .expect("allow-list");
        assert!(allow.permits("x", ip("127.0.0.1")));
        assert!(allow.permits("x", ip("::ffff:127.0.0.1")), "v4-mapped");
        assert!(!allow.permits("x", ip("127.0.0.2")));
        assert!(allow.permits("x", ip("10.200.0.1")));
        assert!(allow.permits("x", ip("fd12::1")));
        assert!(!allow.permits("x", ip("fe80::1")));
        assert!(allow.permits("hooks.internal", ip("192.168.0.9")));
        assert!(allow.permits("x", ip("1.1.1.1")), "public is always fine");
        let bare = Allow::parse(&["127.0.0.1", "[::1]"]).expect("bare addresses");
        assert!(bare.permits("x", ip("127.0.0.1")) && bare.permits("x", ip("::1")));
        assert_eq!(
            Allow::parse(&["10.0.0.0/33"]),
            Err(AllowError::Invalid("10.0.0.0/33".into()))
        );
    }

    #[test]
    fn literal_targets_are_checked_before_any_request() {
        let none = Allow::default();
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://[::1]/hook",
            "http://[::ffff:127.0.0.1]/hook",
            "https://169.254.169.254/latest/meta-data",
            "http://100.64.0.1/",
            "http://[fe80::1]/",
            "http://[fd00::1]/",
        ] {
            assert!(
                matches!(check_url(url, &none), Err(TargetError::Refused(_))),
                "{url}"
            );
        }
        assert!(check_url("https://hooks.example.com/x", &none).is_ok());
        assert!(matches!(
            check_url("file:///etc/passwd", &none),
            Err(TargetError::InvalidUrl(_))
        ));
        let allow = Allow::parse(&["127.0.0.1/32"]).expect("allow");
        assert!(check_url("http://127.0.0.1:8080/hook", &allow).is_ok());
    }

    #[test]
    fn masked_urls_keep_only_scheme_host_and_port() {
        assert_eq!(
            masked("https://user:pw@hooks.example.com:8443/t/SECRET?token=x"),
            "https://hooks.example.com:8443/…"
        );
    }

    /// An answer larger than the bound is cut at the bound, without reading the rest.
    #[tokio::test]
    async fn answers_are_read_up_to_the_bound() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            // The request first (a POST without a body: its head ends the first read).
            let mut request = vec![0u8; 4096];
            let _ = socket.read(&mut request).await;
            let huge = 1024 * 1024;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {huge}\r\n\r\n");
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&vec![b'x'; huge]).await;
        });
        let allow = Arc::new(Allow::parse(&["127.0.0.1/32"]).expect("allow"));
        let http = client(allow, reqwest::Client::builder()).expect("client");
        let response = http
            .post(format!("http://{address}/"))
            .send()
            .await
            .expect("answer");
        let body = read_bounded(response, 64 * 1024).await.expect("body");
        assert_eq!(body.len(), 64 * 1024);
    }

    /// A name resolving to loopback is refused by the resolver, before any connection, and
    /// the refusal is recognisable in the request's error.
    #[tokio::test]
    async fn names_resolving_to_private_addresses_are_refused_at_connect_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let http = client(Arc::new(Allow::default()), reqwest::Client::builder()).expect("client");
        let error = http
            .post(format!("http://localhost:{port}/hook"))
            .send()
            .await
            .expect_err("refused");
        let refused = refusal(&error).expect("the guard's refusal");
        assert_eq!(refused.host, "localhost");
        assert!(!is_public(refused.address));
        // Nothing connected.
        let accepted =
            tokio::time::timeout(std::time::Duration::from_millis(50), listener.accept()).await;
        assert!(accepted.is_err(), "no connection reached the listener");
    }
}
