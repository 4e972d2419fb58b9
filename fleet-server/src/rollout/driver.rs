//! The rollout driver: one task owns every rollout's read-decide-write cycle, so operator actions
//! and engine ticks never race. Each cycle persists the new state and its audit lines first, then
//! sets desired versions. On start it re-asserts what every rollout wants of each device, which
//! finishes whatever a crash interrupted between the two.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use proto::rollout::RolloutPlan;
use proto::wire::{AuditAction, AuditEntry};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cohort_default::{newcomer_versions, CohortDefault};
use super::create::{admit_late_joiners, busy_devices, create, operate, OperatorAction, RolloutError};
use super::decide::{decide_and_read, Decision, LiveGates};
use super::observe::WindowCache;
use super::state::{member_writes, DeviceInfo, Effect, MemberStatus, MemberWrites, Observations, Rollout};
use crate::drift::ModelDrift;
use crate::lease::Lease;
use crate::notify::Notifier;
use crate::store::{DesiredChange, ObservationRows, Store, StoreError};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Error)]
pub enum DriverError {
    #[error("no rollout {0}")]
    NotFound(String),
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the rollout driver has stopped")]
    Stopped,
}

enum Command {
    Create { plan: Box<RolloutPlan>, actor: String, reply: oneshot::Sender<Result<Rollout, DriverError>> },
    Operate { id: String, action: OperatorAction, actor: String, reply: oneshot::Sender<Result<Rollout, DriverError>> },
}

/// Cheap to clone; every clone talks to the one driver task.
#[derive(Clone)]
pub struct RolloutHandle {
    tx: mpsc::Sender<Command>,
    live: LiveBoard,
}

/// What each running rollout's gates read at the driver's last tick, from the windows it has
/// merged already: the API shows these instead of reading and merging every window since the
/// rollout began on every request (a dashboard polling a rollout an hour old over 10,000 devices
/// would decode 600,000 windows a poll). Only the server that drives has readings.
#[derive(Clone, Default)]
pub struct LiveBoard {
    readings: Arc<std::sync::Mutex<BTreeMap<String, LiveReading>>>,
    /// Readings older than this are not shown (the driver stopped or another server drives).
    max_age_ms: u64,
}

#[derive(Clone, Debug)]
struct LiveReading {
    read_ms: u64,
    /// The rollout's revision the readings were taken for.
    revision: u64,
    gates: LiveGates,
}

impl LiveBoard {
    fn new(tick: Duration) -> LiveBoard {
        LiveBoard { readings: Default::default(), max_age_ms: 2 * tick.as_millis() as u64 + 1_000 }
    }

    fn readings(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LiveReading>> {
        // Each entry is replaced whole: a panic while holding the lock cannot leave one torn.
        self.readings.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn put(&self, id: &str, revision: u64, read_ms: u64, gates: LiveGates) {
        self.readings().insert(id.to_string(), LiveReading { read_ms, revision, gates });
    }

    fn keep_only(&self, running: &BTreeSet<&String>) {
        self.readings().retain(|id, _| running.contains(id));
    }

    /// The readings of rollout `id` at `revision`, if the driver took them within its last two
    /// ticks at `now_ms`.
    pub fn get(&self, id: &str, revision: u64, now_ms: u64) -> Option<LiveGates> {
        let readings = self.readings();
        let reading = readings.get(id)?;
        let fresh = now_ms.saturating_sub(reading.read_ms) <= self.max_age_ms && reading.revision == revision;
        fresh.then(|| reading.gates.clone())
    }
}

impl RolloutHandle {
    pub async fn create(&self, plan: RolloutPlan, actor: String) -> Result<Rollout, DriverError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Create { plan: Box::new(plan), actor, reply }).await.map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    pub async fn operate(&self, id: String, action: OperatorAction, actor: String) -> Result<Rollout, DriverError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Operate { id, action, actor, reply }).await.map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    /// What the driver's last tick read of rollout `id`'s gates, if recent and for this revision.
    pub fn live_gates(&self, id: &str, revision: u64) -> Option<LiveGates> {
        self.live.get(id, revision, crate::unix_ms())
    }
}

