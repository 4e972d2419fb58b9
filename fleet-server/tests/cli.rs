//! The fleet-server binary as an operator starts it: plain text beyond loopback is refused
//! unless asked for, with a sentence naming the fix.

use std::process::Command;

#[test]
fn plain_http_on_a_public_address_is_refused_without_tls_or_allow_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let key = hex::encode([9u8; 32]);
    let output = Command::new(env!("CARGO_BIN_EXE_fleet-server"))
        .args(["--listen", "0.0.0.0:0", "--mqtt-listen", "127.0.0.1:0", "--trusted-key", &key, "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("fleet-server runs");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("would be plain text beyond this machine") && text.contains("--allow-insecure"), "{text}");
    assert!(!dir.path().join("fleet.db").exists(), "refused before touching the data directory");
}
