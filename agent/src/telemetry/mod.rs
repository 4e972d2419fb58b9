//! The telemetry buffer: one writer thread owns `telemetry.db` and inserts records in batched
//! transactions. Producers hand records over with `try_send`; when the channel is full the record
//! is counted as dropped instead of blocking the inference thread. The buffer is bounded by
//! `max_rows`; the eviction plan is a pure function.

mod writer;

pub use writer::{decode_f32s, encode_f32s, spawn_writer, TelemetryRecord, TelemetrySink, WriterConfig, WriterError};

/// What to delete when the buffer is over budget: the oldest rows first.
#[derive(Debug, PartialEq, Eq)]
pub struct EvictionPlan {
    pub delete_oldest: u64,
}

/// Evicts down to 90% of the budget once over it, so eviction runs in chunks, not per insert.
pub fn evict(rows: u64, max_rows: u64) -> Option<EvictionPlan> {
    (rows > max_rows).then(|| EvictionPlan { delete_oldest: rows - max_rows * 9 / 10 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_evicted_at_or_under_budget() {
        assert_eq!(evict(0, 100), None);
        assert_eq!(evict(100, 100), None);
    }

    #[test]
    fn over_budget_evicts_down_to_ninety_percent() {
        assert_eq!(evict(101, 100), Some(EvictionPlan { delete_oldest: 11 }));
        assert_eq!(evict(250, 100), Some(EvictionPlan { delete_oldest: 160 }));
    }
}
