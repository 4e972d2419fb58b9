//! Two fleet-servers on one PostgreSQL database and one broker serve one fleet at once: both
//! answer the API and serve every bundle (one shared bundle directory), reports are split between
//! them by a shared MQTT subscription, and exactly one drives the rollouts under a lease. The one
//! driving a rollout is killed (SIGKILL, a process of its own) in the middle of it; the other
//! takes the lease over within one lease period and completes the rollout (whose operator
//! actions are taken on the server that did not drive it at first).
//!
//! Needs `FLEET_TEST_DATABASE_URL` and `FLEET_TEST_MQTT_URL` (CI sets both): SQLite and the
//! embedded broker belong to one server each.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleet_server::rollout::create::OperatorAction;
use fleet_server::rollout::Phase;
use fleet_server::server::{free_loopback_port, Mqtt, ServerConfig};
use fleet_tests::*;
use fleetctl::client::FleetClient;
use fleetctl::demo::wait_for;

const LEASE: Duration = Duration::from_secs(3);
const SHARE_GROUP: &str = "fleet-servers";

/// The fleet-server binary beside this test, built (or found up to date) by cargo first: a test
/// run of this package alone does not rebuild another package's binaries.
fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let debug_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--locked", "-p", "fleet-server", "--bin", "fleet-server"])
        .status()
        .unwrap();
    assert!(status.success(), "building fleet-server failed");
    debug_dir.join("fleet-server")
}

/// Server A: the same database, schema, broker, bundle directory and trusted key as `config`
/// (server B's), its own data directory and port, as a process of its own (so it can be killed).
/// Returns once its API answers.
fn start_process_server(config: &ServerConfig, dir: &Path) -> (Child, String, PathBuf) {
    let port = free_loopback_port().unwrap();
    let Mqtt::External { url: mqtt_url } = &config.mqtt else { panic!("two servers need an external broker") };
    let log = dir.join("server-a.log");
    let mut args: Vec<String> = vec![
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--data-dir".into(),
        dir.join("server-a").display().to_string(),
        "--database-url".into(),
        config.database_url.clone().unwrap(),
        "--mqtt-url".into(),
        mqtt_url.clone(),
        "--mqtt-share-group".into(),
        SHARE_GROUP.into(),
        "--operator-token".into(),
        "op".into(),
        "--trusted-key".into(),
        config.trusted_keys[0].clone(),
        "--bundle-dir".into(),
        config.bundle_dir.clone().unwrap().display().to_string(),
        "--lease-secs".into(),
        LEASE.as_secs().to_string(),
    ];
    if let Some(schema) = &config.database_schema {
        args.extend(["--database-schema".into(), schema.clone()]);
    }
    let mut child = Command::new(server_binary())
        .args(&args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("server-a.err")).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let exited = child.try_wait().unwrap();
        assert!(
            exited.is_none() && started.elapsed() < TIMEOUT,
            "server A did not start ({exited:?}): {}",
            read(&dir.join("server-a.err"))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, format!("http://127.0.0.1:{port}"), log)
}

fn read(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    text
}

