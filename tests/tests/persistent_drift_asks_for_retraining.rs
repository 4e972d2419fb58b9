//! Drift that persists asks for a retraining, once: one site's agents see shifted inputs for
//! several drift windows in a row; the server sends one event per episode and cohort to a real
//! HTTP webhook (which fails the first try, so the retry is exercised) and to MQTT, names the
//! drifted features, the lineage and how to export the rows, and writes it to the audit log.
//! The sites that did not drift get nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use fleet_server::retrain::RetrainConfig;
use fleet_tests::*;
use fleetctl::demo::{send_rows, synthetic_rows, wait_for};
use proto::events::{RetrainEvent, RETRAIN_TOPIC};

/// A webhook that answers 503 to its first request and 200 after; keeps what it was sent.
async fn webhook() -> (String, Arc<Mutex<Vec<RetrainEvent>>>) {
    let received: Arc<Mutex<Vec<RetrainEvent>>> = Arc::default();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (seen, count) = (received.clone(), calls.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(event): axum::Json<RetrainEvent>| {
            let (seen, count) = (seen.clone(), count.clone());
            async move {
                if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                seen.lock().unwrap().push(event);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_sites_persistent_drift_sends_one_retraining_event_per_cohort_to_the_webhook_and_mqtt() {
    let (url, received) = webhook().await;
    let mqtt = open_mqtt();
    let fleet_server::server::Mqtt::External { url: broker } = &mqtt else { unreachable!() };
    let events = subscribe(broker).await;
    let retrain = RetrainConfig {
        webhook: Some(url),
        cohort_label: Some("site".into()),
        bucket_secs: 2,
        check_every: Duration::from_millis(500),
    };
    let fleet = Fleet::start_changed(3, mqtt, &[], |c| c.retrain = retrain).await;
    fleet.publish(fixture_bundle(&fleet.secret, "1.0.0", MLP).unwrap()).await;
    fleet.deploy_all("tabular", "1.0.0").await;
    fleet.wait_active("tabular", "1.0.0").await;

    // Agent 0 (site plant-a) sees inputs shifted by +3 on the first four features; the others
    // see the reference distribution. 120 rows each every 200 ms, until both events arrived.
    let agents = fleet.agents.clone();
    let traffic = tokio::spawn(async move {
        let http = edge_agent::http::client();
        for round in 0u64.. {
            for (i, agent) in agents.iter().enumerate() {
                let rows = synthetic_rows(round * 10 + i as u64, 120, if i == 0 { 3.0 } else { 0.0 });
                let _ = send_rows(&http, agent, &rows).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let got = wait_for("retraining events for plant-a and the fleet", Duration::from_secs(90), || async {
        let seen = received.lock().unwrap().clone();
        (seen.len() >= 2).then_some(seen)
    })
    .await
    .unwrap();
    // A few more checks: the episode goes on, and must not send again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    traffic.abort();

    let seen = received.lock().unwrap().clone();
    let cohorts: Vec<String> = seen.iter().map(|e| fleet_server::drift::retrain::cohort_key(&e.cohort)).collect();
    assert_eq!(seen.len(), 2, "one event per cohort and episode: {cohorts:?}");
    assert!(cohorts.contains(&"site=plant-a".to_string()) && cohorts.contains(&String::new()), "{cohorts:?}");
    let site = got.iter().find(|e| !e.cohort.is_empty()).unwrap();
    let names: Vec<&str> = site.drifted_features.iter().map(|f| f.name.as_str()).collect();
    // All four shifted features; a site's small window is judged by KS at p < 0.05, where an
    // unshifted one may drift by chance (one window in twenty), so others may stand beside them.
    for shifted in ["temperature", "vibration", "pressure", "current"] {
        assert!(names.contains(&shifted), "{names:?}");
    }
    assert_eq!((site.model.as_str(), site.version.as_str(), site.windows), ("tabular", "1.0.0", 3));
    assert_eq!(site.lineage.code_commit, "3c9e1f0");
    assert!(site.telemetry_export.contains("--model tabular --version 1.0.0"));

    let audit = fleet.client.audit(None).await.unwrap();
    let lines: Vec<_> = audit.iter().filter(|a| a.action == proto::wire::AuditAction::RetrainRequested).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().any(|a| a.detail.contains("site=plant-a") && a.detail.contains(&site.id)));

    let published = wait_for("the events over MQTT", Duration::from_secs(10), || async {
        let seen = events.lock().unwrap().clone();
        (seen.len() >= 2).then_some(seen)
    })
    .await
    .unwrap();
    let mut ids: Vec<&str> = published.iter().map(|e| e.id.as_str()).collect();
    ids.sort();
    let mut webhook_ids: Vec<&str> = seen.iter().map(|e| e.id.as_str()).collect();
    webhook_ids.sort();
    assert_eq!(ids, webhook_ids, "the same events, once each, on both paths");
    fleet.shutdown().await;
}

/// Everything published on the retraining topic of `broker` (one that admits anyone).
async fn subscribe(broker: &str) -> Arc<Mutex<Vec<RetrainEvent>>> {
    let (host, port) = proto::endpoint::parse_mqtt_url(broker).unwrap();
    let options = rumqttc::MqttOptions::new(format!("events-{}", rand::random::<u32>()), host, port);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 16);
    client.subscribe(RETRAIN_TOPIC, rumqttc::QoS::AtLeastOnce).await.unwrap();
    let seen: Arc<Mutex<Vec<RetrainEvent>>> = Arc::default();
    let sink = seen.clone();
    tokio::spawn(async move {
        let _client = client;
        while let Ok(event) = eventloop.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = event {
                if let Ok(e) = serde_json::from_slice::<RetrainEvent>(&p.payload) {
                    sink.lock().unwrap().push(e);
                }
            }
        }
    });
    seen
}
