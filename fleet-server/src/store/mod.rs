//! Server storage behind a trait. The SQLite implementation (`sqlite.rs`) is the default, one file
//! in the data directory; the PostgreSQL implementation (`postgres.rs`) is chosen with
//! `--database-url postgres://…`. Methods are synchronous and short; callers on async tasks run
//! them on the blocking pool through [`blocking`] (the PostgreSQL client blocks on a runtime of
//! its own, which panics on a tokio worker).

mod pool;
mod postgres;
mod rollout_rows;
mod sqlite;

use proto::delivery::{DeliveryEvent, DeliveryView, TelemetryAck, TelemetryRow};
use proto::wire::{
    AuditEntry, DesiredState, DeviceModelView, DeviceView, DriftSummary, Heartbeat, UpdateStatus, UpdateStep,
};

pub use self::postgres::{without_password, PostgresStore};
use crate::drift::retrain::Watch;
use crate::rollout::{CohortDefault, DeviceInfo, MemberWrites, Phase, Rollout};
use proto::events::RetrainEvent;
pub use sqlite::SqliteStore;
use thiserror::Error;

/// The phase a `rollouts.phase` column names; another text is corruption.
pub(crate) fn phase_named(text: &str) -> Result<Phase, StoreError> {
    Phase::named(text)
        .ok_or_else(|| StoreError::Corrupt(format!("a rollout has phase {text:?}, which is no known phase")))
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The PostgreSQL error with its causes (its own text is only the kind, e.g. "db error").
    #[error("database: {}", self::postgres::with_causes(.0))]
    Postgres(#[from] ::postgres::Error),
    /// The database named by the server's configuration cannot be used (one sentence, no password).
    #[error("{0}")]
    Database(String),
    #[error("{0}")]
    Conflict(String),
    /// A rollout was saved by another writer since it was read (optimistic concurrency).
    #[error("rollout {0} was saved by another server since it was read")]
    Stale(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("store call did not complete: {0}")]
    Interrupted(String),
}

impl StoreError {
    /// A desired version written for a device that is not enrolled (the API checks first; this is
    /// the store's own guard, the same on every store).
    pub fn not_enrolled(device: &str) -> StoreError {
        StoreError::Conflict(format!("device {device:?} is not enrolled"))
    }
}

/// Runs a store call on tokio's blocking pool: every `Store` method is a synchronous database call.
pub async fn blocking<T: Send + 'static>(
    store: &std::sync::Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .unwrap_or_else(|e| Err(StoreError::Interrupted(e.to_string())))
}

/// A model's view in the device list before any row filled it in.
fn blank_model_view(name: &str) -> DeviceModelView {
    DeviceModelView {
        name: name.to_string(),
        desired_version: None,
        active_version: None,
        step: None,
        step_version: None,
        detail: String::new(),
        inferences: 0,
        drift_summaries: 0,
        drift_score: None,
        mean_confidence: None,
    }
}

/// Gives each device of the list the views of its models, keyed by (device, model).
fn attach_model_views(
    devices: &mut [DeviceView],
    models: &std::collections::BTreeMap<(String, String), DeviceModelView>,
) {
    for device in devices {
        device.models = models
            .range((device.id.clone(), String::new())..)
            .take_while(|((d, _), _)| d == &device.id)
            .map(|(_, v)| v.clone())
            .collect();
    }
}

/// One device's stored status of a model (last update step, counters from heartbeats).
#[derive(Clone, Debug, PartialEq)]
pub struct StatusRow {
    pub device: String,
    pub active_version: Option<String>,
    pub step: Option<UpdateStep>,
    /// The version the step is about.
    pub step_version: Option<String>,
    pub detail: String,
    pub inferences: u64,
    pub errors: u64,
    pub latency_p95_us: Option<u64>,
    /// The candidate the device runs in shadow, from its last heartbeat.
    pub shadow_version: Option<String>,
}

/// What one [`Store::prune`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub drift_windows: usize,
    pub telemetry_rows: usize,
}

