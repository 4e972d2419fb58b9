//! A rollout's saves on the store (`Store::save_rollout`, as the driver commits a decision), over
//! a 10,000-device cohort: a tick that records the progress of 100 members (the rows of those
//! members only, as the driver saves it), against the same tick saving every member's row (as
//! the whole state was saved before members were rows); a wave that tells half the cohort to run
//! the candidate (their members and desired rows, one transaction); the save that asserts those
//! 5,000 desired versions again unchanged, as a server that takes over the driver's lease does.
//! And what a tick reads of it: its whole state, as each tick did, against the active rollouts'
//! revisions, as each tick does now that the driver holds the state it saved. Same store, same
//! rollout, same run.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Result};
use fleet_server::rollout::create::{create, Busy};
use fleet_server::rollout::state::member_writes;
use fleet_server::rollout::{DeviceInfo, MemberStatus, MemberWrites, Rollout};
use fleet_server::store::{DesiredChange, Store};
use proto::rollout::RolloutPlan;
use proto::wire::{AuditAction, AuditEntry};

use crate::database::Database;

/// The cohort: every enrolled device.
const DEVICES: usize = 10_000;
/// The devices a wave tells to run the candidate: its first half.
const WAVE: usize = 5_000;
const REPEATS: usize = 3;
/// The members a progress tick moves.
const PROGRESS: usize = 100;

pub struct WaveFigures {
    pub store: &'static str,
    /// The rollout's head (JSON, its row's state) and all its member rows (JSON), bytes.
    pub head_bytes: usize,
    pub member_bytes: usize,
    /// Best of REPEATS, milliseconds: a tick moving PROGRESS members saved as the driver does
    /// (those members' rows), and saved with every member's row.
    pub progress_ms: f64,
    pub progress_whole_ms: f64,
    pub wave_ms: f64,
    pub unchanged_ms: f64,
    /// Reading the active rollouts' states (`Store::active_rollouts`), best of REPEATS.
    pub read_states_ms: f64,
    /// Reading the active rollouts' revisions (`Store::active_rollout_revisions`), best of REPEATS.
    pub read_revisions_ms: f64,
}

/// Saves `rollout` (its `members`) with `desired`; returns the time taken and how many devices'
/// revisions rose.
fn save(
    store: &dyn Store,
    rollout: &mut Rollout,
    members: &MemberWrites,
    desired: &[DesiredChange],
) -> Result<(f64, usize)> {
    let audit = AuditEntry {
        at_ms: fleet_server::unix_ms(),
        actor: "engine".into(),
        rollout: Some(rollout.id.clone()),
        action: AuditAction::WaveStarted,
        detail: format!("{} devices", desired.len()),
    };
    let started = Instant::now();
    let revised = store.save_rollout(rollout, members, &[audit], desired)?;
    let elapsed = started.elapsed().as_secs_f64() * 1e3;
    rollout.revision += 1;
    Ok((elapsed, revised.len()))
}

