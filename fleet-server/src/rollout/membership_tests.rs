//! Who a rollout reaches, and how fast: devices that join after it started, and the download
//! budget per site. Fixture fleets, pure functions.

use std::collections::BTreeMap;

use proto::rollout::RolloutPlan;
use proto::wire::{AuditAction, UpdateStep};

use super::create::{admit_late_joiners, busy_devices, create, operate, OperatorAction};
use super::state::{eligible_order, DeviceInfo, DeviceObservation, Effect, MemberStatus, Observations, Phase, Rollout};
use super::{decide, Decision};

const T0: u64 = 1_000_000;

fn plan(toml_text: &str) -> RolloutPlan {
    let base = "model = \"tabular\"\nversion = \"2.0.0\"\nsoak_secs = 0.0\ngates = { min_samples = 0 }\n";
    toml::from_str(&format!("{base}{toml_text}")).unwrap()
}

fn device(id: &str, site: &str, active: Option<&str>) -> DeviceInfo {
    DeviceInfo {
        id: id.into(),
        labels: [("site".to_string(), site.to_string())].into(),
        active_version: active.map(Into::into),
        ..Default::default()
    }
}

fn site_devices(prefix: &str, site: &str, n: usize) -> Vec<DeviceInfo> {
    (0..n).map(|i| device(&format!("{prefix}-{i:03}"), site, Some("1.0.0"))).collect()
}

fn assigned(r: &Rollout) -> Vec<String> {
    r.members.iter().filter(|(_, m)| m.status == MemberStatus::Assigned).map(|(id, _)| id.clone()).collect()
}

fn told_to_run(d: &Decision, version: &str) -> Vec<String> {
    d.effects
        .iter()
        .filter_map(|e| match e {
            Effect::SetDesired { device, version: v, .. } if v == version => Some(device.clone()),
            _ => None,
        })
        .collect()
}

fn active(version: &str) -> DeviceObservation {
    DeviceObservation {
        active_version: Some(version.into()),
        step: Some(UpdateStep::Active),
        step_version: Some(version.into()),
        ..Default::default()
    }
}

/// Ticks until the rollout stops running, finishing each tick's assignments before the next;
/// returns the most devices ever installing at once, per site.
fn run_to_the_end(mut r: Rollout) -> (Rollout, BTreeMap<String, usize>) {
    let mut observations = Observations::new();
    let mut most = BTreeMap::<String, usize>::new();
    for tick in 0..200 {
        r = decide(&r, &observations, T0 + tick).rollout;
        let mut per_site = BTreeMap::<String, usize>::new();
        for id in assigned(&r) {
            let site = r.members[&id].budget_group.clone().unwrap_or_default();
            *per_site.entry(site).or_default() += 1;
            observations.insert(id, active("2.0.0"));
        }
        for (site, n) in per_site {
            let m = most.entry(site).or_default();
            *m = (*m).max(n);
        }
        if r.phase != Phase::Running {
            break;
        }
    }
    (r, most)
}

#[test]
fn a_site_of_twenty_devices_downloads_two_at_a_time_and_all_twenty_finish() {
    let p = plan("holdout = 0.0\nwaves = [{percent = 100.0}]\nmax_concurrent_per = { label = \"site\", count = 2 }");
    let r = create("r1", p, &site_devices("a", "plant-a", 20), &Default::default(), T0).unwrap();
    let first = decide(&r, &Observations::new(), T0);
    assert_eq!(told_to_run(&first, "2.0.0").len(), 2, "the first tick starts two downloads, not twenty");
    let (r, most) = run_to_the_end(r);
    assert_eq!(most, BTreeMap::from([("plant-a".to_string(), 2)]));
    assert_eq!(r.phase, Phase::Completed);
    assert!(r.members.values().all(|m| m.status == MemberStatus::Active));
}

#[test]
fn each_site_has_its_own_budget_and_unlabelled_devices_only_the_global_one() {
    let p = plan(
        "holdout = 0.0\nwaves = [{percent = 100.0}]\nmax_concurrent = 7\nmax_concurrent_per = { label = \"site\", count = 2 }",
    );
    let mut fleet = site_devices("a", "plant-a", 10);
    fleet.extend(site_devices("b", "plant-b", 10));
    fleet.extend((0..10).map(|i| DeviceInfo {
        id: format!("z-{i:03}"),
        active_version: Some("1.0.0".into()),
        ..Default::default()
    }));
    let r = create("r1", p, &fleet, &Default::default(), T0).unwrap();
    let first = decide(&r, &Observations::new(), T0).rollout;
    let count = |prefix: &str| assigned(&first).iter().filter(|id| id.starts_with(prefix)).count();
    assert!(count("a-") <= 2 && count("b-") <= 2, "two per site at most");
    assert_eq!(assigned(&first).len(), 7, "the global budget still bounds the whole rollout");
    let (r, most) = run_to_the_end(r);
    assert_eq!((most["plant-a"], most["plant-b"]), (2, 2));
    assert_eq!(r.phase, Phase::Completed);
}

