//! `fleetctl demo --scenario offline`: one site loses the server and the broker for a while; its
//! agents keep inferring and buffering. Meanwhile the server itself restarts once. Then the site
//! returns and syncs. The result counts, per device, the records the agent wrote (reports by
//! sequence, telemetry rows) against the records the server stored; it is ok only if nothing
//! was lost and nothing was stored twice.

use std::time::Duration;

use edge_agent::AgentHandle;
use fleet_server::server::{self, Mqtt, ServerConfig, ServerHandle};
use proto::keys::{parse_secret_key, public_key_hex};
use proto::wire::DeployRequest;
use serde::Serialize;

use crate::client::FleetClient;
use crate::demo::{
    agent_config, fixture_bundle, send_rows, synthetic_rows, wait_for, DemoError, DemoOptions, MODEL, SITES,
};
use crate::link::Link;

/// The site that goes offline.
pub const OFFLINE_SITE: &str = "plant-a";

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct OfflineDevice {
    pub id: String,
    pub site: String,
    pub records_sent: u64,
    pub records_stored: u64,
    pub duplicates_stored: u64,
    pub evicted: u64,
}

#[derive(Serialize, Debug, Clone, PartialEq, Default)]
pub struct Totals {
    pub records_sent: u64,
    pub records_stored: u64,
    pub duplicates_stored: u64,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct OfflineResult {
    pub ok: bool,
    pub devices: Vec<OfflineDevice>,
    pub totals: Totals,
}

/// One device's account (pure): sent = what the agent wrote and did not evict; stored beyond it
/// can only be a record stored twice.
pub fn account(id: &str, site: &str, written: u64, evicted: u64, stored: u64) -> OfflineDevice {
    let sent = written.saturating_sub(evicted);
    OfflineDevice {
        id: id.to_string(),
        site: site.to_string(),
        records_sent: sent,
        records_stored: stored,
        duplicates_stored: stored.saturating_sub(sent),
        evicted,
    }
}

pub fn verdict(devices: Vec<OfflineDevice>) -> OfflineResult {
    let mut totals = Totals::default();
    for d in &devices {
        totals.records_sent += d.records_sent;
        totals.records_stored += d.records_stored;
        totals.duplicates_stored += d.duplicates_stored;
    }
    let ok = devices.iter().all(|d| d.records_stored == d.records_sent && d.duplicates_stored == 0);
    OfflineResult { ok, devices, totals }
}

fn setup<E: std::fmt::Display>(e: E) -> DemoError {
    DemoError::Setup(e.to_string())
}

/// The fleet's root of trust (ADR 0010): its file, and the timestamp key's secret (hex) the
/// server signs check-in replies with.
struct Trust<'a> {
    root_file: &'a std::path::Path,
    timestamp_key: &'a str,
}

async fn start_server(
    data_dir: &std::path::Path,
    http_port: u16,
    mqtt_port: u16,
    trust: &Trust<'_>,
    token: &str,
) -> Result<ServerHandle, DemoError> {
    let config = ServerConfig {
        listen: ([127, 0, 0, 1], http_port).into(),
        data_dir: data_dir.to_path_buf(),
        mqtt: Mqtt::External { url: format!("mqtt://127.0.0.1:{mqtt_port}") },
        operator_token: Some(token.to_string()),
        root_file: Some(trust.root_file.to_path_buf()),
        timestamp_key: Some(trust.timestamp_key.to_string()),
        max_bundle_bytes: 64 << 20,
        rollout_tick: Duration::from_millis(250),
        ..ServerConfig::default()
    };
    // The port is free again once the previous server let go of it.
    wait_for("the server to listen", Duration::from_secs(30), || async { server::start(config.clone()).await.ok() })
        .await
}

