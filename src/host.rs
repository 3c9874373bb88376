//! Host and Origin checks on both listeners: DNS-rebinding protection.
//!
//! toolgate terminates MCP, so upstreams only ever see toolgate's own Host;
//! the check the MCP transports ask servers to make has to happen here. A
//! browser page on another site that rebinds its name to 127.0.0.1 still
//! sends its own Host and Origin, which is how it is refused.
//!
//! Rules: a listener bound to loopback accepts only loopback Host names
//! (`localhost`, `127.0.0.1`, `[::1]`, any port) plus `allowed_hosts`; any
//! other listener accepts any Host unless `allowed_hosts` is set. An
//! `Origin` header, when present, must be a loopback origin or one of
//! `allowed_origins`. MCP clients outside browsers send no Origin.

use std::net::SocketAddr;

/// The Host and Origin policy of one listener.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    loopback_only: bool,
    allowed_hosts: Vec<String>,
    allowed_origins: Vec<String>,
}

fn is_loopback_name(host: &str) -> bool {
    // Parsed, not prefix-matched: "127.0.0.1.evil.example" is not loopback.
    matches!(host, "localhost" | "[::1]" | "::1")
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `host[:port]` → host, lowercased.
fn host_part(authority: &str) -> String {
    let a = authority.trim();
    if let Some(rest) = a.strip_prefix('[') {
        return rest
            .split(']')
            .next()
            .map(|h| format!("[{}]", h.to_ascii_lowercase()))
            .unwrap_or_default();
    }
    // One copy (lowercased) of the host alone: this runs on every request.
    let host = match a.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => a,
    };
    host.to_ascii_lowercase()
}

impl HostPolicy {
    pub fn new(listen: SocketAddr, allowed_hosts: &[String], allowed_origins: &[String]) -> Self {
        HostPolicy {
            loopback_only: listen.ip().is_loopback(),
            allowed_hosts: allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            allowed_origins: allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Why a request with these headers is refused, if it is.
    pub fn check(&self, headers: &http::HeaderMap) -> Result<(), String> {
        let host = headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok());
        if let Some(host) = host {
            let h = host_part(host);
            let listed = self
                .allowed_hosts
                .iter()
                .any(|a| *a == h || *a == host.to_ascii_lowercase());
            let ok = if self.loopback_only {
                is_loopback_name(&h) || listed
            } else {
                self.allowed_hosts.is_empty() || listed
            };
            if !ok {
                return Err(format!("Host {host:?} is not allowed on this listener"));
            }
        }
        if let Some(origin) = headers.get(http::header::ORIGIN) {
            let o = origin
                .to_str()
                .unwrap_or("")
                .trim_end_matches('/')
                .to_ascii_lowercase();
            let loopback = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
                .is_some_and(|rest| is_loopback_name(&host_part(rest)));
            if !(loopback || self.allowed_origins.contains(&o)) {
                return Err(format!("Origin {o:?} is not allowed"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn loopback_listeners_refuse_foreign_hosts_and_origins() {
        let p = HostPolicy::new(
            "127.0.0.1:8080".parse().unwrap(),
            &["gate.internal".into()],
            &["https://ops.example.com".into()],
        );
        for ok in [
            vec![("host", "127.0.0.1:8080")],
            vec![("host", "localhost:1")],
            vec![("host", "[::1]:8080")],
            vec![("host", "gate.internal")],
            vec![("host", "localhost"), ("origin", "http://localhost:3000")],
            vec![
                ("host", "localhost"),
                ("origin", "https://ops.example.com/"),
            ],
            vec![],
        ] {
            assert!(p.check(&headers(&ok)).is_ok(), "{ok:?}");
        }
        for bad in [
            vec![("host", "evil.example:8080")],
            vec![("host", "127.0.0.1.evil.example")],
            vec![("host", "localhost"), ("origin", "http://evil.example")],
            vec![("host", "localhost"), ("origin", "null")],
        ] {
            assert!(p.check(&headers(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn other_listeners_take_any_host_unless_listed() {
        let open = HostPolicy::new("0.0.0.0:8080".parse().unwrap(), &[], &[]);
        assert!(open
            .check(&headers(&[("host", "gate.example.com")]))
            .is_ok());
        let listed = HostPolicy::new(
            "0.0.0.0:8080".parse().unwrap(),
            &["gate.example.com".into()],
            &[],
        );
        assert!(listed
            .check(&headers(&[("host", "gate.example.com:8080")]))
            .is_ok());
        assert!(listed
            .check(&headers(&[("host", "other.example.com")]))
            .is_err());
    }
}
