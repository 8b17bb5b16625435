//! Server addresses: `scheme://host:port` split and checked once, when the config is read, and
//! what counts as loopback.

use std::fmt;
use std::net::IpAddr;

/// The schemes of one kind of server, `(name, default port)`: the plain one and the TLS one.
pub(super) struct Schemes {
    pub(super) plain: (&'static str, u16),
    pub(super) tls: (&'static str, u16),
}

/// A server as the config names it, `scheme://host[:port]` or bare `host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// Given with the TLS scheme (`mqtts://`, `tls://`).
    pub tls: bool,
    pub host: String,
    pub port: u16,
    text: String,
    /// Why `text` is not a server address. Kept for its section's check rather than failing the
    /// section, so the section's other problems are reported too, all at its line.
    pub(super) problem: Option<String>,
}

impl ServerUrl {
    pub(super) fn parse(text: String, schemes: &Schemes) -> Self {
        let tls = text.starts_with(&format!("{}://", schemes.tls.0));
        let default_port = if tls { schemes.tls.1 } else { schemes.plain.1 };
        let names = [schemes.plain.0, schemes.tls.0];
        let (host, port, problem) = match parse_host_port(&text, &names, default_port) {
            Ok((host, port)) => (host, port, None),
            Err(e) => (String::new(), 0, Some(e)),
        };
        Self {
            tls,
            host,
            port,
            text,
            problem,
        }
    }
}

/// The text as written in the config.
impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `scheme://host:port` (or bare `host:port`) → `(host, port)`.
pub(crate) fn parse_host_port(
    url: &str,
    schemes: &[&str],
    default_port: u16,
) -> Result<(String, u16), String> {
    let rest = match url.split_once("://") {
        Some((scheme, rest)) => {
            if !schemes.contains(&scheme) {
                return Err(format!(
                    "`{url}`: scheme `{scheme}` is not supported here; use {}",
                    schemes
                        .iter()
                        .map(|s| format!("{s}://"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ));
            }
            rest
        }
        None => url,
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('@') || rest.contains('/') || rest.contains('?') {
        return Err(format!(
            "`{url}`: write only scheme://host:port here; credentials and options have their own keys"
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("`{url}`: unclosed `[`"))?;
        (host.to_string(), after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("`{url}`: `{p}` is not a port"))?,
        None => default_port,
    };
    Ok((host, port))
}

pub(crate) fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::parse_host_port;

    #[test]
    fn host_ports() {
        assert_eq!(
            parse_host_port("mqtt://127.0.0.1:1884", &["mqtt"], 1883).unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(
            parse_host_port("mqtt://broker", &["mqtt"], 1883).unwrap(),
            ("broker".into(), 1883)
        );
        assert_eq!(
            parse_host_port("[::1]:4222", &["nats"], 4222).unwrap(),
            ("::1".into(), 4222)
        );
        assert!(parse_host_port("http://x", &["mqtt"], 1).is_err());
        assert!(parse_host_port("mqtt://u:p@x", &["mqtt"], 1).is_err());
    }
}