/// A tick slower than this is logged with where its time went: a tick over 10,000 devices
/// should decide within a second (issue 14's target).
const SLOW_TICK: Duration = Duration::from_secs(1);

/// Where one tick's time went, for the log line of a slow one.
#[derive(Default)]
struct TickTimings {
    /// Reading rollouts, cohort defaults and devices.
    reading: Duration,
    /// Reading what is new of the drift windows and statuses, merging it and deciding.
    deciding: Duration,
    /// Saving decisions (states, audit lines, desired versions) and newcomers' defaults.
    saving: Duration,
}

/// `future`'s result, its time added to `spent`.
async fn timed<T>(spent: &mut Duration, future: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = future.await;
    *spent += started.elapsed();
    out
}

/// The lease under which one server of several sharing a store drives every rollout.
pub const LEASE: &str = "rollout-driver";

/// How many times an operator's action is read, decided and saved again when another server
/// saved the rollout in between.
const OPERATOR_ATTEMPTS: usize = 3;

/// Starts the driver as a task of `tasks`; it ends when `cancel` is cancelled. It ticks only
/// while it holds `lease` ([`LEASE`]); operator commands it carries out whoever holds it.
pub fn spawn(
    store: Arc<dyn Store>,
    notifier: Notifier,
    tick: Duration,
    lease: Lease,
    tick_seconds: Histogram,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> RolloutHandle {
    let (tx, rx) = mpsc::channel(64);
    let live = LiveBoard::new(tick);
    let driver = Driver {
        store,
        notifier,
        tick_seconds,
        windows: Default::default(),
        live: live.clone(),
        held: Default::default(),
    };
    tasks.spawn(driver.run(rx, tick, lease, cancel));
    RolloutHandle { tx, live }
}

struct Driver {
    store: Arc<dyn Store>,
    notifier: Notifier,
    /// How long each tick over every running rollout takes (`/metrics`).
    tick_seconds: Histogram,
    /// Each running rollout's drift windows merged so far, so a tick reads only what is new.
    /// Only this task uses it, and never across an await.
    windows: std::sync::Mutex<BTreeMap<String, WindowCache>>,
    /// Each running rollout's gate readings at the last tick, for the API.
    live: LiveBoard,
    /// The running and paused rollouts as this driver last saved or read them: a tick reads a
    /// state again only when its stored revision differs (another server or writer saved it),
    /// instead of reading and parsing every active rollout's whole state each tick (1.6 MB of
    /// JSON at 10,000 members). Only this task uses it, and never across an await.
    held: std::sync::Mutex<BTreeMap<String, Rollout>>,
}

/// Takes out of `held` the rollouts it has at the revision `stored` says (ids and revisions,
/// newest first), in that order; None where one must be read again (not held, or held at
/// another revision). `held` is left empty.
fn take_held_at_stored_revision(
    held: &mut BTreeMap<String, Rollout>,
    stored: &[(String, u64)],
) -> Vec<Option<Rollout>> {
    let taken = stored.iter().map(|(id, revision)| held.remove(id).filter(|r| r.revision == *revision)).collect();
    held.clear();
    taken
}

impl Driver {
    async fn run(self, mut rx: mpsc::Receiver<Command>, tick: Duration, mut lease: Lease, cancel: CancellationToken) {
        self.lead_if_free(&mut lease).await;
        let mut interval = Lease::turns(tick);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                command = rx.recv() => match command {
                    Some(Command::Create { plan, actor, reply }) => { let _ = reply.send(self.create(*plan, actor).await); }
                    Some(Command::Operate { id, action, actor, reply }) => { let _ = reply.send(self.operate(id, action, actor).await); }
                    None => break,
                },
                _ = interval.tick() => {
                    if !self.lead_if_free(&mut lease).await {
                        continue;
                    }
                    let started = std::time::Instant::now();
                    let mut spent = TickTimings::default();
                    match self.tick(&mut spent).await {
                        Ok(()) => {}
                        // Another server or an operator saved it meanwhile: read again next tick.
                        Err(DriverError::Store(StoreError::Stale(id))) => {
                            tracing::info!(rollout = %id, "rollout saved by another writer during this tick; it is read again next tick")
                        }
                        Err(e) => tracing::error!(error = %e, "rollout tick failed"),
                    }
                    let took = started.elapsed();
                    self.tick_seconds.observe(took.as_secs_f64());
                    if took > SLOW_TICK {
                        tracing::warn!(
                            took_ms = took.as_millis() as u64,
                            reading_ms = spent.reading.as_millis() as u64,
                            deciding_ms = spent.deciding.as_millis() as u64,
                            saving_ms = spent.saving.as_millis() as u64,
                            "a rollout tick took longer than {} ms",
                            SLOW_TICK.as_millis()
                        );
                    }
                }
            }
        }
        lease.release(&self.store).await;
    }

    /// Renews the driver's lease; on taking it (at start, or from a server that stopped), first
    /// re-asserts what every rollout wants of its devices. True while this server drives.
    async fn lead_if_free(&self, lease: &mut Lease) -> bool {
        let was_held = lease.is_held();
        if !lease.renew(&self.store).await {
            return false;
        }
        if !was_held {
            if let Err(e) = self.reassert_all().await {
                tracing::error!(error = %e, "re-asserting rollouts failed");
            }
        }
        true
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, DriverError> {
        Ok(crate::store::blocking(&self.store, f).await?)
    }

    async fn create(&self, plan: RolloutPlan, actor: String) -> Result<Rollout, DriverError> {
        plan.validate().map_err(RolloutError::from)?;
        let model = plan.model.clone();
        let (devices, existing) = self.blocking(move |s| Ok((s.device_infos(&model)?, s.active_rollouts()?))).await?;
        let busy = busy_devices(existing.iter(), &plan.model);
        let now = crate::unix_ms();
        let id = format!("ro-{}", hex::encode(rand::random::<[u8; 4]>()));
        let rollout = create(&id, plan, &devices, &busy, now)?;
        let detail = format!(
            "{} {} to {} devices ({} holdout) in {} waves",
            rollout.plan.model,
            rollout.plan.version,
            rollout.members.len(),
            rollout.members.values().filter(|m| m.holdout).count(),
            rollout.plan.waves.len()
        );
        let effects = vec![Effect::Audit { action: AuditAction::Created, detail }];
        self.commit(Decision { rollout, effects }, MemberWrites::All, &actor).await
    }

    /// Reads, decides and saves; read again when another server saved the rollout in between.
    async fn operate(&self, id: String, action: OperatorAction, actor: String) -> Result<Rollout, DriverError> {
        let mut attempt = 1;
        loop {
            let lookup = id.clone();
            let rollout = self.blocking(move |s| s.rollout(&lookup)).await?.ok_or(DriverError::NotFound(id.clone()))?;
            let decision = operate(&rollout, action, crate::unix_ms())?;
            let members = member_writes(&rollout, &decision.rollout);
            match self.commit(decision, members, &actor).await {
                Err(DriverError::Store(StoreError::Stale(_))) if attempt < OPERATOR_ATTEMPTS => attempt += 1,
                outcome => return outcome,
            }
        }
    }

    /// Per model with an active rollout or a cohort default: newcomers get their default, devices
    /// that came to match an active rollout join it, then each running rollout decides.
    async fn tick(&self, spent: &mut TickTimings) -> Result<(), DriverError> {
        let read = self.blocking(|s| Ok((s.active_rollout_revisions()?, s.cohort_defaults()?)));
        let (stored, defaults) = timed(&mut spent.reading, read).await?;
        let rollouts = timed(&mut spent.reading, self.active_rollouts(&stored)).await?;
        let mut models: BTreeSet<String> = defaults.iter().map(|d| d.model.clone()).collect();
        models.extend(rollouts.iter().map(|r| r.plan.model.clone()));
        for model in models {
            self.tick_model(&model, &rollouts, &defaults, spent).await?;
        }
        let running: BTreeSet<&String> =
            rollouts.iter().filter(|r| r.phase == super::Phase::Running).map(|r| &r.id).collect();
        self.caches().retain(|id, _| running.contains(id));
        self.live.keep_only(&running);
        Ok(())
    }

    /// The active rollouts `stored` names, newest first: those held at their stored revision
    /// from memory, the others read again (and held from now on).
    async fn active_rollouts(&self, stored: &[(String, u64)]) -> Result<Vec<Rollout>, DriverError> {
        let mut rollouts = take_held_at_stored_revision(&mut self.held(), stored);
        let stale: Vec<String> =
            stored.iter().zip(&rollouts).filter(|(_, held)| held.is_none()).map(|((id, _), _)| id.clone()).collect();
        if !stale.is_empty() {
            let mut read = self
                .blocking(move |s| stale.iter().map(|id| s.rollout(id)).collect::<Result<Vec<_>, _>>())
                .await?
                .into_iter();
            for slot in rollouts.iter_mut().filter(|held| held.is_none()) {
                // None when it was deleted between the two reads.
                *slot = read.next().flatten();
            }
        }
        let rollouts: Vec<Rollout> = rollouts.into_iter().flatten().collect();
        self.held().extend(rollouts.iter().filter(|r| r.phase.is_active()).map(|r| (r.id.clone(), r.clone())));
        Ok(rollouts)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Rollout>> {
        // Whole rollouts are inserted and removed: a panic while holding it cannot tear one.
        self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn caches(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, WindowCache>> {
        // A panic while holding it can only have left a cache half-merged: start afresh.
        self.windows.lock().unwrap_or_else(|poisoned| {
            let mut caches = poisoned.into_inner();
            caches.clear();
            caches
        })
    }

    async fn tick_model(
        &self,
        model: &str,
        rollouts: &[Rollout],
        defaults: &[CohortDefault],
        spent: &mut TickTimings,
    ) -> Result<(), DriverError> {
        let lookup = model.to_string();
        let mut devices = timed(&mut spent.reading, self.blocking(move |s| s.device_infos(&lookup))).await?;
        timed(&mut spent.saving, self.give_newcomers_their_default(model, &mut devices, defaults)).await?;
        let mut busy = busy_devices(rollouts.iter(), model);
        for rollout in rollouts.iter().filter(|r| r.plan.model == model) {
            let mut rollout = rollout.clone();
            if let Some(joined) = admit_late_joiners(&rollout, &devices, &busy) {
                let members = member_writes(&rollout, &joined.rollout);
                rollout = timed(&mut spent.saving, self.commit(joined, members, "engine")).await?;
                busy.extend(rollout.members.keys().map(|id| (id.clone(), rollout.id.clone())));
            }
            if rollout.phase != super::Phase::Running {
                continue;
            }
            let (id, model, since) = (rollout.id.clone(), rollout.plan.model.clone(), rollout.created_ms);
            let rollout_revision = rollout.revision;
            let cache = self.caches().remove(&id).unwrap_or_default();
            // Reading, decoding and merging are store calls, and deciding over thousands of
            // members is CPU work of tens of milliseconds: all of it off the async workers, which
            // serve check-ins meanwhile (a decision on a worker held them up to the tick's length).
            let observe_and_decide = self.blocking(move |s| {
                let (observations, mut cache) = observe_new(s, &model, since, cache)?;
                let now = crate::unix_ms();
                // The gates as the decision read them (members that became active count).
                let (decision, gates) = decide_and_read(&rollout, &observations, now);
                let live = gates.map(|gates| (now, gates));
                cache.restore(observations);
                let changed = decision.rollout != rollout || !decision.effects.is_empty();
                let save = changed.then(|| {
                    let members = member_writes(&rollout, &decision.rollout);
                    (decision, members)
                });
                Ok((save, cache, live))
            });
            let (decision, cache, live) = timed(&mut spent.deciding, observe_and_decide).await?;
            self.caches().insert(id.clone(), cache);
            let saved = match decision {
                Some((decision, members)) => {
                    timed(&mut spent.saving, self.commit(decision, members, "engine")).await?.revision
                }
                None => rollout_revision,
            };
            if let Some((read_ms, gates)) = live {
                self.live.put(&id, saved, read_ms, gates);
            }
        }
        Ok(())
    }

    /// Devices never told to run a version of `model` that match one of its cohort defaults are
    /// told to run the newest such default's version (one audit line per default).
    async fn give_newcomers_their_default(
        &self,
        model: &str,
        devices: &mut [DeviceInfo],
        defaults: &[CohortDefault],
    ) -> Result<(), DriverError> {
        let newcomers = newcomer_versions(model, devices, defaults);
        if newcomers.is_empty() {
            return Ok(());
        }
        let now = crate::unix_ms();
        let mut by_source: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for (device, version, source) in &newcomers {
            by_source.entry((source.clone(), version.clone())).or_default().push(device.clone());
        }
        let audit: Vec<AuditEntry> = by_source
            .into_iter()
            .map(|((source, version), ids)| AuditEntry {
                at_ms: now,
                actor: "engine".into(),
                rollout: source.starts_with("ro-").then(|| source.clone()),
                action: AuditAction::CohortDefault,
                detail: format!(
                    "{} newcomer(s) run {model} {version}, the default of {source}: {}",
                    ids.len(),
                    ids.join(", ")
                ),
            })
            .collect();
        let pairs: Vec<(String, String)> = newcomers.iter().map(|(d, v, _)| (d.clone(), v.clone())).collect();
        let model_name = model.to_string();
        let revisions = self.blocking(move |s| s.apply_cohort_defaults(&model_name, &pairs, &audit)).await?;
        self.notify(revisions);
        for device in devices.iter_mut() {
            if let Some((_, version, _)) = newcomers.iter().find(|(id, _, _)| *id == device.id) {
                device.desired_version = Some(version.clone());
            }
        }
        Ok(())
    }

    /// Persist first (state, audit and desired versions in one transaction), then notify devices.
    /// `members` names those the decision changed (the store writes only those).
    async fn commit(&self, decision: Decision, members: MemberWrites, actor: &str) -> Result<Rollout, DriverError> {
        let now = crate::unix_ms();
        let Decision { rollout, effects } = decision;
        let mut audit = Vec::new();
        let mut desired = Vec::new();
        for effect in effects {
            match effect {
                Effect::Audit { action, detail } => audit.push(AuditEntry {
                    at_ms: now,
                    actor: actor.to_string(),
                    rollout: Some(rollout.id.clone()),
                    action,
                    detail,
                }),
                Effect::SetDesired { device, version, attempt, shadow } => {
                    // Only the candidate's activation waits for the window; a revert acts at once.
                    let window = (version == rollout.plan.version && shadow.is_none())
                        .then(|| rollout.plan.activation_window.clone())
                        .flatten();
                    let shadow = shadow.map(|v| (v, rollout.plan.shadow_sample_rate as f32));
                    desired.push(DesiredChange { device, version, attempt, shadow, window })
                }
            }
        }
        let (revisions, rollout) = self
            .blocking(move |s| {
                let revisions = s.save_rollout(&rollout, &members, &audit, &desired)?;
                Ok((revisions, rollout))
            })
            .await?;
        self.notify(revisions);
        let stored = Rollout { revision: rollout.revision + 1, ..rollout };
        if stored.phase.is_active() {
            self.held().insert(stored.id.clone(), stored.clone());
        } else {
            self.held().remove(&stored.id);
        }
        Ok(stored)
    }

    fn notify(&self, revisions: Vec<(String, u64)>) {
        self.notifier.desired_changed(revisions);
    }

    /// What each running or paused rollout wants of its devices, applied idempotently (an
    /// unchanged assertion changes no revision). A finished rollout is never re-asserted: its
    /// last desired writes (a rollback's reverts included) were committed with its state, and a
    /// later deployment to its devices must win.
    async fn reassert_all(&self) -> Result<(), DriverError> {
        let rollouts = self.blocking(|s| s.active_rollouts()).await?;
        for rollout in rollouts {
            let rate = rollout.plan.shadow_sample_rate as f32;
            let candidate = rollout.plan.version.clone();
            let wanted: Vec<DesiredChange> = rollout
                .members
                .iter()
                .filter_map(|(id, m)| match m.status {
                    MemberStatus::Assigned | MemberStatus::Staged | MemberStatus::Active => Some(DesiredChange {
                        device: id.clone(),
                        version: candidate.clone(),
                        attempt: m.attempt,
                        shadow: None,
                        window: rollout.plan.activation_window.clone(),
                    }),
                    MemberStatus::ShadowAssigned | MemberStatus::Shadowing => Some(DesiredChange {
                        device: id.clone(),
                        version: m.previous_version.clone()?,
                        attempt: m.attempt,
                        shadow: Some((candidate.clone(), rate)),
                        window: None,
                    }),
                    _ => None,
                })
                .collect();
            let revisions =
                self.blocking(move |s| s.save_rollout(&rollout, &MemberWrites::Only(Vec::new()), &[], &wanted)).await?;
            self.notify(revisions);
        }
        Ok(())
    }
}

/// The store's rows for a model and the drift reference of every version they mention, read
/// from the published bundles' manifests.
pub(crate) fn observation_inputs(
    store: &dyn Store,
    model: &str,
    since_ms: u64,
) -> Result<(ObservationRows, BTreeMap<String, ModelDrift>), StoreError> {
    let rows = store.observation_rows(model, since_ms, 0)?;
    let references = crate::drift::references(store, model, rows.windows.iter().map(|w| &w.version))?;
    Ok((rows, references))
}

/// A running rollout's observations: the statuses as they are now, and its windows from `cache`
/// plus those stored since the cache's last read. Returns the cache with them merged.
fn observe_new(
    store: &dyn Store,
    model: &str,
    since_ms: u64,
    mut cache: WindowCache,
) -> Result<(Observations, WindowCache), StoreError> {
    let rows = store.observation_rows(model, since_ms, cache.read_from())?;
    cache.absorb(&rows.windows);
    let versions = cache.merged().versions();
    let references = crate::drift::references(store, model, versions.iter())?;
    let observations = cache.lend(&rows.statuses, &references);
    Ok((observations, cache))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::DeviceInfo;
    use crate::rollout::Phase;
    use crate::store::{NewDevice, SqliteStore};

    fn plan() -> RolloutPlan {
        toml::from_str("model = \"tabular\"\nversion = \"2.0.0\"\nholdout = 0.0\nwaves = [{percent = 100.0}]").unwrap()
    }

    /// Enrolls device d1, which runs 1.0.0.
    fn enrolled_d1(store: &dyn Store) -> DeviceInfo {
        let new = NewDevice {
            id: "d1".into(),
            name: "d1".into(),
            labels: Default::default(),
            credential_hash: "h".into(),
            enrolled_ms: 1,
            public_key: String::new(),
            broker_hash: String::new(),
        };
        store.insert_device(&new).unwrap();
        DeviceInfo { id: "d1".into(), active_version: Some("1.0.0".into()), ..Default::default() }
    }

    /// A driver on `store` that ticks once at start, then hourly; cancel the token to stop it.
    fn started(store: &Arc<dyn Store>) -> (RolloutHandle, CancellationToken) {
        ticking(store, Duration::from_secs(3600))
    }

    /// A driver on `store` that ticks every `tick`; cancel the token to stop it.
    fn ticking(store: &Arc<dyn Store>, tick: Duration) -> (RolloutHandle, CancellationToken) {
        let cancel = CancellationToken::new();
        let handle = spawn(
            store.clone(),
            Notifier::detached(),
            tick,
            Lease::new(LEASE, "test".into(), Duration::from_secs(60), Default::default()),
            crate::api::metrics::ApiMetrics::default().rollout_tick,
            cancel.clone(),
            &TaskTracker::new(),
        );
        (handle, cancel)
    }

    fn held(id: &str, revision: u64) -> (String, Rollout) {
        let mut rollout =
            create(id, plan(), &[DeviceInfo { id: "d1".into(), ..Default::default() }], &Default::default(), 1)
                .unwrap();
        rollout.revision = revision;
        (id.to_string(), rollout)
    }

    #[test]
    fn a_held_rollout_is_used_only_at_its_stored_revision_and_what_is_no_longer_active_is_let_go() {
        let mut held: BTreeMap<String, Rollout> = [held("ro-a", 3), held("ro-b", 5), held("ro-gone", 1)].into();
        let stored = [("ro-new".to_string(), 1), ("ro-b".to_string(), 6), ("ro-a".to_string(), 3)];
        let taken = take_held_at_stored_revision(&mut held, &stored);
        let ids: Vec<Option<(&str, u64)>> =
            taken.iter().map(|r| r.as_ref().map(|r| (r.id.as_str(), r.revision))).collect();
        assert_eq!(ids, vec![None, None, Some(("ro-a", 3))], "new and saved elsewhere are read again, in stored order");
        assert!(held.is_empty());
    }

    #[tokio::test]
    async fn a_paused_rollout_resumed_by_another_writer_is_read_again_and_driven() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("fleet.db")).unwrap());
        let device = enrolled_d1(store.as_ref());
        let mut rollout = create("ro-1", plan(), &[device], &Default::default(), 1).unwrap();
        rollout.phase = Phase::Paused;
        store.save_rollout(&rollout, &MemberWrites::All, &[], &[]).unwrap();
        let (_handle, cancel) = ticking(&store, Duration::from_millis(20));
        let waiting = |store: &Arc<dyn Store>| store.rollout("ro-1").unwrap().unwrap().members["d1"].status.clone();
        // The driver holds it paused for a few ticks and leaves it be.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(waiting(&store), MemberStatus::Waiting);
        // Another server resumes it: the driver's next tick reads it again and starts its wave.
        let mut resumed = store.rollout("ro-1").unwrap().unwrap();
        resumed.phase = Phase::Running;
        store.save_rollout(&resumed, &MemberWrites::All, &[], &[]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while waiting(&store) == MemberStatus::Waiting {
            assert!(std::time::Instant::now() < deadline, "the resumed rollout was never driven");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cancel.cancel();
    }

    /// Waits until the driver has handled a command, so its start-up work is done.
    async fn settled(handle: &RolloutHandle) {
        let unknown = handle.operate("ro-none".into(), OperatorAction::Pause, "test".into()).await;
        assert!(matches!(unknown, Err(DriverError::NotFound(_))));
    }

    #[tokio::test]
    async fn a_finished_rollout_does_not_put_back_a_version_deployed_after_it_on_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("fleet.db")).unwrap());
        let device = enrolled_d1(store.as_ref());
        let mut rollout = create("ro-old", plan(), &[device], &Default::default(), 1).unwrap();
        // It rolled back: d1 was put back on 1.0.0.
        let member = rollout.members.get_mut("d1").unwrap();
        member.wave = Some(0);
        member.status = MemberStatus::Reverted;
        rollout.phase = Phase::RolledBack;
        store
            .save_rollout(
                &rollout,
                &MemberWrites::All,
                &[],
                &[DesiredChange {
                    device: "d1".into(),
                    version: "1.0.0".into(),
                    attempt: 0,
                    shadow: None,
                    window: None,
                }],
            )
            .unwrap();
        // Later an operator deploys 3.0.0 to d1; then the server restarts.
        store.set_desired(&["d1".into()], "tabular", "3.0.0").unwrap();

        let (handle, cancel) = started(&store);
        settled(&handle).await;
        let desired = store.list_devices().unwrap()[0].models[0].desired_version.clone();
        assert_eq!(desired.as_deref(), Some("3.0.0"), "the finished rollout overrode a later deployment");
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_rollout_state_and_its_desired_versions_are_saved_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("fleet.db")).unwrap();
        let device = enrolled_d1(&store);
        let mut rollout = create("ro-1", plan(), &[device], &Default::default(), 1).unwrap();
        let revisions = store
            .save_rollout(
                &rollout,
                &MemberWrites::All,
                &[],
                &[DesiredChange {
                    device: "d1".into(),
                    version: "2.0.0".into(),
                    attempt: 0,
                    shadow: None,
                    window: None,
                }],
            )
            .unwrap();
        assert_eq!(revisions, vec![("d1".to_string(), 1)]);
        assert!(store.rollout("ro-1").unwrap().is_some());
        assert_eq!(store.list_devices().unwrap()[0].models[0].desired_version.as_deref(), Some("2.0.0"));
        rollout.revision += 1;
        let again = store
            .save_rollout(
                &rollout,
                &MemberWrites::All,
                &[],
                &[DesiredChange {
                    device: "d1".into(),
                    version: "2.0.0".into(),
                    attempt: 0,
                    shadow: None,
                    window: None,
                }],
            )
            .unwrap();
        assert!(again.is_empty(), "re-saving the same desired version changes no revision");
    }

    #[test]
    fn the_live_board_shows_a_reading_only_while_fresh_and_for_the_revision_it_was_taken_at() {
        let board = LiveBoard::new(Duration::from_secs(1));
        let gates = LiveGates {
            candidate: Default::default(),
            control: Default::default(),
            judged: false,
            readings: Vec::new(),
        };
        board.put("ro-1", 4, 10_000, gates.clone());
        assert_eq!(board.get("ro-1", 4, 13_000), Some(gates.clone()), "two ticks and a second old");
        assert_eq!(board.get("ro-1", 4, 13_001), None, "older than two ticks and a second");
        assert_eq!(board.get("ro-1", 5, 10_000), None, "saved since (an operator paused it, say)");
        assert_eq!(board.get("ro-2", 4, 10_000), None);
        let none_running = BTreeSet::new();
        board.keep_only(&none_running);
        assert_eq!(board.get("ro-1", 4, 10_000), None, "a rollout no longer running keeps no reading");
    }

    #[tokio::test]
    async fn each_tick_leaves_the_running_rollouts_gate_readings_for_the_api() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("fleet.db")).unwrap());
        let device = enrolled_d1(store.as_ref());
        let rollout = create("ro-live", plan(), &[device], &Default::default(), 1).unwrap();
        assert_eq!(rollout.phase, Phase::Running);
        store.save_rollout(&rollout, &MemberWrites::All, &[], &[]).unwrap();

        let (handle, cancel) = started(&store);
        // The first tick runs at once; it assigns d1 (a save) and reads the gates.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let (saved, live) = loop {
            let saved = store.rollout("ro-live").unwrap().unwrap();
            if let Some(live) = handle.live_gates("ro-live", saved.revision) {
                break (saved, live);
            }
            assert!(tokio::time::Instant::now() < deadline, "no readings after the first tick");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(saved.revision >= 2, "the tick saved the assignment: {}", saved.revision);
        assert_eq!((live.candidate.devices, live.candidate.samples, live.judged), (0, 0, false));
        assert_eq!(handle.live_gates("ro-live", saved.revision - 1), None, "the state before the tick's save");
        cancel.cancel();
    }
}
