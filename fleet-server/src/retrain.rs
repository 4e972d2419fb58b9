//! The retraining trigger: one task that, every `check_every`, feeds each complete drift bucket
//! of every model, version and cohort to its watch (`drift::retrain`, pure), stores what fires
//! with its audit line before anything is sent, then delivers due events to the MQTT topic
//! `fleet/v1/events/retrain` and the configured webhook, retrying failed webhooks with backoff.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use proto::events::RETRAIN_TOPIC;
use proto::wire::{AuditAction, AuditEntry};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::drift::report::report;
use crate::drift::retrain::{cohort_key, event, scan};
use crate::lease::Lease;
use crate::notify::Notifier;
use crate::store::{PendingEvent, Store, StoreError};

#[derive(Clone, Debug)]
pub struct RetrainConfig {
    /// Where each event is POSTed as JSON; MQTT only when absent.
    pub webhook: Option<String>,
    /// Cohorts are the whole fleet and one per value of this device label.
    pub cohort_label: Option<String>,
    /// The window K consecutive drifted windows are counted in.
    pub bucket_secs: u64,
    pub check_every: Duration,
}

impl Default for RetrainConfig {
    fn default() -> Self {
        RetrainConfig {
            webhook: None,
            cohort_label: Some("site".into()),
            bucket_secs: 3600,
            check_every: Duration::from_secs(60),
        }
    }
}

/// A webhook that does not answer within this is a failed try.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Events delivered per check; the rest wait for the next.
const DELIVERIES_PER_CHECK: usize = 16;
/// The longest wait between two tries of one event.
const MAX_BACKOFF_MS: u64 = 300_000;

/// The lease under which one server of several sharing a store detects and delivers events.
pub const LEASE: &str = "retrain-events";

pub fn spawn(
    store: Arc<dyn Store>,
    notifier: Notifier,
    config: RetrainConfig,
    lease: Lease,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) {
    tasks.spawn(run(store, notifier, config, lease, cancel));
}

async fn run(
    store: Arc<dyn Store>,
    notifier: Notifier,
    config: RetrainConfig,
    mut lease: Lease,
    cancel: CancellationToken,
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(WEBHOOK_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| tracing::error!(error = %e, "no HTTP client for the retraining webhook"))
        .ok();
    let mut turns = Lease::turns(config.check_every);
    while let Some(held) = lease.next_turn(&mut turns, &store, &cancel).await {
        if !held {
            continue;
        }
        let detect_config = config.clone();
        match crate::store::blocking(&store, move |s| detect(s, &detect_config, crate::unix_ms())).await {
            Ok(0) => {}
            Ok(fired) => tracing::info!(fired, "drift persisted: retraining events stored"),
            Err(e) => tracing::error!(error = %e, "retraining check failed"),
        }
        if let Err(e) = deliver(&store, &notifier, http.as_ref(), config.webhook.as_deref()).await {
            tracing::error!(error = %e, "retraining event delivery failed");
        }
    }
    lease.release(&store).await;
}

/// Feeds new complete buckets to every watch; stores fired events. Returns how many are new.
pub fn detect(store: &dyn Store, config: &RetrainConfig, now_ms: u64) -> Result<usize, StoreError> {
    let bucket_ms = config.bucket_secs.max(1) * 1000;
    let models: BTreeSet<String> = store.bundles()?.into_iter().map(|b| b.name).collect();
    let mut new_events = 0;
    for model in models {
        let references = crate::drift::references(
            store,
            &model,
            store.bundles()?.iter().filter(|b| b.name == model).map(|b| &b.version),
        )?;
        let persist = references.values().map(|r| r.policy.persist_windows).max().unwrap_or(1) as u64;
        let since = now_ms
            .saturating_sub((persist + 2) * bucket_ms)
            .max(now_ms.saturating_sub(crate::api::drift::MAX_LOOKBACK_MS));
        let rows = store.observation_rows(&model, since, 0)?;
        let devices = store.device_infos(&model)?;
        let mut cohorts: BTreeSet<BTreeMap<String, String>> = [BTreeMap::new()].into();
        if let Some(label) = &config.cohort_label {
            for value in devices.iter().filter_map(|d| d.labels.get(label)) {
                cohorts.insert([(label.clone(), value.clone())].into());
            }
        }
        for cohort in cohorts {
            let report = report(&model, &rows.windows, &devices, &cohort, config.bucket_secs, since, &references);
            let key = cohort_key(&cohort);
            for (version, reference) in &references {
                let buckets: Vec<_> = report.buckets.iter().filter(|b| &b.version == version).collect();
                if buckets.is_empty() {
                    continue;
                }
                let watch = store.drift_watch(&model, version, &key)?.unwrap_or_default();
                let (next, fired) = scan(&watch, &buckets, bucket_ms, now_ms, reference.policy.persist_windows);
                if next == watch && fired.is_none() {
                    continue;
                }
                let fired_event = match &fired {
                    Some(f) => {
                        let lineage = store
                            .bundle(&model, version)?
                            .and_then(|b| proto::Manifest::parse(&b.manifest_json).ok())
                            .map(|m| m.lineage)
                            .unwrap_or_default();
                        let e = event(&model, &cohort, f, config.bucket_secs, lineage);
                        let audit = retrain_audit(&e, now_ms);
                        Some((e, audit))
                    }
                    None => None,
                };
                let fired_ref = fired_event.as_ref().map(|(e, a)| (e, a));
                if store.save_drift_watch((&model, version, &key), &next, fired_ref)? {
                    new_events += 1;
                }
            }
        }
    }
    Ok(new_events)
}

