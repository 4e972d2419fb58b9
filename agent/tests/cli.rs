//! The edge-agent binary as a person flashing a device runs it: a bad config path or an invalid
//! config is refused with one sentence naming what to fix.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_edge-agent")).args(args).output().expect("edge-agent runs");
    (
        output.status.success(),
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
    )
}

#[test]
fn a_missing_config_file_is_named() {
    let (ok, text) = run(&["--config", "/nonexistent/edge-agent.toml"]);
    assert!(!ok);
    assert!(text.contains("cannot read config file /nonexistent/edge-agent.toml"), "{text}");
}

#[test]
fn an_unknown_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "server_ulr = \"http://x\"\n").unwrap();
    let (ok, text) = run(&["--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(text.contains("server_ulr"), "{text}");
}