#[test]
fn a_device_enrolled_during_the_last_wave_joins_it_and_is_told_to_install() {
    let p = plan("holdout = 0.0\nwaves = [{percent = 50.0}, {percent = 100.0}]");
    let r = create("r1", p, &site_devices("a", "plant-a", 10), &Default::default(), T0).unwrap();
    let mut r = decide(&r, &Observations::new(), T0).rollout;
    r.wave = 1;
    let mut fleet = site_devices("a", "plant-a", 10);
    let mut newcomer = device("new-1", "plant-a", None);
    newcomer.desired_version = Some("1.0.0".into());
    fleet.push(newcomer);

    let joined = admit_late_joiners(&r, &fleet, &Default::default()).expect("the newcomer joins");
    let member = &joined.rollout.members["new-1"];
    assert!(member.late && !member.holdout);
    assert_eq!(member.previous_version.as_deref(), Some("1.0.0"), "its rollback target is what it was told to run");
    assert!(joined.effects.iter().any(
        |e| matches!(e, Effect::Audit { action: AuditAction::Joined, detail } if detail.starts_with("new-1 joined"))
    ));
    let buckets: Vec<f64> = joined.rollout.order.iter().map(|id| joined.rollout.members[id].bucket).collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "the wave order stays in bucket order");

    let next = decide(&joined.rollout, &Observations::new(), T0 + 1);
    assert!(told_to_run(&next, "2.0.0").contains(&"new-1".to_string()));
    assert!(admit_late_joiners(&joined.rollout, &fleet, &Default::default()).is_none(), "a member joins once");
}

#[test]
fn a_late_joiner_lands_in_the_holdout_or_the_wave_order_by_its_stable_bucket() {
    let p = plan("holdout = 0.5\nwaves = [{percent = 10.0}, {percent = 100.0}]");
    let r = create("r1", p, &site_devices("a", "plant-a", 4), &Default::default(), T0).unwrap();
    let mut fleet = site_devices("a", "plant-a", 4);
    fleet.extend(site_devices("late", "plant-a", 40));
    let joined = admit_late_joiners(&r, &fleet, &Default::default()).unwrap().rollout;
    let late: Vec<_> = joined.members.iter().filter(|(_, m)| m.late).collect();
    assert_eq!(late.len(), 40);
    for (id, m) in &late {
        assert_eq!(m.holdout, m.bucket < 0.5, "{id}");
        assert_eq!(joined.order.contains(id), !m.holdout, "{id}");
    }
    assert_eq!(joined.order, eligible_order(&joined.members), "the order held is the order read back");
    let holdouts = late.iter().filter(|(_, m)| m.holdout).count();
    assert!((8..=32).contains(&holdouts), "about half of 40 late devices fall in a 50% holdout, got {holdouts}");
    let again = create("r1", joined.plan.clone(), &fleet, &Default::default(), T0).unwrap();
    for (id, m) in &late {
        assert_eq!(again.members[*id].holdout, m.holdout, "{id}: joining late or at the start gives the same bucket");
    }
}

#[test]
fn devices_outside_the_selector_revoked_or_held_by_another_rollout_do_not_join() {
    let p = plan("holdout = 0.0\nselector = { site = \"plant-a\" }\nwaves = [{percent = 100.0}]");
    let r = create("r1", p.clone(), &site_devices("a", "plant-a", 3), &Default::default(), T0).unwrap();
    let other = create("r2", p, &[device("held", "plant-a", Some("1.0.0"))], &Default::default(), T0).unwrap();
    let mut revoked = device("revoked", "plant-a", Some("1.0.0"));
    revoked.revoked = true;
    let mut fleet = site_devices("a", "plant-a", 3);
    fleet.extend([device("elsewhere", "plant-b", None), revoked, device("held", "plant-a", Some("1.0.0"))]);
    let busy = busy_devices([&r, &other].into_iter(), "tabular");
    assert!(admit_late_joiners(&r, &fleet, &busy).is_none());
}

#[test]
fn a_paused_rollout_takes_joiners_and_a_finished_one_does_not() {
    let p = plan("holdout = 0.0\nwaves = [{percent = 100.0}]");
    let r = create("r1", p, &site_devices("a", "plant-a", 3), &Default::default(), T0).unwrap();
    let mut fleet = site_devices("a", "plant-a", 3);
    fleet.push(device("new-1", "plant-a", None));
    let paused = operate(&r, OperatorAction::Pause, T0).unwrap().rollout;
    assert!(admit_late_joiners(&paused, &fleet, &Default::default()).is_some());
    let aborted = operate(&r, OperatorAction::Abort, T0).unwrap().rollout;
    assert!(admit_late_joiners(&aborted, &fleet, &Default::default()).is_none());
}

fn staged(version: &str) -> DeviceObservation {
    DeviceObservation {
        active_version: Some("1.0.0".into()),
        step: Some(UpdateStep::Staged),
        step_version: Some(version.into()),
        detail: "verified; activates in the 02:00-04:00 window".into(),
        ..Default::default()
    }
}

