//! Server and broker addresses as both sides write them: `http(s)://host:port/…` and
//! `mqtt(s)://host:port` (IPv6 hosts in brackets), and the rule for when plain text is allowed.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("mqtt_url {0:?} must look like mqtt://host:port or mqtts://host:port")]
pub struct BadMqttUrl(pub String);

/// A broker address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
    /// `mqtts://`: TLS.
    pub tls: bool,
}

/// Splits `mqtt://host:port` or `mqtts://host:port`.
pub fn parse_broker_url(url: &str) -> Result<BrokerAddr, BadMqttUrl> {
    let bad = || BadMqttUrl(url.to_string());
    let (rest, tls) = match (url.strip_prefix("mqtt://"), url.strip_prefix("mqtts://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => return Err(bad()),
    };
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port = port.trim_end_matches('/').parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok(BrokerAddr { host: host.trim_start_matches('[').trim_end_matches(']').to_string(), port, tls })
}

/// Splits `mqtt(s)://host:port` into host and port.
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), BadMqttUrl> {
    parse_broker_url(url).map(|addr| (addr.host, addr.port))
}

/// A plain-text URL to a host that is not this machine, without `allow_insecure`.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "{field} {url:?} is plain text to a host that is not this machine; use https:// / mqtts:// with a pinned CA, or set allow_insecure = true"
)]
pub struct InsecureUrl {
    pub field: &'static str,
    pub url: String,
}

/// Plain `http://` and `mqtt://` are allowed to loopback hosts; elsewhere only when the
/// configuration says `allow_insecure`. `https://` and `mqtts://` are always allowed.
pub fn require_secure(field: &'static str, url: &str, allow_insecure: bool) -> Result<(), InsecureUrl> {
    let plain = ["http://", "mqtt://"].into_iter().find_map(|scheme| url.strip_prefix(scheme));
    let Some(rest) = plain else {
        return Ok(());
    };
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(host, _)| host),
    };
    if allow_insecure || is_loopback(host) {
        Ok(())
    } else {
        Err(InsecureUrl { field, url: url.to_string() })
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls_parse_to_host_and_port() {
        assert_eq!(parse_mqtt_url("mqtt://127.0.0.1:1884").unwrap(), ("127.0.0.1".into(), 1884));
        assert_eq!(parse_mqtt_url("mqtt://[::1]:1883").unwrap(), ("::1".into(), 1883));
        for bad in ["127.0.0.1:1883", "mqtt://host", "mqtt://:1", "mqtt://h:x", "tcp://h:1"] {
            assert!(parse_mqtt_url(bad).is_err(), "{bad}");
        }
        let tls = parse_broker_url("mqtts://fleet.example:8883").unwrap();
        assert_eq!(tls, BrokerAddr { host: "fleet.example".into(), port: 8883, tls: true });
    }

    #[test]
    fn plain_text_is_allowed_to_loopback_only_unless_insecure_is_allowed() {
        for fine in [
            "http://127.0.0.1:8080",
            "http://localhost:1/x",
            "mqtt://[::1]:1883",
            "mqtt://127.0.0.2:1",
            "https://fleet.example",
            "mqtts://10.0.0.5:8883",
        ] {
            assert_eq!(require_secure("server_url", fine, false), Ok(()), "{fine}");
        }
        for refused in
            ["http://10.0.0.5:8080", "mqtt://fleet.example:1883", "http://[2001:db8::1]:80/", "http://127.0.0.1.evil:1"]
        {
            assert!(require_secure("server_url", refused, false).is_err(), "{refused}");
            assert_eq!(require_secure("server_url", refused, true), Ok(()), "{refused} with allow_insecure");
        }
    }
}
