//! `fleetctl demo --scenario good|bad-model`: a staged rollout on a live fleet. Every agent runs
//! 1.0.0 and serves steady traffic; a candidate 2.0.0 rolls out in waves with a holdout control
//! group. `good` (a healthy retrained model) completes; `bad-model` (confidence collapsed) breaches
//! the confidence gate in its first wave and is rolled back automatically.

use std::sync::Arc;
use std::time::Duration;

use edge_agent::AgentHandle;
use proto::rollout::{HealthGates, OnBreach, RolloutPlan, WaveSpec};
use proto::wire::DeviceView;
use serde::Serialize;

use crate::client::FleetClient;
use crate::demo::{bundle_with_golden, send_rows, synthetic_rows, wait_for, DemoError};
use fleet_server::api::rollouts::RolloutView;
use fleet_server::rollout::Phase;

const MLP_V2: &[u8] = include_bytes!("../../tests/fixtures/models/mlp_v2.onnx");
const MLP_V2_GOLDEN: &str = include_str!("../../tests/fixtures/models/mlp_v2.golden.json");
const MLP_FLAT: &[u8] = include_bytes!("../../tests/fixtures/models/mlp_flat.onnx");
const MLP_FLAT_GOLDEN: &str = include_str!("../../tests/fixtures/models/mlp_flat.golden.json");

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// A healthy candidate: completes every wave.
    Good,
    /// A candidate whose confidence collapses: halted in wave 1 and rolled back.
    BadModel,
    /// One site loses the server and the broker, the server restarts, the site returns and
    /// syncs: nothing lost, nothing stored twice.
    Offline,
    /// The degraded candidate again, but wave 1 runs it in shadow first: it disagrees with the
    /// active version there and is stopped before any device serves it.
    Shadow,
    /// One site's inputs shift and stay shifted: the server sends one retraining event for that
    /// site and one for the fleet to a webhook, none for the other sites.
    Retrain,
}

#[derive(Serialize, Debug, Clone)]
pub struct RolloutOutcome {
    pub id: String,
    pub state: String,
    pub reason: Option<String>,
    pub waves_started: usize,
    pub waves: usize,
    pub holdout_devices: usize,
}

pub fn plan(scenario: Scenario, version: &str) -> RolloutPlan {
    let mut plan = RolloutPlan {
        model: "tabular".into(),
        version: version.into(),
        selector: Default::default(),
        holdout: 0.2,
        waves: [20.0, 60.0, 100.0].iter().map(|p| WaveSpec { percent: Some(*p), count: None, shadow: false }).collect(),
        soak_secs: 3.0,
        min_executed: 2,
        success_threshold: 0.9,
        failure_threshold: 0.1,
        max_concurrent: 25,
        device_timeout_secs: 60.0,
        on_breach: OnBreach::Rollback,
        // In the demo every "device" shares this machine's cores, so latency measures the machine
        // (and the other agents installing at that moment), not the model: loosen that one gate.
        gates: HealthGates {
            min_samples: 150,
            max_latency_p95_ratio: 10.0,
            min_shadow_samples: 100,
            ..HealthGates::default()
        },
        shadow_sample_rate: 0.25,
        max_concurrent_per: None,
        activation_window: None,
    };
    if scenario == Scenario::Shadow {
        plan.waves[0].shadow = true;
    }
    plan
}

pub fn candidate(scenario: Scenario, secret: &str, version: &str) -> Result<Vec<u8>, DemoError> {
    match scenario {
        Scenario::Good => bundle_with_golden(secret, version, MLP_V2, MLP_V2_GOLDEN),
        Scenario::BadModel | Scenario::Shadow => bundle_with_golden(secret, version, MLP_FLAT, MLP_FLAT_GOLDEN),
        Scenario::Offline | Scenario::Retrain => Err(DemoError::Setup("this scenario rolls out no candidate".into())),
    }
}

/// Sends `rows` N(0,1) rows to every agent every `every` until the returned sender is dropped.
pub fn steady_traffic(agents: Arc<Vec<AgentHandle>>, rows: usize, every: Duration) -> tokio::sync::oneshot::Sender<()> {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let http = edge_agent::http::client();
        let mut tick = tokio::time::interval(every);
        let mut round = 0u64;
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = tick.tick() => {}
            }
            round += 1;
            let sends = agents.iter().enumerate().map(|(i, agent)| {
                let rows = synthetic_rows(round * 100_003 + i as u64, rows, 0.0);
                let http = http.clone();
                async move { send_rows(&http, agent, &rows).await }
            });
            let _ = futures_util::future::join_all(sends).await;
        }
    });
    stop
}

