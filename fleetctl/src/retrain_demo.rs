//! `fleetctl demo --scenario retrain`: one site's inputs shift and stay shifted. The server's
//! drift watch (2-second windows here; an hour by default) sends one retraining event for that
//! site and one for the whole fleet to a webhook the demo runs, and nothing for the sites whose
//! inputs did not move.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::events::RetrainEvent;
use serde::Serialize;

use crate::demo::{send_rows, start_fleet, synthetic_rows, wait_for, DemoError, DemoOptions, SHIFTED_FEATURES};

/// The site whose inputs shift.
pub const SHIFTED_SITE: &str = "plant-a";
/// Rows each agent answers every 200 ms.
pub const ROWS_PER_TICK: usize = 100;

#[derive(Serialize, Debug, Clone)]
pub struct RetrainOutcome {
    pub ok: bool,
    pub window_secs: u64,
    pub events: Vec<RetrainEvent>,
}

/// Collects what the fleet server POSTs.
async fn webhook() -> Result<(String, Arc<Mutex<Vec<RetrainEvent>>>), DemoError> {
    let received: Arc<Mutex<Vec<RetrainEvent>>> = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/retrain",
        axum::routing::post(move |axum::Json(event): axum::Json<RetrainEvent>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(event);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| DemoError::Setup(e.to_string()))?;
    let url = format!("http://{}/retrain", listener.local_addr().map_err(|e| DemoError::Setup(e.to_string()))?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, received))
}

pub async fn run(options: DemoOptions, progress: impl Fn(&str)) -> Result<RetrainOutcome, DemoError> {
    let (url, received) = webhook().await?;
    let window_secs = 2;
    let retrain = fleet_server::retrain::RetrainConfig {
        webhook: Some(url.clone()),
        cohort_label: Some("site".into()),
        bucket_secs: window_secs,
        check_every: Duration::from_millis(500),
    };
    let fleet = start_fleet(&DemoOptions { retrain: Some(retrain), ..options.clone() }, &progress).await?;
    progress(&format!(
        "retraining webhook {url}; drift watched per {window_secs} s window, for the fleet and per site"
    ));
    progress(&format!(
        "site {SHIFTED_SITE}'s inputs shift by +3 on {} and stay shifted; the other sites see the reference",
        SHIFTED_FEATURES.join(", ")
    ));
    let devices = fleet.client.devices().await?;
    let shifted: Vec<bool> = fleet
        .agents
        .iter()
        .map(|a| {
            let id = a.device_id().unwrap_or_default();
            devices.iter().any(|d| d.id == id && d.labels.get("site").map(String::as_str) == Some(SHIFTED_SITE))
        })
        .collect();
    // One sender per agent, so a slow one does not hold the others back.
    let traffic: Vec<_> = fleet
        .agents
        .iter()
        .cloned()
        .zip(shifted)
        .enumerate()
        .map(|(i, (agent, shifted))| {
            tokio::spawn(async move {
                let http = edge_agent::http::client();
                for round in 0u64.. {
                    let rows = synthetic_rows(round * 100 + i as u64, ROWS_PER_TICK, if shifted { 3.0 } else { 0.0 });
                    let _ = send_rows(&http, &agent, &rows).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        })
        .collect();
    let wanted = 2;
    let arrived = wait_for("retraining events for the shifted site and the fleet", options.timeout, || async {
        let events = received.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (events.len() >= wanted).then_some(())
    })
    .await;
    // The episode goes on a little longer: it must not send again.
    tokio::time::sleep(Duration::from_secs(window_secs * 2)).await;
    traffic.iter().for_each(|t| t.abort());
    fleet.shutdown().await;
    arrived?;
    let events = received.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let cohorts: Vec<BTreeMap<String, String>> = events.iter().map(|e| e.cohort.clone()).collect();
    let site: BTreeMap<String, String> = [("site".to_string(), SHIFTED_SITE.to_string())].into();
    // Every shifted feature is named. A site's window of a few hundred rows is judged by KS at
    // p < 0.05, where an unshifted feature drifts by chance one window in twenty: such a name
    // beside them is the test's honest false alarm, not a wrong event.
    let right_features =
        events.iter().all(|e| SHIFTED_FEATURES.iter().all(|name| e.drifted_features.iter().any(|f| f.name == *name)));
    let ok = events.len() == wanted && cohorts.contains(&site) && cohorts.contains(&BTreeMap::new()) && right_features;
    Ok(RetrainOutcome { ok, window_secs, events })
}

pub fn render_table(outcome: &RetrainOutcome) -> String {
    let mut out = format!(
        "{:<16} {:<8} {:>8} {:<14} drifted features (test score)\n",
        "cohort", "version", "windows", "since (ms)"
    );
    for e in &outcome.events {
        let cohort = if e.cohort.is_empty() {
            "whole fleet".to_string()
        } else {
            e.cohort.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
        };
        let features: Vec<String> =
            e.drifted_features.iter().map(|f| format!("{} ({} {:.2})", f.name, f.test, f.score)).collect();
        out.push_str(&format!(
            "{cohort:<16} {:<8} {:>8} {:<14} {}\n",
            e.version,
            e.windows,
            e.since_ms,
            features.join(", ")
        ));
    }
    let verdict = if outcome.ok {
        format!("one event each for {SHIFTED_SITE} and the whole fleet, none for the other sites")
    } else {
        format!("FAILED: expected one event each for {SHIFTED_SITE} and the whole fleet, and no other")
    };
    out.push_str(&format!("result: {verdict}\n"));
    out
}
