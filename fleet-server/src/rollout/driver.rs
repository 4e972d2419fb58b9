//! The rollout driver: one task owns every rollout's read-decide-write cycle, so operator actions
//! and engine ticks never race. Each cycle persists the new state and its audit lines first, then
//! sets desired versions. On start it re-asserts what every rollout wants of each device, which
//! finishes whatever a crash interrupted between the two.

use std::sync::Arc;
use std::time::Duration;

use proto::rollout::RolloutPlan;
use proto::wire::AuditEntry;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::create::{busy_devices, create, operate, OperatorAction, RolloutError};
use super::decide::{decide, Decision};
use super::state::{Effect, MemberStatus, Rollout};
use crate::ingest::Notifier;
use crate::store::{Store, StoreError};

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
    Create { plan: RolloutPlan, actor: String, reply: oneshot::Sender<Result<Rollout, DriverError>> },
    Operate { id: String, action: OperatorAction, actor: String, reply: oneshot::Sender<Result<Rollout, DriverError>> },
}

/// Cheap to clone; every clone talks to the one driver task.
#[derive(Clone)]
pub struct RolloutHandle {
    tx: mpsc::Sender<Command>,
}

impl RolloutHandle {
    pub async fn create(&self, plan: RolloutPlan, actor: String) -> Result<Rollout, DriverError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Create { plan, actor, reply }).await.map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    pub async fn operate(&self, id: String, action: OperatorAction, actor: String) -> Result<Rollout, DriverError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Operate { id, action, actor, reply }).await.map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }
}

pub fn spawn(store: Arc<dyn Store>, notifier: Notifier, tick: Duration, cancel: CancellationToken) -> RolloutHandle {
    let (tx, rx) = mpsc::channel(64);
    let driver = Driver { store, notifier };
    tokio::spawn(driver.run(rx, tick, cancel));
    RolloutHandle { tx }
}

struct Driver {
    store: Arc<dyn Store>,
    notifier: Notifier,
}

impl Driver {
    async fn run(self, mut rx: mpsc::Receiver<Command>, tick: Duration, cancel: CancellationToken) {
        if let Err(e) = self.reassert_all().await {
            tracing::error!(error = %e, "re-asserting rollouts at start failed");
        }
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                command = rx.recv() => match command {
                    Some(Command::Create { plan, actor, reply }) => { let _ = reply.send(self.create(plan, actor).await); }
                    Some(Command::Operate { id, action, actor, reply }) => { let _ = reply.send(self.operate(id, action, actor).await); }
                    None => return,
                },
                _ = interval.tick() => {
                    if let Err(e) = self.tick().await {
                        tracing::error!(error = %e, "rollout tick failed");
                    }
                }
            }
        }
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
        let (devices, existing) = self.blocking(move |s| Ok((s.device_infos(&model)?, s.rollouts()?))).await?;
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
        let effects = vec![Effect::Audit { action: "created".into(), detail }];
        self.commit(Decision { rollout, effects }, &actor).await
    }

    async fn operate(&self, id: String, action: OperatorAction, actor: String) -> Result<Rollout, DriverError> {
        let lookup = id.clone();
        let rollout = self.blocking(move |s| s.rollout(&lookup)).await?.ok_or(DriverError::NotFound(id))?;
        let decision = operate(&rollout, action, crate::unix_ms())?;
        self.commit(decision, &actor).await
    }

    async fn tick(&self) -> Result<(), DriverError> {
        let rollouts = self.blocking(|s| s.rollouts()).await?;
        for rollout in rollouts.into_iter().filter(|r| r.phase == super::Phase::Running) {
            let (model, since) = (rollout.plan.model.clone(), rollout.created_ms);
            let observations = self.blocking(move |s| s.observations(&model, since)).await?;
            let decision = decide(&rollout, &observations, crate::unix_ms());
            if decision.rollout != rollout || !decision.effects.is_empty() {
                self.commit(decision, "engine").await?;
            }
        }
        Ok(())
    }

    /// Persist first (state and audit in one transaction), then set desired versions.
    async fn commit(&self, decision: Decision, actor: &str) -> Result<Rollout, DriverError> {
        let now = crate::unix_ms();
        let Decision { rollout, effects } = decision;
        let audit: Vec<AuditEntry> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Audit { action, detail } => Some(AuditEntry {
                    at_ms: now,
                    actor: actor.to_string(),
                    rollout: Some(rollout.id.clone()),
                    action: action.clone(),
                    detail: detail.clone(),
                }),
                Effect::SetDesired { .. } => None,
            })
            .collect();
        let saved = rollout.clone();
        self.blocking(move |s| s.save_rollout(&saved, &audit)).await?;
        let model = rollout.plan.model.clone();
        let changes: Vec<(String, String, u32)> = effects
            .into_iter()
            .filter_map(|e| match e {
                Effect::SetDesired { device, version, attempt } => Some((device, version, attempt)),
                Effect::Audit { .. } => None,
            })
            .collect();
        self.set_desired(model, changes).await?;
        Ok(rollout)
    }

    async fn set_desired(&self, model: String, changes: Vec<(String, String, u32)>) -> Result<(), DriverError> {
        if changes.is_empty() {
            return Ok(());
        }
        let revisions = self
            .blocking(move |s| {
                let mut revisions = Vec::new();
                for (device, version, attempt) in &changes {
                    if let Some(revision) = s.set_desired_attempt(device, &model, version, *attempt)? {
                        revisions.push((device.clone(), revision));
                    }
                }
                Ok(revisions)
            })
            .await?;
        for (device, revision) in revisions {
            self.notifier.desired_changed(&device, revision);
        }
        Ok(())
    }

    /// What each rollout wants of each device, applied idempotently.
    async fn reassert_all(&self) -> Result<(), DriverError> {
        let rollouts = self.blocking(|s| s.rollouts()).await?;
        for rollout in rollouts
            .iter()
            .filter(|r| r.phase.is_active() || r.members.values().any(|m| m.status == MemberStatus::Reverted))
        {
            let wanted: Vec<(String, String, u32)> = rollout
                .members
                .iter()
                .filter_map(|(id, m)| match m.status {
                    MemberStatus::Assigned | MemberStatus::Active => {
                        Some((id.clone(), rollout.plan.version.clone(), m.attempt))
                    }
                    MemberStatus::Reverted => Some((id.clone(), m.previous_version.clone()?, m.attempt)),
                    _ => None,
                })
                .collect();
            self.set_desired(rollout.plan.model.clone(), wanted).await?;
        }
        Ok(())
    }
}
