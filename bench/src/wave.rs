//! A rollout wave's save on the store: the rollout's state, an audit line and the desired version
//! of half a 10,000-device cohort in one transaction (`Store::save_rollout`, as the driver
//! commits a wave), against the same save without desired writes (a tick that only records its
//! members' progress). Also the save that asserts those 5,000 desired versions again unchanged,
//! as a server that takes over the driver's lease does. And what a tick reads of it: its whole
//! state, as each tick did, against the active rollouts' revisions, as each tick does now that
//! the driver holds the state it saved. Same store, same rollout, same run.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Result};
use fleet_server::rollout::create::{create, Busy};
use fleet_server::rollout::{DeviceInfo, Rollout};
use fleet_server::store::{DesiredChange, Store};
use proto::rollout::RolloutPlan;
use proto::wire::{AuditAction, AuditEntry};

use crate::database::Database;

/// The cohort: every enrolled device.
const DEVICES: usize = 10_000;
/// The devices a wave tells to run the candidate: its first half.
const WAVE: usize = 5_000;
const REPEATS: usize = 3;

pub struct WaveFigures {
    pub store: &'static str,
    /// The rollout's stored state (JSON), bytes.
    pub state_bytes: usize,
    /// Best of REPEATS, milliseconds.
    pub plain_ms: f64,
    pub wave_ms: f64,
    pub unchanged_ms: f64,
    /// Reading the active rollouts' states (`Store::active_rollouts`), best of REPEATS.
    pub read_states_ms: f64,
    /// Reading the active rollouts' revisions (`Store::active_rollout_revisions`), best of REPEATS.
    pub read_revisions_ms: f64,
}

/// Saves `rollout` with `desired`; returns the time taken and how many devices' revisions rose.
fn save(store: &dyn Store, rollout: &mut Rollout, desired: &[DesiredChange]) -> Result<(f64, usize)> {
    let audit = AuditEntry {
        at_ms: fleet_server::unix_ms(),
        actor: "engine".into(),
        rollout: Some(rollout.id.clone()),
        action: AuditAction::WaveStarted,
        detail: format!("{} devices", desired.len()),
    };
    let started = Instant::now();
    let revised = store.save_rollout(rollout, &[audit], desired)?;
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
    let state_bytes = serde_json::to_string(&rollout)?.len();
    save(store.as_ref(), &mut rollout, &[])?;

    let (mut plain_ms, mut wave_ms, mut unchanged_ms) = (f64::MAX, f64::MAX, f64::MAX);
    for attempt in 1..=REPEATS as u32 {
        let desired: Vec<DesiredChange> = rollout.order[..WAVE]
            .iter()
            .map(|device| DesiredChange {
                device: device.clone(),
                version: "2.0.0".into(),
                attempt,
                shadow: None,
                window: None,
            })
            .collect();
        let (ms, revised) = save(store.as_ref(), &mut rollout, &[])?;
        ensure!(revised == 0, "a save without desired writes revised {revised} devices");
        plain_ms = plain_ms.min(ms);
        let (ms, revised) = save(store.as_ref(), &mut rollout, &desired)?;
        ensure!(revised == WAVE, "the wave revised {revised} devices, not {WAVE}");
        wave_ms = wave_ms.min(ms);
        let (ms, revised) = save(store.as_ref(), &mut rollout, &desired)?;
        ensure!(revised == 0, "asserting the wave again revised {revised} devices");
        unchanged_ms = unchanged_ms.min(ms);
    }
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
        "wave, {store_name}: plain save {plain_ms:.1} ms, wave of {WAVE} {wave_ms:.1} ms, unchanged {unchanged_ms:.1} ms; \
         reading the state {read_states_ms:.1} ms, the revisions {read_revisions_ms:.2} ms"
    );
    Ok(WaveFigures {
        store: store_name,
        state_bytes,
        plain_ms,
        wave_ms,
        unchanged_ms,
        read_states_ms,
        read_revisions_ms,
    })
}

pub fn section(figures: &[WaveFigures]) -> String {
    let mut text = format!(
        "## Rollout wave save\n\n\
         `target/release/fleet-bench wave [--database-url postgres://…] --write docs/BENCHMARKS.md`\n\
         (release build): a rollout over {DEVICES} enrolled devices, saved as the driver commits a\n\
         decision (`Store::save_rollout`: its state as JSON, one audit line and the desired versions,\n\
         one transaction). \"Without desired writes\" is the baseline, a tick that records progress\n\
         only; \"a wave\" also tells {WAVE} devices to run the candidate (each a new attempt, so each\n\
         device's desired row and revision change); \"unchanged\" asserts the same {WAVE} again, as a\n\
         server taking over the driver's lease does, and changes nothing. SQLite, and PostgreSQL\n\
         when a URL is given (a schema of its own, dropped after). Best of {REPEATS}.\n\n\
         A tick used to read every active rollout's whole state (`Store::active_rollouts`); the\n\
         driver now holds what it saved and reads only the active rollouts' revisions\n\
         (`Store::active_rollout_revisions`), and a state again only when its revision moved.\n\n\
         | store | rollout state | without desired writes | a wave of {WAVE} | ratio | unchanged | ratio | a tick reading the state | the revisions |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    );
    for f in figures {
        text.push_str(&format!(
            "| {} | {:.1} MB | {:.1} ms | {:.1} ms | {:.1}x | {:.1} ms | {:.1}x | {:.1} ms | {:.2} ms |\n",
            f.store,
            f.state_bytes as f64 / 1e6,
            f.plain_ms,
            f.wave_ms,
            f.wave_ms / f.plain_ms,
            f.unchanged_ms,
            f.unchanged_ms / f.plain_ms,
            f.read_states_ms,
            f.read_revisions_ms
        ));
    }
    text.push('\n');
    text
}
