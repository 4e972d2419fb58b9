//! Just enough of MQTT 3.1.1 to authenticate a client and check its topics: framing, CONNECT,
//! and the topic of PUBLISH / the filters of SUBSCRIBE. Pure functions over bytes; fleet-server's
//! broker gate (`fleet-server/src/broker/gate.rs`) feeds them what it reads from devices, and
//! `fuzz/` feeds them anything (a crate of its own so that the fuzz build needs no server).

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("packet of {bytes} bytes exceeds the {limit}-byte limit")]
    TooLarge { bytes: usize, limit: usize },
    #[error("malformed remaining length")]
    Length,
    #[error("malformed {0} packet")]
    Malformed(&'static str),
    #[error("the first packet must be CONNECT")]
    NotConnect,
    #[error("MQTT protocol level {0} is not supported (3.1.1 only)")]
    Level(u8),
}

/// The length of the first whole packet in `buf`, or None while more bytes are needed.
pub fn frame(buf: &[u8], limit: usize) -> Result<Option<usize>, PacketError> {
    let mut remaining: usize = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let total = 1 + (i + 1) + remaining;
            if total > limit {
                return Err(PacketError::TooLarge { bytes: total, limit });
            }
            return Ok((buf.len() >= total).then_some(total));
        }
    }
    Err(PacketError::Length)
}

/// The variable header and payload of a whole packet (after the fixed header).
fn body(packet: &[u8]) -> &[u8] {
    let length_bytes = packet[1..].iter().take(4).position(|b| b & 0x80 == 0).map_or(4, |p| p + 1);
    &packet[(1 + length_bytes).min(packet.len())..]
}

/// Reads MQTT's length-prefixed fields.
struct Fields<'a> {
    bytes: &'a [u8],
    kind: &'static str,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PacketError> {
        if self.bytes.len() < n {
            return Err(PacketError::Malformed(self.kind));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, PacketError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PacketError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn binary(&mut self) -> Result<&'a [u8], PacketError> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    fn string(&mut self) -> Result<&'a str, PacketError> {
        std::str::from_utf8(self.binary()?).map_err(|_| PacketError::Malformed(self.kind))
    }
}

/// What a CONNECT says about who is connecting.
#[derive(Debug, PartialEq, Eq)]
pub struct Connect {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    pub will_topic: Option<String>,
}

pub fn parse_connect(packet: &[u8]) -> Result<Connect, PacketError> {
    if packet.first().map(|b| b >> 4) != Some(1) {
        return Err(PacketError::NotConnect);
    }
    let mut f = Fields { bytes: body(packet), kind: "CONNECT" };
    let protocol = f.string()?;
    let level = f.u8()?;
    if !(protocol == "MQTT" && level == 4) {
        return Err(PacketError::Level(level));
    }
    let flags = f.u8()?;
    f.u16()?; // keep-alive
    let client_id = f.string()?.to_string();
    let will_topic = if flags & 0x04 != 0 {
        let topic = f.string()?.to_string();
        f.binary()?;
        Some(topic)
    } else {
        None
    };
    let username = if flags & 0x80 != 0 { Some(f.string()?.to_string()) } else { None };
    let password = if flags & 0x40 != 0 { Some(f.binary()?.to_vec()) } else { None };
    Ok(Connect { client_id, username, password, will_topic })
}

/// The topics a client packet touches.
#[derive(Debug, PartialEq, Eq)]
pub enum Access<'a> {
    Publish(&'a str),
    Subscribe(Vec<&'a str>),
    /// Acknowledgements, pings, unsubscribes, disconnect: nothing to check.
    Other,
    /// A second CONNECT is a protocol violation.
    Connect,
}

pub fn access(packet: &[u8]) -> Result<Access<'_>, PacketError> {
    match packet.first().map(|b| b >> 4) {
        Some(1) => Ok(Access::Connect),
        Some(3) => {
            let mut f = Fields { bytes: body(packet), kind: "PUBLISH" };
            Ok(Access::Publish(f.string()?))
        }
        Some(8) => {
            let mut f = Fields { bytes: body(packet), kind: "SUBSCRIBE" };
            f.u16()?; // packet id
            let mut filters = Vec::new();
            while !f.bytes.is_empty() {
                filters.push(f.string()?);
                f.u8()?; // requested QoS
            }
            if filters.is_empty() {
                return Err(PacketError::Malformed("SUBSCRIBE"));
            }
            Ok(Access::Subscribe(filters))
        }
        _ => Ok(Access::Other),
    }
}