/// One line of rollout progress, as the demo and `fleetctl rollout --watch` print it.
pub fn line(view: &RolloutView) -> String {
    let s = &view.summary;
    let r = &view.rollout;
    let waiting = r.waiting_for.as_ref().map(|w| format!("; waiting for {w}")).unwrap_or_default();
    let staged = match &r.plan.activation_window {
        Some(window) if s.staged > 0 => format!(" staged {} (window {window})", s.staged),
        _ => String::new(),
    };
    format!(
        "rollout {} {} ({} {}): wave {}/{} (target {} of {} eligible, {} holdout): active {} installing {}{staged} failed {} reverted {}{waiting}",
        r.id,
        r.phase.as_str(),
        r.plan.model,
        r.plan.version,
        r.wave + 1,
        r.plan.waves.len(),
        s.wave_target,
        s.eligible,
        s.holdout,
        s.active,
        s.assigned,
        s.failed,
        s.reverted
    )
}

/// What `fleetctl rollout status --watch` draws in a terminal: the rollout's devices active of
/// those eligible, and the current wave's devices finished of its target.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutProgress {
    pub active: u64,
    pub eligible: u64,
    pub overall: String,
    pub wave_label: String,
    pub wave_done: u64,
    pub wave_target: u64,
    pub wave_state: String,
}

pub fn progress(view: &RolloutView) -> RolloutProgress {
    let (r, s) = (&view.rollout, &view.summary);
    let wave_done = r.members.values().filter(|m| !m.holdout && m.status.executed()).count().min(s.wave_target);
    let wave_state = if let Some(waiting) = &r.waiting_for {
        format!("waiting for {waiting}")
    } else if r.soak_until_ms.is_some() {
        "soaking".to_string()
    } else if !r.phase.is_active() {
        r.reason.clone().unwrap_or_else(|| r.phase.as_str().to_string())
    } else if s.staged > 0 {
        format!("{} installing, {} staged for their activation window", s.assigned, s.staged)
    } else {
        format!("{} installing", s.assigned)
    };
    RolloutProgress {
        active: s.active as u64,
        eligible: s.eligible as u64,
        overall: format!(
            "{} {} {}: {} failed, {} reverted, {} holdout",
            r.phase.as_str(),
            r.plan.model,
            r.plan.version,
            s.failed,
            s.reverted,
            s.holdout
        ),
        wave_label: format!("wave {}/{}", r.wave + 1, r.plan.waves.len()),
        wave_done: wave_done as u64,
        wave_target: s.wave_target as u64,
        wave_state,
    }
}

/// Runs the rollout to a terminal state, printing a line whenever progress changes.
pub async fn drive(
    client: &FleetClient,
    plan: &RolloutPlan,
    timeout: Duration,
    progress: &impl Fn(&str),
) -> Result<RolloutView, DemoError> {
    let started = client.start_rollout(plan).await?;
    follow(client, &started.rollout.id, Some(timeout), |view| progress(&line(view))).await
}

