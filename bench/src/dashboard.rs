//! Dashboard at fleet size: the fleet page's load time in a real headless Chromium and the
//! `GET /api/v1/devices` it reads, with 1,000 devices against the same server holding 10 (the
//! baseline, same run). Devices are written into the server's store directly (enrolled, labelled,
//! a heartbeat and a model status each), as a fleet of that size would leave it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fleet_server::server::{Mqtt, ServerConfig};
use fleet_server::store::{NewDevice, SqliteStore, Store};
use fleet_tests::webdriver::Browser;
use proto::wire::{Health, Heartbeat, ModelCounters, UpdateStatus, UpdateStep};

pub struct Figures {
    /// (devices, API p50 ms, page p50 ms)
    pub rows: Vec<(usize, f64, f64)>,
    pub repeats: usize,
}

fn add_devices(store: &SqliteStore, from: usize, to: usize, now_ms: u64) -> Result<()> {
    for i in from..to {
        let id = format!("dev-{i:06}");
        store.insert_device(&NewDevice {
            id: id.clone(),
            name: format!("edge-{i:06}"),
            labels: [("site".to_string(), format!("plant-{}", i % 20)), ("region".to_string(), "eu".into())].into(),
            credential_hash: format!("{i:064x}"),
            enrolled_ms: now_ms,
            public_key: String::new(),
            broker_hash: String::new(),
        })?;
        let version = if i % 3 == 0 { "2.0.0" } else { "1.0.0" };
        let status = UpdateStatus {
            model: "tabular".into(),
            version: version.into(),
            step: UpdateStep::Active,
            detail: String::new(),
            active_version: Some(version.into()),
            at_ms: now_ms,
        };
        store.record_status(&id, &status)?;
        let heartbeat = Heartbeat {
            at_ms: now_ms,
            uptime_secs: 3600,
            health: Health {
                cpu_percent: 12.0,
                memory_used_bytes: 300 << 20,
                memory_total_bytes: 1 << 30,
                disk_free_bytes: 4 << 30,
                disk_total_bytes: 8 << 30,
            },
            models: vec![ModelCounters {
                model: "tabular".into(),
                version: version.into(),
                inferences: 1000,
                errors: 0,
                telemetry_dropped: 0,
                latency_p95_us: Some(40),
                shadow_version: None,
            }],
        };
        store.record_heartbeat(&id, &heartbeat)?;
        store.touch(&id, now_ms)?;
    }
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub async fn run(dir: &Path, chromedriver: &str, repeats: usize) -> Result<Figures> {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.join("server"),
        mqtt: Mqtt::Embedded { listen: ([127, 0, 0, 1], fleet_server::server::free_loopback_port()?).into() },
        operator_token: Some("op".into()),
        // The server needs a key to check published bundles by; nothing is published here.
        trusted_keys: vec![proto::keys::public_key_hex(&proto::keys::SigningKey::from_bytes(&[7; 32]).verifying_key())],
        ..ServerConfig::default()
    };
    let server = fleet_server::server::start(config).await.context("fleet-server did not start")?;
    let store = SqliteStore::open(&dir.join("server/fleet.db"))?;
    let url = server.url();
    let http = reqwest::Client::new();
    let profile = tempfile::tempdir()?;
    let browser = Browser::start(chromedriver, profile.path()).await;
    browser.goto(&format!("{url}/ui/")).await;
    browser.type_into("#token", "op").await;
    browser.click("#login").await;
    browser.element("#device-count").await;

    let mut rows = Vec::new();
    let mut have = 0;
    for size in [10usize, 1000] {
        add_devices(&store, have, size, fleet_server::unix_ms())?;
        have = size;
        let mut api = Vec::new();
        let mut page = Vec::new();
        for round in 0..repeats {
            let started = Instant::now();
            let body = http.get(format!("{url}/api/v1/devices")).bearer_auth("op").send().await?.bytes().await?;
            api.push(started.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(body.len() > size * 100, "the device list came back short");
            // A full load each time (a new query string), logged in from this tab's session.
            let started = Instant::now();
            browser.goto(&format!("{url}/ui/?load={size}-{round}#/fleet")).await;
            browser.wait_text("#device-count", &format!("{size} of {size} devices")).await;
            browser.element("#devices tbody tr").await;
            page.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        rows.push((size, median(api), median(page)));
    }
    browser.quit().await;
    server.shutdown().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(Figures { rows, repeats })
}

pub fn section(f: &Figures) -> String {
    let (small, large) = (f.rows[0], f.rows[1]);
    format!(
        "## Dashboard\n\n\
         `cargo build --release --locked --bins && target/release/fleet-bench dashboard --write docs/BENCHMARKS.md`\n\
         (needs Chromium and chromedriver: `tests/browser/setup.sh`). One fleet-server (SQLite), devices written into\n\
         its store with labels, a model status and a heartbeat each; the fleet page loaded in headless Chromium\n\
         (a full page load: HTML, scripts, `whoami`, `GET /api/v1/devices`, the table drawn), median of {} loads.\n\n\
         | devices | GET /api/v1/devices p50 | fleet page ready p50 |\n|---:|---:|---:|\n\
         | {} (baseline) | {:.1} ms | {:.0} ms |\n| {} | {:.1} ms ({:.2}x) | {:.0} ms ({:.2}x) |\n",
        f.repeats,
        small.0,
        small.1,
        small.2,
        large.0,
        large.1,
        large.1 / small.1,
        large.2,
        large.2 / small.2
    )
}
