//! A candidate in shadow: its own thread and session, fed by the engine threads through a
//! bounded queue. The hot path only copies a sampled request into the queue with `try_send`
//! (a full queue drops and counts it) after the active version has answered; the shadow thread
//! runs the candidate and adds how the two outputs compare to the window's summary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use model_runtime::{LoadedModel, ModelError};
use proto::shadow::ShadowSummary;

/// Requests waiting for the shadow thread at most; more are dropped and counted.
pub const SHADOW_QUEUE: usize = 256;

struct ShadowRow {
    input: Vec<f32>,
    active: Vec<f32>,
}

/// What an engine thread holds to copy requests to the shadow: cheap to clone.
#[derive(Clone)]
pub(crate) struct ShadowTap {
    tx: SyncSender<ShadowRow>,
    pub(crate) version: Arc<str>,
    rate: f32,
    dropped: Arc<AtomicU64>,
}

impl ShadowTap {
    /// Whether this request is in the sample: `credit` (the engine thread's, per model) grows
    /// by the rate each request and a request is copied each time it reaches one, so exactly
    /// the rate's share is copied, evenly spread.
    pub(crate) fn sampled(&self, credit: &mut f32) -> bool {
        *credit += self.rate;
        if *credit >= 1.0 {
            *credit -= 1.0;
            true
        } else {
            false
        }
    }

    /// Never waits: a full queue counts a drop.
    pub(crate) fn offer(&self, input: Vec<f32>, active: Vec<f32>) {
        match self.tx.try_send(ShadowRow { input, active }) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The shadow thread of one candidate; dropping it (and every tap) ends the thread.
pub struct ShadowWorker {
    tap: ShadowTap,
    /// The window so far: written by the shadow thread per request, taken once per window. A
    /// counter merge, not shared state with logic, so a lock is the simplest hand-over.
    summary: Arc<Mutex<ShadowSummary>>,
}

impl ShadowWorker {
    /// Starts the candidate's thread with a session of its own.
    pub fn spawn(model: LoadedModel, sample_rate: f32) -> Result<ShadowWorker, ModelError> {
        let session = model.session()?;
        let classes = model.contract.output.sample_len();
        let summary = Arc::new(Mutex::new(ShadowSummary::empty(&model.version, classes)));
        let (tx, rx) = sync_channel(SHADOW_QUEUE);
        let tap = ShadowTap {
            tx,
            version: model.version.as_str().into(),
            rate: sample_rate.clamp(0.0, 1.0),
            dropped: Arc::default(),
        };
        let shared = summary.clone();
        std::thread::Builder::new()
            .name(format!("shadow-{}", model.name))
            .spawn(move || run(session, rx, shared))
            .map_err(|e| ModelError::Run(format!("cannot start the shadow thread: {e}")))?;
        Ok(ShadowWorker { tap, summary })
    }

    pub(crate) fn tap(&self) -> ShadowTap {
        self.tap.clone()
    }

    pub fn version(&self) -> &str {
        &self.tap.version
    }

    /// The window's comparison so far, and a fresh one started.
    pub fn take(&self) -> ShadowSummary {
        let mut summary = self.summary.lock().unwrap_or_else(|p| p.into_inner());
        let classes = (summary.flips.len() as f64).sqrt() as usize;
        let mut taken = std::mem::replace(&mut *summary, ShadowSummary::empty(&self.tap.version, classes));
        taken.dropped = self.tap.dropped.swap(0, Ordering::Relaxed);
        taken
    }
}

fn run(mut session: model_runtime::Session, rx: Receiver<ShadowRow>, summary: Arc<Mutex<ShadowSummary>>) {
    while let Ok(row) = rx.recv() {
        let started = Instant::now();
        let answer = session.run(&row.input);
        let latency_us = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
        let mut summary = summary.lock().unwrap_or_else(|p| p.into_inner());
        match answer {
            Ok(output) => summary.observe(&row.active, &output, latency_us),
            Err(_) => summary.errors += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tap(queue: usize, rate: f32) -> (ShadowTap, Receiver<ShadowRow>) {
        let (tx, rx) = sync_channel(queue);
        (ShadowTap { tx, version: "2.0.0".into(), rate, dropped: Arc::default() }, rx)
    }

    #[test]
    fn a_full_shadow_queue_drops_and_counts_instead_of_waiting() {
        let (tap, rx) = tap(2, 1.0);
        for _ in 0..5 {
            tap.offer(vec![0.0], vec![1.0]);
        }
        assert_eq!(tap.dropped.load(Ordering::Relaxed), 3);
        assert_eq!(rx.try_iter().count(), 2, "the queue kept what fit");
        drop(rx);
        tap.offer(vec![0.0], vec![1.0]);
        assert_eq!(tap.dropped.load(Ordering::Relaxed), 4, "a stopped shadow thread counts a drop too");
    }

    #[test]
    fn sampling_copies_the_rates_share_of_requests_evenly() {
        let (tap, _rx) = tap(1, 0.1);
        let mut credit = 0.0;
        let picked: Vec<usize> = (0..1000).filter(|_| tap.sampled(&mut credit)).collect();
        assert!((99..=101).contains(&picked.len()), "{}", picked.len());
        assert!(picked.windows(2).all(|w| (9..=11).contains(&(w[1] - w[0]))), "evenly spread: {picked:?}");
    }
}
