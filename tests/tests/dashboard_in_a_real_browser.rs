//! The dashboard in a real browser: Debian's Chromium driven over WebDriver (chromedriver,
//! installed by tests/browser/setup.sh; `FLEET_TEST_CHROMEDRIVER` names it, and CI sets it).
//! A server with real agents and a staged rollout: an operator logs in, every page loads, pause
//! then resume change the rollout's state as the API sees it, a viewer's buttons are disabled,
//! and no page logs an error. Screenshots of each page go to target/dashboard-screenshots/
//! (docs/DASHBOARD.md shows a committed set).

use std::path::PathBuf;

use fleet_server::rollout::Phase;
use fleet_tests::webdriver::Browser;
use fleet_tests::*;
use fleetctl::demo::wait_for;
use proto::wire::Role;

fn screenshots() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn no_page_errors(browser: &Browser, page: &str) {
    let errors = browser.eval("return window.dashboardErrors || ['errors.js did not load'];").await;
    assert_eq!(errors, serde_json::json!([]), "the {page} page logged errors");
    let text = browser.eval("return document.body.innerText;").await;
    let text = text.as_str().unwrap_or_default();
    assert!(!text.contains("undefined") && !text.contains("null"), "the {page} page shows a missing value: {text}");
}

async fn log_in(browser: &Browser, url: &str, token: &str) {
    browser.goto(&format!("{url}/ui/")).await;
    browser.type_into("#token", token).await;
    browser.click("#login").await;
    browser.element("#who").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_runs_a_rollout_from_the_dashboard_in_a_real_browser() {
    let Ok(driver) = std::env::var("FLEET_TEST_CHROMEDRIVER") else {
        eprintln!(
            "skipped: FLEET_TEST_CHROMEDRIVER is not set (tests/browser/setup.sh installs Chromium and its driver)"
        );
        return;
    };
    let fleet = Fleet::serving_v1(4, mqtt_from_env(), &[]).await;
    fleet.publish(bundle_with_golden(&fleet.secret, "2.0.0", MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    // Traffic and a closed drift window on every device, so the drift page has something to plot.
    for (i, agent) in fleet.agents.iter().enumerate() {
        let (status, _) = infer(agent, serde_json::json!({ "inputs": synthetic_rows(i as u64, 50, 0.0) })).await;
        assert_eq!(status, 200);
        agent.report_drift_now().await;
    }
    let plan: proto::rollout::RolloutPlan = serde_json::from_value(serde_json::json!({
        "model": "tabular", "version": "2.0.0", "holdout": 0.25,
        "waves": [{"percent": 50.0}, {"percent": 100.0}], "soak_secs": 3600.0, "gates": {"min_samples": 0}
    }))
    .unwrap();
    let id = fleet.client.start_rollout(&plan).await.unwrap().rollout.id;
    let client = fleet.client.clone();
    wait_for("wave 1 to soak", TIMEOUT, || async { client.rollout(&id).await.ok()?.rollout.soak_until_ms.map(|_| ()) })
        .await
        .unwrap();

    let url = fleet.server.url();
    let profile = tempfile::tempdir().unwrap();
    let browser = Browser::start(&driver, profile.path()).await;
    let shots = screenshots();

    // Fleet overview.
    log_in(&browser, &url, &fleet.server.operator_token).await;
    browser.wait_text("#card-devices", "4").await;
    browser.wait_text("#device-count", "4 of 4 devices").await;
    let plant_a = fleet.client.devices().await.unwrap().iter().filter(|d| d.labels["site"] == "plant-a").count();
    browser.type_into("#filter-label", "site=plant-a").await;
    browser.wait_text("#device-count", &format!("{plant_a} of 4 devices")).await;
    browser.screenshot(&shots.join("fleet.png")).await;
    no_page_errors(&browser, "fleet").await;

    // Rollouts, then the rollout: gates against the holdout, pause and resume.
    browser.click("#nav-rollouts").await;
    browser.wait_text("#rollouts", &id).await;
    browser.screenshot(&shots.join("rollouts.png")).await;
    browser.goto(&format!("{url}/ui/#/rollouts/{id}")).await;
    browser.wait_text("#phase", "running").await;
    let gates = browser.text("#gates").await.unwrap();
    for gate in ["mean confidence", "prediction shift", "error rate", "latency p95", "input drift"] {
        assert!(gates.contains(gate), "gate {gate} missing from {gates}");
    }
    browser.wait_text("#waves", "soaking").await;
    browser.screenshot(&shots.join("rollout.png")).await;
    browser.click("#action-pause").await;
    browser.wait_text("#phase", "paused").await;
    assert_eq!(fleet.client.rollout(&id).await.unwrap().rollout.phase, Phase::Paused);
    browser.click("#action-resume").await;
    browser.wait_text("#phase", "running").await;
    assert_eq!(fleet.client.rollout(&id).await.unwrap().rollout.phase, Phase::Running);
    let audit = browser.text("#audit").await.unwrap();
    assert!(audit.contains("pause") && audit.contains("resume"), "{audit}");
    no_page_errors(&browser, "rollout").await;

    // Drift: a plot per version (uPlot draws on a canvas) and the latest verdicts.
    browser.click("#nav-drift").await;
    browser.element("#drift-charts .chart canvas").await;
    browser.wait_text("#drift-latest", "feature").await;
    browser.screenshot(&shots.join("drift.png")).await;
    no_page_errors(&browser, "drift").await;

    // A device page.
    let device = fleet.agents[0].device_id().unwrap();
    browser.goto(&format!("{url}/ui/#/devices/{device}")).await;
    browser.wait_text("#device-models", "tabular").await;
    browser.element("#device-history tbody tr").await;
    browser.screenshot(&shots.join("device.png")).await;
    no_page_errors(&browser, "device").await;

    // A viewer sees the rollout but its buttons do not work.
    let viewer = fleet.client.add_operator("vera", Role::Viewer).await.unwrap();
    browser.click("#logout").await;
    log_in(&browser, &url, &viewer.token).await;
    browser.wait_text("#who", "vera (viewer)").await;
    browser.goto(&format!("{url}/ui/#/rollouts/{id}")).await;
    browser.wait_text("#phase", "running").await;
    let disabled = browser
        .eval("return ['pause','resume','promote','retry','abort'].map(a => document.getElementById('action-' + a).disabled);")
        .await;
    assert_eq!(disabled, serde_json::json!([true, true, true, true, true]));
    no_page_errors(&browser, "viewer's rollout").await;

    // A wrong token is refused with a sentence, on the login form.
    browser.click("#logout").await;
    browser.type_into("#token", "not-a-token").await;
    browser.click("#login").await;
    browser.wait_text("#login-error", "not valid").await;

    browser.quit().await;
    fleet.shutdown().await;
}