impl Pruned {
    pub fn add(&mut self, other: Pruned) {
        self.drift_windows += other.drift_windows;
        self.telemetry_rows += other.telemetry_rows;
    }
}

/// One stored drift window, its counts still postcard-encoded.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowRow {
    pub device: String,
    pub version: String,
    pub start_ms: u64,
    pub counts: Vec<u8>,
    /// The window's shadow comparison, still encoded, when a candidate ran in shadow.
    pub shadow: Option<Vec<u8>>,
    /// When the server stored it (its clock; 0 for windows stored before this was recorded).
    pub received_ms: u64,
}

/// What the rollout engine observes of one model, as the store holds it.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ObservationRows {
    pub statuses: Vec<StatusRow>,
    pub windows: Vec<WindowRow>,
}

/// A rollout's desired version for one device of its model: (device, version, attempt).
/// A rollout's desired version on one device, and the candidate it runs in shadow (with the
/// share of requests copied to it), if any.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredChange {
    pub device: String,
    pub version: String,
    pub attempt: u32,
    pub shadow: Option<(String, f32)>,
    /// The activation window the device waits for (ADR 0012); None activates at once.
    pub window: Option<proto::window::ActivationWindow>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewDevice {
    pub id: String,
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub credential_hash: String,
    pub enrolled_ms: u64,
    /// The device's ed25519 public key (hex) that verifies its reports; empty if it has none.
    pub public_key: String,
    /// The credential's salted hash in Mosquitto's password-file format (`broker::mosquitto`).
    pub broker_hash: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BundleRecord {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub created_at: u64,
    pub signed_by: String,
    pub manifest_json: Vec<u8>,
}

/// A drift window as stored, with the server's own score against the bundle's reference.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredDrift<'a> {
    pub summary: &'a DriftSummary,
    pub score: f64,
    pub mean_confidence: Option<f64>,
}

/// A durable record from a device's `reports` stream.
#[derive(Clone, Debug)]
pub enum Report<'a> {
    Status(&'a UpdateStatus),
    Heartbeat(&'a Heartbeat),
    Drift(StoredDrift<'a>),
    Event(&'a DeliveryEvent),
}

/// One report of a device's sequenced stream, as it arrived.
#[derive(Clone, Debug)]
pub struct SequencedReport<'a> {
    pub device: &'a str,
    pub seq: u64,
    pub floor: u64,
    pub report: Report<'a>,
}

/// What became of a sequenced record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Stored now, with its sequence.
    Stored,
    /// Stored before (or below the device's floor): dropped, but acknowledged again.
    Duplicate,
    /// No such device: not stored and not acknowledged.
    UnknownDevice,
}

/// Which stored telemetry rows to read, in (device, seq) order after `after`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TelemetryQuery {
    pub model: String,
    pub version: Option<String>,
    pub since_ms: Option<u64>,
    /// Continue after this (device, seq).
    pub after: Option<(String, u64)>,
    pub limit: usize,
}

/// One stored inference record.
pub use proto::delivery::ExportedTelemetry as StoredTelemetry;

/// An operator identity as stored: its token only as a SHA-256 digest.
#[derive(Clone, Debug, PartialEq)]
pub struct OperatorRecord {
    pub name: String,
    pub role: proto::wire::Role,
    pub token_hash: String,
    pub created_ms: u64,
    pub revoked_ms: Option<u64>,
}

/// Why an enrollment was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnrollRefusal {
    /// Unknown, or used longer ago than the retry grace period.
    UnknownOrUsed,
    Expired,
    Revoked,
}