/// Polls a rollout until it ends (or `timeout` passes), calling `on_change` with the first view
/// and with every view whose progress line differs from the previous one. The one watch loop of
/// the demo and `fleetctl rollout --watch`.
pub async fn follow(
    client: &FleetClient,
    id: &str,
    timeout: Option<Duration>,
    mut on_change: impl FnMut(&RolloutView),
) -> Result<RolloutView, DemoError> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut last = String::new();
    loop {
        let view = client.rollout(id).await?;
        let text = line(&view);
        if text != last {
            on_change(&view);
            last = text;
        }
        if !view.rollout.phase.is_active() {
            return Ok(view);
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            let secs = timeout.map_or(0, |t| t.as_secs());
            let what = format!("the rollout to finish ({})", stalled_at(&view));
            return Err(DemoError::Timeout { what, secs });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Where a rollout that did not finish stands: its progress line and what its model gates read
/// (how many samples each group has), so that a timeout says which side stalled.
fn stalled_at(view: &RolloutView) -> String {
    let gates = view.live.as_ref().map_or_else(String::new, |live| {
        format!(
            "; gates read candidate {} samples from {} devices, control {} samples from {} devices",
            live.candidate.samples, live.candidate.devices, live.control.samples, live.control.devices
        )
    });
    format!("{}{gates}", line(view))
}

/// Waits until devices run what the finished rollout left them on. A timeout names the devices
/// that did not get there, with what they run and their last update step.
pub async fn settle(client: &FleetClient, view: &RolloutView, timeout: Duration) -> Result<Vec<DeviceView>, DemoError> {
    let r = &view.rollout;
    let unsettled = std::sync::Mutex::new(String::new());
    let settled = wait_for("devices to settle on their final versions", timeout, || {
        let unsettled = &unsettled;
        async move {
            let devices = client.devices().await.ok()?;
            let mut stragglers = Vec::new();
            for d in &devices {
                let Some(member) = r.members.get(&d.id) else { continue };
                let want = match member.status {
                    fleet_server::rollout::MemberStatus::Active => Some(r.plan.version.clone()),
                    _ => member.previous_version.clone(),
                };
                let view = d.models.iter().find(|m| m.name == r.plan.model);
                let active = view.and_then(|m| m.active_version.clone());
                if active != want {
                    let step = view.and_then(|m| m.step).map_or("-", |s| s.as_str());
                    let detail = view.map_or("", |m| m.detail.as_str());
                    stragglers.push(format!("{} runs {active:?}, wants {want:?} (step {step} {detail})", d.id));
                }
            }
            *unsettled.lock().unwrap_or_else(|p| p.into_inner()) =
                stragglers.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
            stragglers.is_empty().then_some(devices)
        }
    })
    .await;
    let unsettled = unsettled.into_inner().unwrap_or_else(|p| p.into_inner());
    settled.map_err(|e| match e {
        DemoError::Timeout { what, secs } => DemoError::Timeout { what: format!("{what} ({unsettled})"), secs },
        other => other,
    })
}

pub fn outcome(view: &RolloutView) -> RolloutOutcome {
    let r = &view.rollout;
    RolloutOutcome {
        id: r.id.clone(),
        state: r.phase.as_str().to_string(),
        reason: r.reason.clone(),
        waves_started: r.wave + 1,
        waves: r.plan.waves.len(),
        holdout_devices: view.summary.holdout,
    }
}

/// The scenario's verdict: what `--scenario` promises.
pub fn verdict(scenario: Scenario, view: &RolloutView, devices: &[DeviceView]) -> bool {
    let r = &view.rollout;
    let version_of =
        |d: &DeviceView| d.models.iter().find(|m| m.name == r.plan.model).and_then(|m| m.active_version.clone());
    let holdout_untouched = devices
        .iter()
        .filter(|d| r.members.get(&d.id).is_some_and(|m| m.holdout))
        .all(|d| version_of(d).as_deref() != Some(r.plan.version.as_str()));
    let candidate_count = devices.iter().filter(|d| version_of(d).as_deref() == Some(r.plan.version.as_str())).count();
    match scenario {
        Scenario::Good => r.phase == Phase::Completed && holdout_untouched && candidate_count == view.summary.eligible,
        Scenario::BadModel => {
            matches!(r.phase, Phase::RolledBack | Phase::Halted)
                && r.wave == 0
                && holdout_untouched
                && candidate_count == 0
        }
        Scenario::Shadow => {
            let in_shadow = r.evidence.as_ref().is_some_and(|e| {
                e.breaches.iter().any(|b| matches!(b, fleet_server::rollout::gates::GateBreach::ShadowAgreement { .. }))
            });
            matches!(r.phase, Phase::RolledBack | Phase::Halted)
                && r.wave == 0
                && in_shadow
                && holdout_untouched
                && candidate_count == 0
        }
        // Not rollouts: judged by `offline::verdict` and `retrain_demo::run`.
        Scenario::Offline | Scenario::Retrain => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_server::rollout::create::create;
    use fleet_server::rollout::{DeviceInfo, MemberStatus};

    #[test]
    fn progress_counts_the_waves_finished_devices_and_says_what_it_waits_for() {
        let plan = toml::from_str(
            "model = \"tabular\"\nversion = \"2.0.0\"\nholdout = 0.0\nwaves = [{percent = 50.0}, {percent = 100.0}]",
        )
        .unwrap();
        let devices: Vec<DeviceInfo> = (0..4)
            .map(|i| DeviceInfo { id: format!("d{i}"), active_version: Some("1.0.0".into()), ..Default::default() })
            .collect();
        let mut r = create("ro-1", plan, &devices, &Default::default(), 0).unwrap();
        let (first, second) = (r.order[0].clone(), r.order[1].clone());
        r.members.get_mut(&first).unwrap().status = MemberStatus::Active;
        r.members.get_mut(&second).unwrap().status = MemberStatus::Assigned;
        r.waiting_for = Some("200 samples on candidate and control".into());
        let p = progress(&RolloutView::from(r.clone()));
        assert_eq!((p.active, p.eligible, p.wave_done, p.wave_target), (1, 4, 1, 2));
        assert_eq!(p.wave_label, "wave 1/2");
        assert_eq!(p.wave_state, "waiting for 200 samples on candidate and control");
        assert!(p.overall.starts_with("running tabular 2.0.0: 0 failed"), "{}", p.overall);
        r.waiting_for = None;
        assert_eq!(progress(&RolloutView::from(r)).wave_state, "1 installing");
    }

    #[test]
    fn a_rollout_that_times_out_says_how_many_samples_each_group_had() {
        let plan = toml::from_str("model = \"tabular\"\nversion = \"2.0.0\"\nwaves = [{percent = 100.0}]").unwrap();
        let devices = [DeviceInfo { id: "d0".into(), active_version: Some("1.0.0".into()), ..Default::default() }];
        let mut view = RolloutView::from(create("ro-1", plan, &devices, &Default::default(), 0).unwrap());
        assert_eq!(stalled_at(&view), line(&view), "no readings, no claim about them");
        let group =
            |devices, samples| fleet_server::rollout::state::GroupMetrics { devices, samples, ..Default::default() };
        view.live = Some(fleet_server::rollout::decide::LiveGates {
            candidate: group(32, 40),
            control: group(44, 1_203),
            judged: false,
            readings: Vec::new(),
        });
        let text = stalled_at(&view);
        assert!(text.starts_with(&line(&view)), "{text}");
        assert!(text.ends_with("candidate 40 samples from 32 devices, control 1203 samples from 44 devices"), "{text}");
    }
}
