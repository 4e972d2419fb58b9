//! An agent refuses to send its credential in clear beyond this machine: a plain http:// or
//! mqtt:// URL to a host that is not loopback is refused at start with one sentence naming the
//! field and the fix, unless the config says `allow_insecure = true`; loopback stays allowed.

use fleetctl::demo::agent_config;

#[tokio::test]
async fn plain_text_urls_to_other_hosts_are_refused_without_allow_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let key = "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c";
    let cases = [
        ("http://192.0.2.10:8080", "mqtt://127.0.0.1:1884", "server_url"),
        ("http://127.0.0.1:8080", "mqtt://fleet.example:1883", "mqtt_url"),
    ];
    for (server_url, mqtt_url, field) in cases {
        let config = agent_config(server_url, mqtt_url, "token", key, dir.path().join(field), 0);
        let err = match edge_agent::start(config.clone()).await {
            Ok(_) => panic!("{server_url} / {mqtt_url} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(field) && err.contains("plain text") && err.contains("allow_insecure = true"), "{err}");
        assert!(!dir.path().join(field).exists(), "nothing was written before refusing");
        let allowed = edge_agent::config::AgentConfig { allow_insecure: true, ..config };
        allowed.validate().unwrap();
    }
    let loopback = agent_config("http://127.0.0.1:8080", "mqtt://[::1]:1884", "token", key, dir.path().join("lo"), 0);
    loopback.validate().unwrap();
}