fn retrain_audit(e: &proto::events::RetrainEvent, now_ms: u64) -> AuditEntry {
    let features: Vec<String> =
        e.drifted_features.iter().map(|f| format!("{} ({} {:.3})", f.name, f.test, f.score)).collect();
    let cohort = if e.cohort.is_empty() { "the whole fleet".to_string() } else { cohort_key(&e.cohort) };
    AuditEntry {
        at_ms: now_ms,
        actor: "drift".into(),
        rollout: None,
        action: AuditAction::RetrainRequested,
        detail: format!(
            "{} {} drifted in {cohort} for {} windows of {} s: {} [{}]",
            e.model,
            e.version,
            e.windows,
            e.window_secs,
            features.join(", "),
            e.id
        ),
    }
}

/// Sends due events; each try is recorded (delivered, or failed with when to try again).
async fn deliver(
    store: &Arc<dyn Store>,
    notifier: &Notifier,
    http: Option<&reqwest::Client>,
    webhook: Option<&str>,
) -> Result<(), StoreError> {
    let due = crate::store::blocking(store, |s| s.due_events(crate::unix_ms(), DELIVERIES_PER_CHECK)).await?;
    for PendingEvent { id, payload, attempts } in due {
        // MQTT first, once: QoS 1 from the server's persistent session; the webhook decides
        // whether the event counts as delivered.
        if attempts == 0 {
            if let Err(e) = notifier.publish_event(RETRAIN_TOPIC, payload.clone().into_bytes(), WEBHOOK_TIMEOUT).await {
                tracing::warn!(%id, error = %e, "retraining event not published over MQTT");
            }
        }
        let outcome = match (webhook, http) {
            (Some(url), Some(http)) => post(http, url, payload).await,
            (Some(_), None) => Err("no HTTP client".to_string()),
            (None, _) => Ok(()),
        };
        let now = crate::unix_ms();
        let next = now + backoff_ms(attempts);
        if let Err(reason) = &outcome {
            tracing::warn!(%id, attempt = attempts + 1, %reason, retry_in_ms = next - now, "retraining webhook failed");
        }
        crate::store::blocking(store, move |s| s.event_attempted(&id, &outcome, now, next)).await?;
    }
    Ok(())
}

async fn post(http: &reqwest::Client, url: &str, payload: String) -> Result<(), String> {
    let response = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(payload)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("POST {url} answered {}", response.status()))
    }
}

/// 1 s, 2 s, 4 s … up to five minutes, with up to a quarter more at random so many servers
/// behind one webhook do not retry in step.
pub fn backoff_ms(attempts: u32) -> u64 {
    let base = 1000u64.saturating_mul(1 << attempts.min(20)).min(MAX_BACKOFF_MS);
    base + rand::random::<u64>() % (base / 4 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_minutes_with_some_jitter() {
        assert!((1000..=1250).contains(&backoff_ms(0)));
        assert!((8000..=10_000).contains(&backoff_ms(3)));
        assert!((300_000..=375_000).contains(&backoff_ms(30)));
    }
}
