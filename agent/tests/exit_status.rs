//! The exit status a service manager reads: 78 (EX_CONFIG) when the config cannot work, so the
//! systemd unit (RestartPreventExitStatus=78) stops retrying what only an edit can fix.

use std::process::Command;

fn status_of(config_text: &str) -> (Option<i32>, String) {
    status_with(config_text, &[])
}

fn status_with(config_text: &str, extra_args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config_text.replace("DATA", &dir.path().join("data").display().to_string())).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["--config", path.to_str().unwrap()])
        .args(extra_args)
        .output()
        .expect("edge-agent runs");
    (
        output.status.code(),
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
    )
}

#[test]
fn a_config_without_any_trusted_key_exits_with_status_78_and_says_so() {
    let (code, text) = status_of(
        "server_url = \"http://127.0.0.1:9\"\nenrollment_token = \"t\"\ndata_dir = \"DATA\"\nmqtt_url = \"mqtt://127.0.0.1:9\"\n",
    );
    assert_eq!(code, Some(78), "{text}");
    assert!(text.contains("neither root_file nor trusted_keys"), "{text}");
}

#[test]
fn a_device_neither_enrolled_nor_given_a_token_exits_with_status_78() {
    let (code, text) = status_of(
        "server_url = \"http://127.0.0.1:9\"\ndata_dir = \"DATA\"\nmqtt_url = \"mqtt://127.0.0.1:9\"\n\
         trusted_keys = [\"8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c\"]\n",
    );
    assert_eq!(code, Some(78), "{text}");
    assert!(text.contains("no enrollment_token"), "{text}");
}

#[test]
fn a_missing_config_file_exits_with_status_78() {
    let output =
        Command::new(env!("CARGO_BIN_EXE_edge-agent")).args(["--config", "/nonexistent/agent.toml"]).output().unwrap();
    assert_eq!(output.status.code(), Some(78));
}

#[test]
fn with_json_logs_the_refusal_is_one_json_object_per_line_without_colour_codes() {
    let (code, text) = status_with(
        "server_url = \"http://127.0.0.1:9\"\nenrollment_token = \"t\"\ndata_dir = \"DATA\"\nmqtt_url = \"mqtt://127.0.0.1:9\"\n",
        &["--log-format", "json"],
    );
    assert_eq!(code, Some(78), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in {text}");
    let lines: Vec<serde_json::Value> =
        text.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))).collect();
    let refusal = lines.iter().find(|l| l["level"] == "ERROR").expect("an error line");
    assert!(refusal["fields"]["message"].as_str().unwrap().contains("neither root_file nor trusted_keys"), "{refusal}");
}
