//! What the server's broker gate reads from a device before the broker sees it: the byte stream
//! is cut into packets (`frame`), the first is parsed as CONNECT, every later one is checked for
//! the topics it touches against the device's own (`access`, `device_may_use`), in the gate's
//! order. The first input byte picks the packet size limit.
#![no_main]

use broker_packets::{access, device_may_use, frame, parse_connect, Access};
use libfuzzer_sys::fuzz_target;

const LIMITS: [usize; 4] = [16, 256, 65_536, 1 << 20];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, mut stream)) = data.split_first() else { return };
    let limit = LIMITS[usize::from(pick) % LIMITS.len()];
    let mut device = String::from("dev-1");
    let mut first = true;
    while let Ok(Some(len)) = frame(stream, limit) {
        assert!((2..=stream.len().min(limit)).contains(&len), "frame of {len} in {} bytes", stream.len());
        let (packet, rest) = stream.split_at(len);
        stream = rest;
        if first {
            first = false;
            match parse_connect(packet) {
                Ok(connect) => {
                    // The gate goes on only for a login that is an enrolled device: a valid id.
                    if let Some(username) = connect.username {
                        if proto::names::validate("device id", &username).is_err() {
                            return;
                        }
                        device = username;
                    }
                    if let Some(will) = connect.will_topic {
                        check_topic(&device, &will);
                    }
                }
                Err(_) => return,
            }
            continue;
        }
        match access(packet) {
            Ok(Access::Publish(topic)) => check_topic(&device, topic),
            Ok(Access::Subscribe(filters)) => {
                assert!(!filters.is_empty());
                filters.iter().for_each(|f| check_topic(&device, f));
            }
            Ok(Access::Other | Access::Connect) => {}
            Err(_) => return,
        }
    }
});

/// A topic the device may use lies strictly below its own root, whatever the wildcards.
fn check_topic(device: &str, topic: &str) {
    if device_may_use(device, topic) {
        let own = format!("{}/{device}/", proto::wire::TOPIC_ROOT);
        assert!(topic.starts_with(&own) && topic.len() > own.len(), "{device} may use {topic:?}");
    }
}