/// Whether the server at `url` holds the rollout driver's lease, from its /metrics.
async fn drives_rollouts(url: &str) -> Option<bool> {
    let text = reqwest::Client::new()
        .get(format!("{url}/metrics"))
        .bearer_auth("op")
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let line = text.lines().find(|l| l.starts_with("fleet_lease_held{lease=\"rollout-driver\"}"))?;
    Some(line.rsplit(' ').next()? == "1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_serve_one_fleet_and_the_survivor_completes_a_killed_drivers_rollout() {
    let database = std::env::var("FLEET_TEST_DATABASE_URL").ok().filter(|u| !u.is_empty());
    let broker = std::env::var("FLEET_TEST_MQTT_URL").ok().filter(|u| !u.is_empty());
    let (Some(_), Some(mqtt_url)) = (database, broker) else {
        eprintln!("skipped: two servers share a PostgreSQL database and an external broker; set FLEET_TEST_DATABASE_URL and FLEET_TEST_MQTT_URL");
        return;
    };
    let mut server_a = None;
    // Server A starts first (from inside B's configuration), so it takes the lease; B is the
    // in-process server the agents enroll with.
    let fleet = Fleet::start_changed(4, Mqtt::External { url: mqtt_url }, &[], |config| {
        let dir = config.data_dir.parent().unwrap().to_path_buf();
        config.lease = LEASE;
        config.bundle_dir = Some(dir.join("shared-bundles"));
        config.mqtt_share_group = Some(SHARE_GROUP.into());
        server_a = Some(start_process_server(config, &dir));
    })
    .await;
    let (mut child, a_url, a_log) = server_a.unwrap();
    let a = FleetClient::new(&a_url, "op");
    let b = fleet.client.clone();
    let b_url = fleet.server.url();
    wait_for("server A to drive the rollouts", TIMEOUT, || async {
        (drives_rollouts(&a_url).await? && !drives_rollouts(&b_url).await?).then_some(())
    })
    .await
    .unwrap();

    // Both answer the API about the same fleet; a bundle published on B is served by A.
    assert_eq!(a.devices().await.unwrap().len(), 4, "server A lists the devices enrolled through B");
    fleet.publish(fixture_bundle(&fleet.secret, "1.0.0", MLP).unwrap()).await;
    let v2 = bundle_with_golden(&fleet.secret, "2.0.0", MLP_V2, MLP_V2_GOLDEN).unwrap();
    a.publish(v2.clone()).await.unwrap();
    let served = reqwest::Client::new()
        .get(format!("{b_url}/api/v1/bundles/tabular/2.0.0"))
        .bearer_auth("op")
        .send()
        .await
        .unwrap();
    assert!(served.status().is_success(), "B serves the bundle published on A: {}", served.status());
    assert_eq!(served.bytes().await.unwrap().as_ref(), v2.as_slice());
    fleet.deploy_all("tabular", "1.0.0").await;
    fleet.wait_active("tabular", "1.0.0").await;
    // Reports reached the store through both servers' shares of the subscription: every
    // device's status is known to both.
    for client in [&a, &b] {
        let devices = client.devices().await.unwrap();
        assert!(devices.iter().all(|d| d.models.iter().any(|m| m.active_version.as_deref() == Some("1.0.0"))));
    }

    // An operator starts the rollout on B; A drives it through wave 1 into its soak.
    let id = b.start_rollout(&two_waves_soaking_an_hour()).await.unwrap().rollout.id;
    let soaking = wait_for("wave 1 to pass and soak (driven by A)", TIMEOUT, || async {
        let view = b.rollout(&id).await.ok()?;
        view.rollout.soak_until_ms.is_some().then_some(view)
    })
    .await
    .unwrap();
    assert_eq!((soaking.rollout.wave, soaking.summary.active), (0, 2));
    assert!(drives_rollouts(&a_url).await.unwrap(), "A drove wave 1");

    // Kill A (no clean stop, so it never gives the lease up); B takes over when it expires.
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    wait_for("server B to take the lease over", TIMEOUT, || async { drives_rollouts(&b_url).await?.then_some(()) })
        .await
        .unwrap();
    let takeover = killed.elapsed();
    eprintln!(
        "server B drives the rollouts {:.1} s after server A was killed (lease {} s)",
        takeover.as_secs_f64(),
        LEASE.as_secs()
    );
    // Within one lease period, plus the ticks and scrapes around it on a busy machine.
    assert!(takeover < LEASE + Duration::from_secs(10), "takeover took {takeover:?}");

    b.rollout_action(&id, OperatorAction::Promote).await.unwrap();
    wait_for("wave 2 to pass and soak (driven by B)", TIMEOUT, || async {
        let view = b.rollout(&id).await.ok()?;
        (view.rollout.wave == 1 && view.rollout.soak_until_ms.is_some()).then_some(())
    })
    .await
    .unwrap();
    b.rollout_action(&id, OperatorAction::Promote).await.unwrap();
    let done = wait_for("the rollout to complete", TIMEOUT, || async {
        let view = b.rollout(&id).await.ok()?;
        (view.rollout.phase == Phase::Completed).then_some(view)
    })
    .await
    .unwrap();
    assert_eq!(done.summary.active, 4);
    fleet.wait_active("tabular", "2.0.0").await;
    let audit = b.audit(Some(&id)).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions.first(), Some(&"created"));
    assert_eq!(actions.last(), Some(&"completed"), "{actions:?}");
    let a_log = read(&a_log);
    assert!(a_log.contains("this server holds the lease now"), "A's log: {a_log}");
    fleet.shutdown().await;
}