/// Measures on SQLite in `dir`, or on PostgreSQL at `database_url` (a schema made and dropped
/// here). Blocks: call it off the async runtime.
pub fn run(dir: &Path, database_url: Option<&str>) -> Result<WaveFigures> {
    let (database, store) = Database::open(dir, database_url, "wave")?;
    crate::tick::enroll_devices(store.as_ref(), DEVICES)?;
    let devices: Vec<DeviceInfo> = (0..DEVICES)
        .map(|d| DeviceInfo { id: format!("d{d:04}"), active_version: Some("1.0.0".into()), ..Default::default() })
        .collect();
    let plan: RolloutPlan = toml::from_str(
        "model = \"tabular\"\nversion = \"2.0.0\"\nholdout = 0.0\nwaves = [{percent = 50.0}, {percent = 100.0}]",
    )?;
    let mut rollout = create("ro-bench", plan, &devices, &Busy::new(), fleet_server::unix_ms())?;
    let head_bytes = serde_json::to_string(&rollout.head())?.len();
    let member_bytes: usize = rollout
        .members
        .values()
        .map(serde_json::to_string)
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .map(String::len)
        .sum();
    save(store.as_ref(), &mut rollout, &MemberWrites::All, &[])?;

    let (mut progress_ms, mut progress_whole_ms) = (f64::MAX, f64::MAX);
    let (mut wave_ms, mut unchanged_ms) = (f64::MAX, f64::MAX);
    for attempt in 1..=REPEATS as u32 {
        // A tick: PROGRESS members of the previous wave report that they run the candidate.
        let before = rollout.clone();
        let moved: Vec<String> = rollout.order[(attempt as usize - 1) * PROGRESS..][..PROGRESS].to_vec();
        set_status(&mut rollout, &moved, MemberStatus::Active);
        let writes = member_writes(&before, &rollout);
        let mut expected = moved.clone();
        expected.sort();
        ensure!(writes == MemberWrites::Only(expected), "the tick writes {writes:?}");
        let (ms, revised) = save(store.as_ref(), &mut rollout, &writes, &[])?;
        ensure!(revised == 0, "a save without desired writes revised {revised} devices");
        progress_ms = progress_ms.min(ms);
        set_status(&mut rollout, &moved, MemberStatus::Staged);
        let (ms, _) = save(store.as_ref(), &mut rollout, &MemberWrites::All, &[])?;
        progress_whole_ms = progress_whole_ms.min(ms);

        // A wave: half the cohort is told to run the candidate, a new attempt each.
        let before = rollout.clone();
        let wave: Vec<String> = rollout.order[..WAVE].to_vec();
        set_status(&mut rollout, &wave, MemberStatus::Assigned);
        for id in &wave {
            rollout.members.get_mut(id).expect("a wave member").attempt = attempt;
        }
        let desired: Vec<DesiredChange> = wave
            .iter()
            .map(|device| DesiredChange {
                device: device.clone(),
                version: "2.0.0".into(),
                attempt,
                shadow: None,
                window: None,
            })
            .collect();
        let writes = member_writes(&before, &rollout);
        let (ms, revised) = save(store.as_ref(), &mut rollout, &writes, &desired)?;
        ensure!(revised == WAVE, "the wave revised {revised} devices, not {WAVE}");
        wave_ms = wave_ms.min(ms);
        let (ms, revised) = save(store.as_ref(), &mut rollout, &MemberWrites::Only(Vec::new()), &desired)?;
        ensure!(revised == 0, "asserting the wave again revised {revised} devices");
        unchanged_ms = unchanged_ms.min(ms);
    }
    let stored = store.rollout(&rollout.id)?.ok_or_else(|| anyhow::anyhow!("the rollout was not stored"))?;
    let differing = rollout.members.iter().find(|(id, m)| stored.members.get(*id) != Some(*m));
    ensure!(
        differing.is_none(),
        "member {differing:?} is stored as {:?}",
        differing.map(|(id, _)| stored.members.get(id))
    );
    ensure!(stored == rollout, "the stored rollout differs from the one saved");
    let (mut read_states_ms, mut read_revisions_ms) = (f64::MAX, f64::MAX);
    for _ in 0..REPEATS {
        let started = Instant::now();
        let states = store.active_rollouts()?;
        read_states_ms = read_states_ms.min(started.elapsed().as_secs_f64() * 1e3);
        ensure!(states.len() == 1 && states[0].members.len() == DEVICES, "read {} rollouts", states.len());
        let started = Instant::now();
        let revisions = store.active_rollout_revisions()?;
        read_revisions_ms = read_revisions_ms.min(started.elapsed().as_secs_f64() * 1e3);
        ensure!(revisions == [(rollout.id.clone(), rollout.revision)], "read revisions {revisions:?}");
    }
    let store_name = database.name();
    eprintln!(
        "wave, {store_name}: a tick moving {PROGRESS} members {progress_ms:.1} ms (every member's row \
         {progress_whole_ms:.1} ms), wave of {WAVE} {wave_ms:.1} ms, unchanged {unchanged_ms:.1} ms; \
         reading the state {read_states_ms:.1} ms, the revisions {read_revisions_ms:.2} ms"
    );
    Ok(WaveFigures {
        store: store_name,
        head_bytes,
        member_bytes,
        progress_ms,
        progress_whole_ms,
        wave_ms,
        unchanged_ms,
        read_states_ms,
        read_revisions_ms,
    })
}

fn set_status(rollout: &mut Rollout, ids: &[String], status: MemberStatus) {
    for id in ids {
        if let Some(member) = rollout.members.get_mut(id) {
            member.status = status.clone();
        }
    }
}

pub fn section(figures: &[WaveFigures]) -> String {
    let mut text = format!(
        "## Rollout wave save\n\n\
         `target/release/fleet-bench wave [--database-url postgres://…] --write docs/BENCHMARKS.md`\n\
         (release build): a rollout over {DEVICES} enrolled devices, saved as the driver commits a\n\
         decision (`Store::save_rollout`: its head as JSON in its row, the member rows that changed,\n\
         one audit line and the desired versions, one transaction). \"A tick\" records the progress\n\
         of {PROGRESS} members (their rows only); \"every member\" saves the same tick with all\n\
         {DEVICES} member rows, as a tick wrote the whole state before members were rows (the\n\
         baseline of the first ratio). \"A wave\" tells {WAVE} devices to run the candidate (each a new\n\
         attempt, so each member, desired row and revision changes); \"unchanged\" asserts the same\n\
         {WAVE} again, as a server taking over the driver's lease does, and changes nothing (their\n\
         ratios are to the tick). SQLite, and PostgreSQL when a URL is given (a schema of its own,\n\
         dropped after). Best of {REPEATS}.\n\n\
         A tick used to read every active rollout's whole state (`Store::active_rollouts`); the\n\
         driver now holds what it saved and reads only the active rollouts' revisions\n\
         (`Store::active_rollout_revisions`), and a state again only when its revision moved.\n\n\
         | store | head | members | a tick moving {PROGRESS} | every member | ratio | a wave of {WAVE} | ratio | unchanged | ratio | a tick reading the state | the revisions |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    );
    for f in figures {
        text.push_str(&format!(
            "| {} | {:.1} kB | {:.1} MB | {:.1} ms | {:.1} ms | {:.1}x | {:.1} ms | {:.1}x | {:.1} ms | {:.1}x | {:.1} ms | {:.2} ms |\n",
            f.store,
            f.head_bytes as f64 / 1e3,
            f.member_bytes as f64 / 1e6,
            f.progress_ms,
            f.progress_whole_ms,
            f.progress_whole_ms / f.progress_ms,
            f.wave_ms,
            f.wave_ms / f.progress_ms,
            f.unchanged_ms,
            f.unchanged_ms / f.progress_ms,
            f.read_states_ms,
            f.read_revisions_ms
        ));
    }
    text.push('\n');
    text
}
