//! Shutdown that waits: when `AgentHandle::shutdown` returns, the local API no longer listens
//! and every telemetry record offered before it is on disk.

use edge_agent::telemetry::TelemetryRecord;
use fleet_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_shut_down_has_closed_its_api_and_written_every_offered_record() {
    let dir = tempfile::tempdir().unwrap();
    let (_, public) = new_key();
    // No server: the agent starts offline and keeps retrying enrollment until it is stopped.
    let config = fleetctl::demo::agent_config(
        "http://127.0.0.1:9",
        "mqtt://127.0.0.1:9",
        "offline",
        &public,
        dir.path().join("agent"),
        0,
    );
    let agent = edge_agent::start(config).await.unwrap();
    assert!(tokio::net::TcpStream::connect(agent.api_addr).await.is_ok(), "the API listens once started");
    let offered = 3_000u32;
    for i in 0..offered {
        let record = TelemetryRecord {
            at_ms: i as u64,
            model: "m".into(),
            version: "1.0.0".into(),
            latency_us: i,
            features: vec![0.0; 8],
            outputs: vec![1.0],
        };
        assert!(agent.telemetry.offer(record), "the queue holds {offered} records");
    }
    agent.shutdown().await;
    assert!(tokio::net::TcpStream::connect(agent.api_addr).await.is_err(), "the API still listens");
    let db = rusqlite::Connection::open(dir.path().join("agent/telemetry.db")).unwrap();
    let rows: u32 = db.query_row("SELECT COUNT(*) FROM telemetry", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, offered);
}