#[test]
fn a_staged_device_outlives_the_device_timeout_frees_the_budget_and_the_wave_ends_when_it_activates() {
    let p = plan(
        "holdout = 0.0\nwaves = [{percent = 100.0}]\nmax_concurrent = 2\ndevice_timeout_secs = 60.0\n\
         activation_window = { start = \"02:00\", end = \"04:00\" }",
    );
    let r = create("r1", p, &site_devices("a", "plant-a", 4), &Default::default(), T0).unwrap();
    let first = decide(&r, &Observations::new(), T0).rollout;
    let waiting_for_window: Vec<String> = assigned(&first);
    assert_eq!(waiting_for_window.len(), 2);
    let mut observations: Observations = waiting_for_window.iter().map(|id| (id.clone(), staged("2.0.0"))).collect();

    // Staged: off the disruption budget, so the other two are told to download too.
    let second = decide(&first, &observations, T0 + 1_000).rollout;
    assert!(waiting_for_window.iter().all(|id| second.members[id].status == MemberStatus::Staged));
    assert_eq!(assigned(&second).len(), 2, "staged downloads are done: the budget goes to the next devices");
    for id in assigned(&second) {
        observations.insert(id, staged("2.0.0"));
    }
    // Hours pass, far beyond the device timeout: nobody fails, the wave waits.
    let hours_later = T0 + 5 * 3600 * 1000;
    let waiting = decide(&second, &observations, hours_later);
    assert_eq!(waiting.rollout.phase, Phase::Running);
    assert!(
        waiting.rollout.members.values().all(|m| m.status == MemberStatus::Staged),
        "{:?}",
        waiting.rollout.members
    );
    assert!(!waiting.effects.iter().any(|e| matches!(e, Effect::Audit { action: AuditAction::DeviceTimedOut, .. })));

    // The window opens: they activate and the rollout completes.
    let all: Observations = waiting.rollout.members.keys().map(|id| (id.clone(), active("2.0.0"))).collect();
    let mut r = waiting.rollout;
    for tick in 0..3 {
        r = decide(&r, &all, hours_later + tick).rollout;
    }
    assert_eq!(r.phase, Phase::Completed);
    assert!(r.members.values().all(|m| m.status == MemberStatus::Active));
}

#[test]
fn a_device_staged_for_more_than_a_day_and_the_device_timeout_times_out() {
    let p = plan(
        "holdout = 0.0\nwaves = [{percent = 100.0}]\ndevice_timeout_secs = 60.0\n\
         activation_window = { start = \"02:00\", end = \"04:00\" }",
    );
    let r = create("r1", p, &site_devices("a", "plant-a", 1), &Default::default(), T0).unwrap();
    let first = decide(&r, &Observations::new(), T0).rollout;
    let observations: Observations = assigned(&first).into_iter().map(|id| (id, staged("2.0.0"))).collect();
    let staged_at = T0 + 1_000;
    let r = decide(&first, &observations, staged_at).rollout;
    let within = decide(&r, &observations, staged_at + super::decide::STAGED_GRACE_MS + 60_000);
    assert!(within.rollout.members.values().all(|m| m.status == MemberStatus::Staged));
    let beyond = decide(&r, &observations, staged_at + super::decide::STAGED_GRACE_MS + 61_000);
    assert!(beyond.effects.iter().any(|e| matches!(e, Effect::Audit { action: AuditAction::DeviceTimedOut, .. })));
    // Its wave cannot succeed without it: the rollout ends, stating why.
    assert_eq!(beyond.rollout.phase, Phase::RolledBack);
    assert!(
        beyond.rollout.reason.as_deref().is_some_and(|r| r.contains("1 of 1 executed")),
        "{:?}",
        beyond.rollout.reason
    );
}

#[test]
fn a_staged_report_for_another_version_does_not_stage_the_member() {
    let p =
        plan("holdout = 0.0\nwaves = [{percent = 100.0}]\nactivation_window = { start = \"02:00\", end = \"04:00\" }");
    let r = create("r1", p, &site_devices("a", "plant-a", 1), &Default::default(), T0).unwrap();
    let first = decide(&r, &Observations::new(), T0).rollout;
    let observations: Observations = assigned(&first).into_iter().map(|id| (id, staged("3.0.0"))).collect();
    let r = decide(&first, &observations, T0 + 1_000).rollout;
    assert!(r.members.values().all(|m| m.status == MemberStatus::Assigned));
}

#[test]
fn a_rollback_puts_staged_devices_back_at_once() {
    let p =
        plan("holdout = 0.0\nwaves = [{percent = 100.0}]\nactivation_window = { start = \"02:00\", end = \"04:00\" }");
    let r = create("r1", p, &site_devices("a", "plant-a", 2), &Default::default(), T0).unwrap();
    let first = decide(&r, &Observations::new(), T0).rollout;
    let observations: Observations = assigned(&first).into_iter().map(|id| (id, staged("2.0.0"))).collect();
    let r = decide(&first, &observations, T0 + 1_000).rollout;
    let aborted = operate(&r, OperatorAction::Abort, T0 + 2_000).unwrap();
    assert_eq!(told_to_run(&aborted, "1.0.0").len(), 2, "{:?}", aborted.effects);
    assert!(aborted.rollout.members.values().all(|m| m.status == MemberStatus::Reverted));
}
