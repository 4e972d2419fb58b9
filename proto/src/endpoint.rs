//! Broker addresses as both sides write them: `mqtt://host:port` (IPv6 hosts in brackets).

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("mqtt_url {0:?} must look like mqtt://host:port")]
pub struct BadMqttUrl(pub String);

/// Splits `mqtt://host:port` into host and port.
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), BadMqttUrl> {
    let bad = || BadMqttUrl(url.to_string());
    let rest = url.strip_prefix("mqtt://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port = port.trim_end_matches('/').parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls_parse_to_host_and_port() {
        assert_eq!(parse_mqtt_url("mqtt://127.0.0.1:1884").unwrap(), ("127.0.0.1".into(), 1884));
        assert_eq!(parse_mqtt_url("mqtt://[::1]:1883").unwrap(), ("::1".into(), 1883));
        for bad in ["127.0.0.1:1883", "mqtt://host", "mqtt://:1", "mqtt://h:x"] {
            assert!(parse_mqtt_url(bad).is_err(), "{bad}");
        }
    }
}