/// `rows` rows to every agent, then each closes its drift window.
async fn traffic(http: &reqwest::Client, agents: &[AgentHandle], round: u64, rows: usize) -> Result<(), DemoError> {
    for (index, agent) in agents.iter().enumerate() {
        send_rows(http, agent, &synthetic_rows(round * 1000 + index as u64, rows, 0.0))
            .await
            .map_err(|message| DemoError::Traffic { index, message })?;
        agent.report_drift_now().await;
    }
    Ok(())
}

pub async fn run(options: DemoOptions, progress: impl Fn(&str)) -> Result<OfflineResult, DemoError> {
    let dir = tempfile::tempdir().map_err(setup)?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let public = public_key_hex(&parse_secret_key(&secret).map_err(setup)?.verifying_key());
    let root_file = dir.path().join("root.json");
    let timestamp_key = crate::demo::write_demo_root(&root_file, &public)?;
    let trust = Trust { root_file: &root_file, timestamp_key: &timestamp_key };
    // The broker outlives the server here, as a site's broker would: the embedded one on its port.
    let mqtt_port = server::free_loopback_port().map_err(setup)?;
    fleet_server::broker::start_open(([127, 0, 0, 1], mqtt_port).into(), proto::wire::MAX_MQTT_PAYLOAD + 1024)
        .map_err(setup)?;
    let http_port = server::free_loopback_port().map_err(setup)?;
    let server_dir = dir.path().join("server");
    let token = hex::encode(rand::random::<[u8; 16]>());
    let first = start_server(&server_dir, http_port, mqtt_port, &trust, &token).await?;
    let client = FleetClient::new(&first.url(), &token);
    progress(&format!("fleet server on {} with MQTT at {}", first.url(), first.mqtt_url));

    let http_link = Link::start(first.http_addr).await.map_err(setup)?;
    let mqtt_link = Link::start(([127, 0, 0, 1], mqtt_port).into()).await.map_err(setup)?;
    let tokens = client.tokens(options.agents as u32).await?;
    let mut agents = Vec::new();
    for (index, token) in tokens.iter().enumerate() {
        let site = SITES[index % SITES.len()];
        let (server_url, mqtt_url) = if site == OFFLINE_SITE {
            (format!("http://{}", http_link.addr), format!("mqtt://{}", mqtt_link.addr))
        } else {
            (first.url(), first.mqtt_url.clone())
        };
        let mut config =
            agent_config(&server_url, &mqtt_url, token, &public, dir.path().join(format!("agent-{index:03}")), index);
        config.trusted_keys.clear();
        config.root_file = Some(root_file.clone());
        agents.push(
            edge_agent::start(config).await.map_err(|source| DemoError::Agent { index, source: Box::new(source) })?,
        );
    }
    let offline = agents.iter().enumerate().filter(|(i, _)| SITES[i % SITES.len()] == OFFLINE_SITE).count();
    progress(&format!(
        "{} agents enrolled; {offline} of them at {OFFLINE_SITE}, behind a link that will go down",
        agents.len()
    ));
    client.publish(fixture_bundle(&secret, "1.0.0", MODEL)?).await?;
    client
        .deploy(&DeployRequest { model: "tabular".into(), version: "1.0.0".into(), devices: None, selector: None })
        .await?;
    wait_for("every agent to activate tabular 1.0.0", options.timeout, || async {
        for agent in &agents {
            if !agent.engine.active().await.contains_key("tabular") {
                return None;
            }
        }
        Some(())
    })
    .await?;

    let http = edge_agent::http::client();
    let rows = options.traffic_rows.max(1);
    let mut rounds = 0u64;
    traffic(&http, &agents, rounds, rows).await?;
    rounds += 1;
    progress(&format!("{OFFLINE_SITE} loses the server and the broker; its agents keep inferring and buffering"));
    http_link.cut();
    mqtt_link.cut();
    for _ in 0..5 {
        traffic(&http, &agents, rounds, rows).await?;
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    progress("the fleet server restarts");
    first.shutdown().await;
    traffic(&http, &agents, rounds, rows).await?;
    rounds += 1;
    let second = start_server(&server_dir, http_port, mqtt_port, &trust, &token).await?;
    let client = FleetClient::new(&second.url(), &token);
    traffic(&http, &agents, rounds, rows).await?;
    rounds += 1;
    progress(&format!("{OFFLINE_SITE} comes back and syncs"));
    http_link.restore();
    mqtt_link.restore();
    traffic(&http, &agents, rounds, rows).await?;
    rounds += 1;

    let telemetry_sent = rounds * rows as u64;
    let ids: Vec<String> = agents.iter().filter_map(AgentHandle::device_id).collect();
    let settled = wait_for("every site to sync", options.timeout, || async {
        let views = client.delivery().await.ok()?;
        let mut devices = Vec::new();
        for (index, (agent, id)) in agents.iter().zip(&ids).enumerate() {
            let stats = agent.delivery().await.ok()?;
            let view = views.iter().find(|v| &v.device == id)?;
            let written = stats.written + telemetry_sent - agent.telemetry.dropped();
            let stored = view.reports_stored + view.telemetry_stored;
            let device = account(id, SITES[index % SITES.len()], written, stats.evicted.total(), stored);
            // Still syncing: records wait on the device.
            if stats.pending > 0
                || agent.telemetry.flush().await != Some(0)
                || device.records_stored < device.records_sent
            {
                return None;
            }
            devices.push(device);
        }
        Some(devices)
    })
    .await;
    let devices = match settled {
        Ok(devices) => devices,
        Err(e) => {
            progress(&format!("{e}: reporting what arrived"));
            let views = client.delivery().await?;
            let mut devices = Vec::new();
            for (index, (agent, id)) in agents.iter().zip(&ids).enumerate() {
                let stats = agent.delivery().await.map_err(setup)?;
                let view = views.iter().find(|v| &v.device == id).cloned().unwrap_or_default();
                let written = stats.written + telemetry_sent - agent.telemetry.dropped();
                devices.push(account(
                    id,
                    SITES[index % SITES.len()],
                    written,
                    stats.evicted.total(),
                    view.reports_stored + view.telemetry_stored,
                ));
            }
            devices
        }
    };
    for agent in &agents {
        agent.shutdown().await;
    }
    second.shutdown().await;
    Ok(verdict(devices))
}

pub fn render_table(result: &OfflineResult) -> String {
    let mut out =
        format!("{:<18} {:<9} {:>8} {:>8} {:>11} {:>8}\n", "DEVICE", "SITE", "SENT", "STORED", "DUPLICATES", "EVICTED");
    for d in &result.devices {
        out += &format!(
            "{:<18} {:<9} {:>8} {:>8} {:>11} {:>8}\n",
            d.id, d.site, d.records_sent, d.records_stored, d.duplicates_stored, d.evicted
        );
    }
    let t = &result.totals;
    out += &format!(
        "total: {} records sent, {} stored, {} stored twice: {}\n",
        t.records_sent,
        t.records_stored,
        t.duplicates_stored,
        if result.ok { "nothing lost, nothing stored twice" } else { "RECORDS LOST OR DUPLICATED" }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_whole_when_it_stored_exactly_what_it_sent_and_evictions_are_not_losses() {
        let whole = account("d", "plant-a", 120, 20, 100);
        assert_eq!((whole.records_sent, whole.duplicates_stored), (100, 0));
        let twice = account("e", "plant-b", 50, 0, 51);
        assert_eq!(twice.duplicates_stored, 1);
        let lost = account("f", "plant-c", 50, 0, 49);
        assert!(verdict(vec![whole.clone()]).ok);
        assert!(!verdict(vec![whole.clone(), twice]).ok);
        let result = verdict(vec![whole, lost]);
        assert!(!result.ok);
        assert_eq!(result.totals, Totals { records_sent: 150, records_stored: 149, duplicates_stored: 0 });
    }
}
