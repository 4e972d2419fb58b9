//! One disk budget for everything the agent buffers while it cannot deliver: raw telemetry
//! (`telemetry.db`) and the outbox of reports (`agent.db`). The eviction order is a pure
//! function (ADR 0007): raw telemetry first, then heartbeats, then status, drift and delivery
//! events last; oldest first within each. Each buffer's owner thread (telemetry writer, outbox)
//! publishes its logical size in [`SharedUsage`] and frees its own share of a plan.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Logical bytes held per priority (payload bytes plus a fixed per-row overhead), not file sizes:
/// SQLite files do not shrink on delete, but their free pages are reused, so logical bytes are
/// what bounds growth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub telemetry: u64,
    pub heartbeats: u64,
    pub reports: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.telemetry + self.heartbeats + self.reports
    }
}

/// Bytes each buffer should free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvictionPlan {
    pub telemetry: u64,
    pub heartbeats: u64,
    pub reports: u64,
}

/// Once over the budget, evicts down to 90% of it, so eviction runs in chunks, not per insert.
/// Lower priorities are emptied before a higher one loses anything.
pub fn plan(usage: Usage, budget: u64) -> Option<EvictionPlan> {
    if usage.total() <= budget {
        return None;
    }
    let mut excess = usage.total() - budget * 9 / 10;
    let mut take = |held: u64| {
        let taken = held.min(excess);
        excess -= taken;
        taken
    };
    Some(EvictionPlan {
        telemetry: take(usage.telemetry),
        heartbeats: take(usage.heartbeats),
        reports: take(usage.reports),
    })
}

/// Per-row overhead counted on top of payload bytes (row id, sequence, key columns, page slack).
pub const ROW_OVERHEAD: u64 = 48;

/// The live sizes of both buffers, shared by their owner threads; cheap to clone.
#[derive(Clone, Debug)]
pub struct SharedUsage {
    inner: Arc<Counters>,
    pub budget: u64,
}

#[derive(Debug, Default)]
struct Counters {
    telemetry: AtomicU64,
    heartbeats: AtomicU64,
    reports: AtomicU64,
}

impl SharedUsage {
    pub fn new(budget: u64) -> SharedUsage {
        SharedUsage { inner: Arc::default(), budget }
    }

    pub fn snapshot(&self) -> Usage {
        Usage {
            telemetry: self.inner.telemetry.load(Ordering::Relaxed),
            heartbeats: self.inner.heartbeats.load(Ordering::Relaxed),
            reports: self.inner.reports.load(Ordering::Relaxed),
        }
    }

    pub fn set_telemetry(&self, bytes: u64) {
        self.inner.telemetry.store(bytes, Ordering::Relaxed);
    }

    pub fn set_outbox(&self, heartbeats: u64, reports: u64) {
        self.inner.heartbeats.store(heartbeats, Ordering::Relaxed);
        self.inner.reports.store(reports, Ordering::Relaxed);
    }

    /// The plan for the buffers as they are now.
    pub fn plan(&self) -> Option<EvictionPlan> {
        plan(self.snapshot(), self.budget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(telemetry: u64, heartbeats: u64, reports: u64) -> Usage {
        Usage { telemetry, heartbeats, reports }
    }

    #[test]
    fn nothing_is_evicted_at_or_under_the_budget() {
        assert_eq!(plan(usage(0, 0, 0), 1000), None);
        assert_eq!(plan(usage(600, 300, 100), 1000), None);
    }

    #[test]
    fn over_the_budget_raw_telemetry_goes_first_down_to_ninety_percent() {
        assert_eq!(plan(usage(800, 150, 150), 1000), Some(EvictionPlan { telemetry: 200, heartbeats: 0, reports: 0 }));
    }

    #[test]
    fn heartbeats_go_only_once_telemetry_is_gone_and_reports_last() {
        assert_eq!(plan(usage(50, 500, 600), 1000), Some(EvictionPlan { telemetry: 50, heartbeats: 200, reports: 0 }));
        assert_eq!(plan(usage(0, 100, 1200), 1000), Some(EvictionPlan { telemetry: 0, heartbeats: 100, reports: 300 }));
    }

    #[test]
    fn a_plan_never_frees_more_than_a_buffer_holds() {
        let plan = plan(usage(10, 20, 5000), 100).unwrap();
        assert_eq!((plan.telemetry, plan.heartbeats), (10, 20));
        assert_eq!(plan.reports, 5030 - 90 - 30, "down to 90% of the budget, the rest from reports");
    }
}
