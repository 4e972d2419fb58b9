//! Work that one server of several sharing a store must do alone (driving rollouts, detecting
//! and delivering retraining events, retention) is done under a lease held in the store: taken
//! when free or expired, renewed by its holder before each round of work, given up on a clean
//! stop. A server killed while holding one is replaced when it expires, within one lease period.
//!
//! The lease decides who works; it is not what keeps the data right. A holder that stalls past
//! its expiry may still write once: rollouts are saved with a revision (optimistic concurrency),
//! so such a write is refused as stale instead of overwriting its successor's.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};

/// One named lease as one server holds it.
#[derive(Clone, Debug)]
pub struct Lease {
    name: &'static str,
    /// This server (its MQTT client id: stable across its restarts, unique among servers).
    holder: String,
    ttl: Duration,
    /// Whether the last renewal held it: for one log line when that changes.
    held: bool,
    /// 1 while held (`fleet_lease_held` in `/metrics`).
    gauge: Gauge,
}

impl Lease {
    pub fn new(name: &'static str, holder: String, ttl: Duration, gauge: Gauge) -> Lease {
        Lease { name, holder, ttl, held: false, gauge }
    }

    /// Takes or renews the lease; true while this server holds it. Says once in the log when
    /// this server starts or stops holding it. A store error counts as not holding it.
    pub async fn renew(&mut self, store: &Arc<dyn Store>) -> bool {
        let (name, holder, ttl_ms) = (self.name, self.holder.clone(), self.ttl.as_millis() as u64);
        let held = crate::store::blocking(store, move |s| s.acquire_lease(name, &holder, crate::unix_ms(), ttl_ms))
            .await
            .unwrap_or_else(|e: StoreError| {
                tracing::error!(lease = self.name, error = %e, "cannot renew the lease; working as if another server held it");
                false
            });
        if held != self.held {
            match held {
                true => tracing::info!(lease = self.name, holder = %self.holder, "this server holds the lease now"),
                false => tracing::info!(lease = self.name, holder = %self.holder, "another server holds the lease now"),
            }
        }
        self.held = held;
        self.gauge.set(i64::from(held));
        held
    }

    /// For work done every `period` under this lease: the first turn at once, and a late turn
    /// delays the next ones instead of bunching them.
    pub fn turns(period: Duration) -> Interval {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        interval
    }

    /// Waits for the next of [`Lease::turns`] and renews the lease: Some(true) when this server
    /// does this turn's work, Some(false) when another holds the lease, None once `cancel` fires.
    pub async fn next_turn(
        &mut self,
        turns: &mut Interval,
        store: &Arc<dyn Store>,
        cancel: &CancellationToken,
    ) -> Option<bool> {
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = turns.tick() => {}
        }
        Some(self.renew(store).await)
    }

    /// Whether the last renewal held the lease.
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// Gives the lease up (on a clean stop) so another server can take it at once.
    pub async fn release(&mut self, store: &Arc<dyn Store>) {
        if !self.held {
            return;
        }
        let (name, holder) = (self.name, self.holder.clone());
        if let Err(e) = crate::store::blocking(store, move |s| s.release_lease(name, &holder)).await {
            tracing::warn!(lease = self.name, error = %e, "lease not released; it expires on its own");
        }
        self.held = false;
        self.gauge.set(0);
    }
}