/// A device may publish and subscribe only below its own topic root,
/// `fleet/v1/devices/<device>/…` (the same rule as the Mosquitto ACL pattern
/// `fleet/v1/devices/%u/#`). Wildcards can only widen what comes after that prefix.
pub fn device_may_use(device: &str, topic_or_filter: &str) -> bool {
    let Some(rest) = topic_or_filter.strip_prefix(proto::wire::TOPIC_ROOT) else {
        return false;
    };
    let Some(rest) = rest.strip_prefix('/').and_then(|r| r.strip_prefix(device)) else {
        return false;
    };
    matches!(rest.strip_prefix('/'), Some(tail) if !tail.is_empty())
}

/// CONNACK with a 3.1.1 return code: 1 bad protocol level, 4 bad username or password,
/// 5 not authorised.
pub fn connack(code: u8) -> [u8; 4] {
    [0x20, 0x02, 0x00, code]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut out = (s.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(s.as_bytes());
        out
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        let mut n = body.len();
        loop {
            let mut byte = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(body);
        out
    }

    fn connect(user: Option<&str>, password: Option<&str>, will: Option<&str>) -> Vec<u8> {
        let mut flags = 0x02;
        let mut payload = string("client-1");
        if let Some(will) = will {
            flags |= 0x04;
            payload.extend(string(will));
            payload.extend(string("bye"));
        }
        if let Some(user) = user {
            flags |= 0x80;
            payload.extend(string(user));
        }
        if let Some(password) = password {
            flags |= 0x40;
            payload.extend(string(password));
        }
        let mut body = string("MQTT");
        body.extend([4, flags, 0, 15]);
        body.extend(payload);
        packet(0x10, &body)
    }

    #[test]
    fn connect_yields_client_id_credentials_and_will_topic() {
        let parsed = parse_connect(&connect(Some("dev-1"), Some("secret"), Some("fleet/v1/devices/dev-1/x"))).unwrap();
        assert_eq!(
            parsed,
            Connect {
                client_id: "client-1".into(),
                username: Some("dev-1".into()),
                password: Some(b"secret".to_vec()),
                will_topic: Some("fleet/v1/devices/dev-1/x".into()),
            }
        );
        let anonymous = parse_connect(&connect(None, None, None)).unwrap();
        assert_eq!((anonymous.username, anonymous.password), (None, None));
    }

    #[test]
    fn connect_that_is_truncated_or_not_3_1_1_is_refused() {
        let whole = connect(Some("dev-1"), Some("secret"), None);
        for cut in 2..whole.len() {
            assert!(parse_connect(&whole[..cut]).is_err(), "cut at {cut}");
        }
        let mut v5 = whole.clone();
        v5[2 + 6] = 5;
        assert_eq!(parse_connect(&v5), Err(PacketError::Level(5)));
        assert_eq!(parse_connect(&packet(0x30, &string("t"))), Err(PacketError::NotConnect));
    }

    #[test]
    fn frames_are_found_whole_and_oversized_ones_refused() {
        let publish = packet(0x30, &[string("a/b"), vec![1; 300]].concat());
        assert_eq!(frame(&publish, 1024), Ok(Some(publish.len())));
        assert_eq!(frame(&publish[..publish.len() - 1], 1024), Ok(None));
        assert_eq!(frame(&publish[..1], 1024), Ok(None));
        assert_eq!(frame(&publish, 100), Err(PacketError::TooLarge { bytes: publish.len(), limit: 100 }));
        assert_eq!(frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX), Err(PacketError::Length));
    }

    #[test]
    fn publish_topic_and_subscribe_filters_are_read() {
        let publish = packet(0x32, &[string("fleet/v1/devices/d/heartbeat"), vec![0, 1], vec![9; 4]].concat());
        assert_eq!(access(&publish), Ok(Access::Publish("fleet/v1/devices/d/heartbeat")));
        let subscribe = packet(0x82, &[vec![0, 7], string("a/#"), vec![1], string("b/+"), vec![0]].concat());
        assert_eq!(access(&subscribe), Ok(Access::Subscribe(vec!["a/#", "b/+"])));
        assert!(access(&packet(0x82, &[0, 7])).is_err(), "a SUBSCRIBE without filters is malformed");
        assert_eq!(access(&[0xc0, 0]), Ok(Access::Other));
    }

    #[test]
    fn a_device_uses_only_topics_below_its_own_id() {
        for allowed in ["fleet/v1/devices/dev-1/heartbeat", "fleet/v1/devices/dev-1/#", "fleet/v1/devices/dev-1/+/x"] {
            assert!(device_may_use("dev-1", allowed), "{allowed}");
        }
        for refused in [
            "fleet/v1/devices/dev-2/heartbeat",
            "fleet/v1/devices/dev-10/heartbeat",
            "fleet/v1/devices/+/heartbeat",
            "fleet/v1/devices/#",
            "fleet/v1/devices/dev-1",
            "fleet/v1/devices/dev-1/",
            "#",
            "$SYS/#",
            "other/dev-1/x",
        ] {
            assert!(!device_may_use("dev-1", refused), "{refused}");
        }
    }
}