pub trait Store: Send + Sync + 'static {
    /// Stores enrollment tokens (as digests) valid until `expires_ms`.
    fn create_tokens(&self, token_hashes: &[String], now_ms: u64, expires_ms: u64) -> Result<(), StoreError>;
    /// Revokes an unused enrollment token; false if there is no such unused token.
    fn revoke_token(&self, token_hash: &str, now_ms: u64) -> Result<bool, StoreError>;
    /// Enrolls `device` with a token in one transaction: marks the token used by it and inserts
    /// the device. A retry with the same token within `grace_ms` of its use (the first reply was
    /// lost) gives the device it enrolled the new credential instead. Returns the device id, or
    /// why the token was refused.
    fn enroll(
        &self,
        token_hash: &str,
        device: &NewDevice,
        grace_ms: u64,
    ) -> Result<Result<String, EnrollRefusal>, StoreError>;
    fn insert_device(&self, device: &NewDevice) -> Result<(), StoreError>;
    /// The unrevoked device holding this credential.
    fn device_for_credential(&self, credential_hash: &str) -> Result<Option<String>, StoreError>;
    /// The device's registered public key (hex), if the device exists, is not revoked and has one.
    fn device_public_key(&self, device: &str) -> Result<Option<String>, StoreError>;
    /// (device id, Mosquitto password hash) of every unrevoked device that has one.
    fn broker_passwords(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// Revokes a device: its credential and key stop working. False if there is no such device.
    fn revoke_device(&self, device: &str, now_ms: u64) -> Result<bool, StoreError>;

    /// Creates or replaces the named operator (the bootstrap admin is replaced at every start).
    fn put_operator(&self, operator: &OperatorRecord, replace: bool) -> Result<(), StoreError>;
    /// The unrevoked operator holding this token.
    fn operator_for_token(&self, token_hash: &str) -> Result<Option<OperatorRecord>, StoreError>;
    fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError>;
    /// False if there is no such unrevoked operator.
    fn revoke_operator(&self, name: &str, now_ms: u64) -> Result<bool, StoreError>;
    /// Counts reports under `device`'s id that were dropped because their signature failed.
    fn count_rejected(&self, device: &str, reports: u64) -> Result<(), StoreError>;
    fn device_exists(&self, id: &str) -> Result<bool, StoreError>;
    /// Replaces a device's labels; false when the device is unknown.
    fn set_labels(&self, id: &str, labels: &std::collections::BTreeMap<String, String>) -> Result<bool, StoreError>;
    fn device_ids(&self) -> Result<Vec<String>, StoreError>;
    fn list_devices(&self) -> Result<Vec<DeviceView>, StoreError>;

    /// Stores a bundle's record; the same name and version with other bytes is a conflict.
    /// Raises and returns the device's freshness counter: every signed check-in reply carries a
    /// higher one than the last (ADR 0010).
    fn next_freshness_counter(&self, device: &str) -> Result<u64, StoreError>;
    /// Stores a root of trust, verified by the caller; its version must follow the newest stored
    /// (any version when none is), else `Conflict`.
    fn put_root(&self, version: u64, document: &[u8], at_ms: u64) -> Result<(), StoreError>;
    fn root(&self, version: u64) -> Result<Option<Vec<u8>>, StoreError>;
    fn latest_root(&self) -> Result<Option<Vec<u8>>, StoreError>;
    fn put_bundle(&self, bundle: &BundleRecord) -> Result<(), StoreError>;
    fn bundle(&self, name: &str, version: &str) -> Result<Option<BundleRecord>, StoreError>;

    /// Sets the desired version of a model on devices; returns each device's new revision.
    fn set_desired(&self, devices: &[String], model: &str, version: &str) -> Result<Vec<(String, u64)>, StoreError>;
    fn desired_state(&self, device: &str) -> Result<DesiredState, StoreError>;
    /// A device's check-in: marks it seen at `now_ms`, stores the statuses it sent, and reads its
    /// desired state, with its next freshness counter when `freshness` (ADR 0010). The SQLite
    /// store does it in one transaction, taking its connection once instead of once per step
    /// (check-ins wait on ingest batches and rollout saves for that connection).
    fn check_in(
        &self,
        device: &str,
        now_ms: u64,
        statuses: &[UpdateStatus],
        freshness: bool,
    ) -> Result<(DesiredState, Option<u64>), StoreError> {
        self.touch(device, now_ms)?;
        for status in statuses {
            self.record_status(device, status)?;
        }
        let desired = self.desired_state(device)?;
        let counter = if freshness { Some(self.next_freshness_counter(device)?) } else { None };
        Ok((desired, counter))
    }

    fn record_status(&self, device: &str, status: &UpdateStatus) -> Result<(), StoreError>;
    fn record_heartbeat(&self, device: &str, heartbeat: &Heartbeat) -> Result<(), StoreError>;
    /// Stores a window once; a duplicate delivery (same device, model, start) returns false.
    fn record_drift(&self, device: &str, drift: &StoredDrift<'_>) -> Result<bool, StoreError>;
    fn touch(&self, device: &str, at_ms: u64) -> Result<(), StoreError>;

    /// Stores each report at most once (by device and sequence), all in one transaction with
    /// their dedupe entries; a report's `floor` lets the store forget sequences its device will
    /// not resend. One outcome per report, in order; an error stores none of them.
    fn record_reports(&self, reports: &[SequencedReport<'_>]) -> Result<Vec<Accepted>, StoreError>;

    /// How many of the API's calls are worth running at once; more only wait on the store's
    /// connections, each holding a blocking thread. SQLite's as many as tokio's blocking pool
    /// has threads: waiting check-ins are what its group commit writes together, and with 64
    /// the 10,000-agent run's check-in p99 doubled (docs/BENCHMARKS.md, Load).
    fn concurrency(&self) -> usize {
        512
    }
    /// [`Store::record_reports`] for one report.
    fn record_report(&self, device: &str, seq: u64, floor: u64, report: &Report<'_>) -> Result<Accepted, StoreError> {
        let report = SequencedReport { device, seq, floor, report: report.clone() };
        let mut accepted = self.record_reports(std::slice::from_ref(&report))?;
        accepted.pop().ok_or_else(|| StoreError::Corrupt("no outcome for a stored report".into()))
    }
    /// Stores uploaded telemetry rows, each (device, seq) once, in one transaction.
    fn record_telemetry(&self, device: &str, rows: &[TelemetryRow]) -> Result<TelemetryAck, StoreError>;
    fn telemetry(&self, query: &TelemetryQuery) -> Result<Vec<StoredTelemetry>, StoreError>;
    /// Every device's delivery counters.
    fn delivery(&self) -> Result<Vec<DeliveryView>, StoreError>;
    /// Retention: deletes at most `limit` drift windows and at most `limit` telemetry rows that
    /// were stored before `stored_before_ms` (the server's clock), oldest first is not promised.
    fn prune(&self, stored_before_ms: u64, limit: usize) -> Result<Pruned, StoreError>;

    /// Every cohort default (`rollout::cohort_default`), of every model.
    fn cohort_defaults(&self) -> Result<Vec<CohortDefault>, StoreError>;
    /// A deployment to a selector, in one transaction: the cohort default it leaves for
    /// newcomers, `default.version` desired on `devices` (those matching now) and its audit line.
    fn deploy_to_selector(
        &self,
        default: &CohortDefault,
        devices: &[String],
        audit: &AuditEntry,
    ) -> Result<Vec<(String, u64)>, StoreError>;
    /// Gives newcomers their cohort default: (device, version) of `model`, each written only if
    /// the device still has no desired version of it, with the audit lines, in one transaction.
    fn apply_cohort_defaults(
        &self,
        model: &str,
        newcomers: &[(String, String)],
        audit: &[AuditEntry],
    ) -> Result<Vec<(String, u64)>, StoreError>;
    /// Unrevoked devices with labels, the version of `model` they run and the one they were told.
    fn device_infos(&self, model: &str) -> Result<Vec<DeviceInfo>, StoreError>;
    /// Every device's status row for `model` and its drift windows since `since_ms`, raw; only
    /// those the server stored at or after `received_from_ms` (0: all), so that a reader who
    /// keeps what it read before reads only what is new.
    fn observation_rows(
        &self,
        model: &str,
        since_ms: u64,
        received_from_ms: u64,
    ) -> Result<ObservationRows, StoreError>;
    /// Writes the rollout state (its head, and of its members those `members` names), its audit
    /// lines and the desired versions it sets in one transaction (and, once it has completed,
    /// its version as the cohort default); returns the devices whose revision changed
    /// (unchanged assertions are quiet). The save is refused with [`StoreError::Stale`] unless
    /// the stored rollout is still at `rollout.revision` (0: it must not exist yet); the stored
    /// revision becomes `rollout.revision + 1`.
    fn save_rollout(
        &self,
        rollout: &Rollout,
        members: &MemberWrites,
        audit: &[AuditEntry],
        desired: &[DesiredChange],
    ) -> Result<Vec<(String, u64)>, StoreError>;
    fn rollout(&self, id: &str) -> Result<Option<Rollout>, StoreError>;
    /// Takes or renews the lease `name` for `holder` until `now_ms + ttl_ms`: true when `holder`
    /// holds it now (it was free, had expired, or was already its own). Servers sharing a store
    /// use it so that one at a time drives the rollouts; their clocks must agree to well within
    /// `ttl_ms`.
    fn acquire_lease(&self, name: &str, holder: &str, now_ms: u64, ttl_ms: u64) -> Result<bool, StoreError>;
    /// Gives the lease up if `holder` holds it, so another server may take it at once.
    fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;
    /// Newest first.
    fn rollouts(&self) -> Result<Vec<Rollout>, StoreError>;
    /// The running and paused rollouts, newest first: what the driver reads every tick, without
    /// the states of every rollout that ever finished (each holds its whole cohort).
    fn active_rollouts(&self) -> Result<Vec<Rollout>, StoreError>;
    /// The running and paused rollouts' ids and revisions, newest first, without their states:
    /// the driver reads a state again only when its revision is not the one it holds.
    fn active_rollout_revisions(&self) -> Result<Vec<(String, u64)>, StoreError>;
    /// How many rollouts are in each phase (phases without one are left out).
    fn rollout_phases(&self) -> Result<Vec<(Phase, u64)>, StoreError>;
    fn audit(&self, rollout: Option<&str>, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;
    fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError>;

    /// Every published bundle (lineage is in each manifest).
    fn bundles(&self) -> Result<Vec<BundleRecord>, StoreError>;
    /// A device's recent update steps of a model, newest first (bounded per device and model).
    fn status_history(&self, device: &str, model: &str) -> Result<Vec<proto::lineage::StatusEntry>, StoreError>;
    /// Audit lines that name the device, newest first.
    fn audit_for_device(&self, device: &str, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;

    /// The retraining watch of (model, version, cohort key).
    fn drift_watch(&self, model: &str, version: &str, cohort: &str) -> Result<Option<Watch>, StoreError>;
    /// Saves a watch under (model, version, cohort key) with the event it fired (stored once by
    /// id) and that event's audit line, in one transaction; true when the event is new.
    fn save_drift_watch(
        &self,
        key: (&str, &str, &str),
        watch: &Watch,
        fired: Option<(&RetrainEvent, &AuditEntry)>,
    ) -> Result<bool, StoreError>;
    /// Undelivered events whose next try is due, oldest first.
    fn due_events(&self, now_ms: u64, limit: usize) -> Result<Vec<PendingEvent>, StoreError>;
    /// Records a delivery try: Ok marks the event delivered; Err keeps it for `next_attempt_ms`.
    fn event_attempted(
        &self,
        id: &str,
        outcome: &Result<(), String>,
        now_ms: u64,
        next_attempt_ms: u64,
    ) -> Result<(), StoreError>;
}

/// Opens the store the configuration names: PostgreSQL when `database_url` is given (its tables in
/// `schema`, created if missing, else the connection's search_path), else SQLite at `sqlite_path`.
/// Blocking: call it off the async workers.
pub fn open(
    database_url: Option<&str>,
    schema: Option<&str>,
    sqlite_path: &std::path::Path,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    Ok(match database_url {
        Some(url) => std::sync::Arc::new(PostgresStore::open(url, schema)?),
        None => std::sync::Arc::new(SqliteStore::open(sqlite_path)?),
    })
}

/// An event waiting to be delivered, as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingEvent {
    pub id: String,
    /// The event's JSON, sent as it was stored.
    pub payload: String,
    pub attempts: u32,
}

#[cfg(test)]
pub(crate) mod tests;
