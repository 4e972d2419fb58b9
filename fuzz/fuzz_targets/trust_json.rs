//! The trust documents a device reads from the server (ADR 0010): a root (parsed, checked as an
//! initial root and as the rotation after a fixed root 1) and a check-in reply's signed freshness.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::freshness::{accept, Seen};
use proto::keys::{SigningKey, TrustedKeys};
use proto::root::{rotate, single_key_root, SignedRoot};
use proto::wire::DesiredState;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    let key = SigningKey::from_bytes(&[1; 32]);
    if kind % 2 == 0 {
        if let Ok(root) = SignedRoot::parse(body) {
            let _ = root.verify_initial();
            let current = single_key_root(&key, &key.verifying_key(), &key.verifying_key(), u64::MAX).signed;
            let _ = rotate(&current, &root, 1_800_000_000);
            // What was accepted serializes and parses back to the same document.
            let again = SignedRoot::parse(&root.to_json_bytes()).expect("a parsed root parses again");
            assert_eq!(again, root);
        }
    } else if let Ok(desired) = serde_json::from_slice::<DesiredState>(body) {
        let keys = TrustedKeys::new([key.verifying_key()]);
        let _ = accept(&desired, &keys, "dev-1", &Seen { counter: 3, time_floor: 1_800_000_000, fresh_until: 0 }, 0);
    }
});
