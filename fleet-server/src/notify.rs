//! Desired-state notifications, sent at a steady pace, and events for the systems around the
//! fleet, over the server's MQTT session.
//!
//! A rollout wave or a deployment changes the desired state of thousands of devices in one
//! transaction, and every notified device checks in and downloads at once. Sent together, the
//! notifications came back as one burst of check-ins (fleet-load, 10,000 agents: a wave's
//! check-ins queued behind each other, client-side p99 0.4-1 s while the steady state answers
//! within 16 ms). The pacer sends at most `per_second` instead, oldest first, one per device
//! (a newer revision replaces a pending one). Pacing delays no device past its own check-in
//! interval: a device not yet notified learns its desired state when it checks in anyway.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use proto::wire::{encode, DesiredChanged, Topic};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Default notifications per second: a wave reaches 12,000 devices within a minute (the agents'
/// default check-in interval), while the check-ins and downloads it sets off stay a small share
/// of what one server answered at 10,000 agents (about 1,000 check-ins a second).
pub const DEFAULT_PER_SECOND: u32 = 200;
/// Devices waiting for a notification; past this a change is not notified (the device learns it
/// at its next check-in) and counted in `fleet_notifications_dropped_total`.
const MAX_PENDING: usize = 100_000;
/// Batches of changes waiting for the pacer (one batch per committed change).
const BATCH_QUEUE: usize = 256;
/// How often the pacer sends what its rate allows.
const PACE_TICK: Duration = Duration::from_millis(20);

/// What the pacer reports at `/metrics`; a clone shares the values.
#[derive(Clone, Default)]
pub struct NotifyMetrics {
    /// Devices whose notification waits for its turn.
    pub pending: Gauge,
    /// Changes not notified: the pacer's queue was full (the devices learn them at check-in).
    pub dropped: Counter,
}

/// Publishes desired-state notifications (paced) and events; cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    client: AsyncClient,
    changes: mpsc::Sender<Vec<(String, u64)>>,
    metrics: NotifyMetrics,
}

impl Notifier {
    /// A notifier with no broker behind it, for handler tests: every notification is dropped.
    #[cfg(test)]
    pub fn detached() -> Notifier {
        let (client, _eventloop) = AsyncClient::new(rumqttc::MqttOptions::new("detached", "127.0.0.1", 9), 1);
        let (changes, _) = mpsc::channel(1);
        Notifier { client, changes, metrics: NotifyMetrics::default() }
    }

    /// Publishes an event for the systems around the fleet (at least once, from the server's
    /// persistent session), waiting up to `within` for room in the session's queue, which the
    /// ingest's acknowledgements share.
    pub async fn publish_event(&self, topic: &str, payload: Vec<u8>, within: Duration) -> Result<(), String> {
        match tokio::time::timeout(within, self.client.publish(topic, QoS::AtLeastOnce, false, payload)).await {
            Ok(published) => published.map_err(|e| e.to_string()),
            Err(_) => Err(format!("the MQTT session had no room for {} s", within.as_secs())),
        }
    }

    /// Queues a notification to each device that its desired state changed (to this revision).
    /// Best effort: a device that misses it still checks in on its own interval.
    pub fn desired_changed(&self, revisions: Vec<(String, u64)>) {
        if revisions.is_empty() {
            return;
        }
        let count = revisions.len();
        if self.changes.try_send(revisions).is_err() {
            self.metrics.dropped.inc_by(count as u64);
            tracing::warn!(devices = count, "desired-state notifications not queued: the pacer is behind");
        }
    }
}

/// Starts the pacer on `client` (the server's MQTT session); it ends when `cancel` is cancelled.
pub fn spawn(
    client: AsyncClient,
    per_second: u32,
    metrics: NotifyMetrics,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> Notifier {
    let (changes, arrived) = mpsc::channel(BATCH_QUEUE);
    let pacer = Pacer {
        client: client.clone(),
        pending: Pending::default(),
        rate: Rate::new(per_second, Instant::now().into_std()),
        metrics: metrics.clone(),
    };
    tasks.spawn(pacer.run(arrived, cancel));
    Notifier { client, changes, metrics }
}

struct Pacer {
    client: AsyncClient,
    pending: Pending,
    rate: Rate,
    metrics: NotifyMetrics,
}

impl Pacer {
    async fn run(mut self, mut arrived: mpsc::Receiver<Vec<(String, u64)>>, cancel: CancellationToken) {
        let mut ticks = tokio::time::interval(PACE_TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                batch = arrived.recv() => {
                    let Some(batch) = batch else { break };
                    let dropped = self.pending.push_all(batch);
                    if dropped > 0 {
                        self.metrics.dropped.inc_by(dropped as u64);
                        tracing::warn!(devices = dropped, "desired-state notifications dropped: {MAX_PENDING} already wait");
                    }
                    // What the rate allows goes at once: one device's change is not delayed.
                    self.send_due();
                }
                _ = ticks.tick(), if !self.pending.is_empty() => self.send_due(),
            }
        }
    }

    fn send_due(&mut self) {
        let due = self.rate.take(Instant::now().into_std(), self.pending.len());
        for _ in 0..due {
            let Some((device, revision)) = self.pending.pop() else { break };
            let topic = Topic::Desired { device: device.clone() }.render();
            // At most once: a wave notifies thousands of devices, and at least once would hold
            // that many packet ids of the session that also acknowledges every stored report
            // (fleet-load found a wave of 500 notifications stopping all ingest at 1,000 agents).
            if self.client.try_publish(topic, QoS::AtMostOnce, false, encode(&DesiredChanged { revision })).is_err() {
                // The session's queue is full (the broker is slow or away): try again next tick.
                self.pending.push_front(device, revision);
                break;
            }
        }
        self.metrics.pending.set(self.pending.len() as i64);
    }
}

/// Devices waiting for a notification, oldest first, each once with its newest revision.
#[derive(Default)]
struct Pending {
    order: VecDeque<String>,
    revision: HashMap<String, u64>,
}

impl Pending {
    /// Queues each change; returns how many were dropped because `MAX_PENDING` already wait.
    fn push_all(&mut self, changes: Vec<(String, u64)>) -> usize {
        let mut dropped = 0;
        for (device, revision) in changes {
            if let Some(waiting) = self.revision.get_mut(&device) {
                *waiting = (*waiting).max(revision);
            } else if self.order.len() >= MAX_PENDING {
                dropped += 1;
            } else {
                self.revision.insert(device.clone(), revision);
                self.order.push_back(device);
            }
        }
        dropped
    }

    /// Puts back a change that could not be sent, to go first.
    fn push_front(&mut self, device: String, revision: u64) {
        self.revision.insert(device.clone(), revision);
        self.order.push_front(device);
    }

    fn pop(&mut self) -> Option<(String, u64)> {
        let device = self.order.pop_front()?;
        let revision = self.revision.remove(&device)?;
        Some((device, revision))
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// A token bucket: `per_second` on average, at most a tenth of a second's worth at once (a
/// paced wave does not start with a burst of its own).
struct Rate {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl Rate {
    fn new(per_second: u32, now: std::time::Instant) -> Rate {
        let per_second = f64::from(per_second.max(1));
        let burst = (per_second / 10.0).max(1.0);
        Rate { per_second, burst, tokens: burst, last: now }
    }

    /// How many of `wanted` may go now.
    fn take(&mut self, now: std::time::Instant, wanted: usize) -> usize {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        let granted = (self.tokens.floor() as usize).min(wanted);
        self.tokens -= granted as f64;
        granted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(devices: std::ops::Range<u32>, revision: u64) -> Vec<(String, u64)> {
        devices.map(|i| (format!("dev-{i}"), revision)).collect()
    }

    #[test]
    fn the_rate_allows_a_tenth_of_a_second_at_once_then_keeps_to_its_average() {
        let start = std::time::Instant::now();
        let mut rate = Rate::new(200, start);
        assert_eq!(rate.take(start, 5_000), 20, "the burst is a tenth of a second's worth");
        assert_eq!(rate.take(start, 5_000), 0, "nothing left in the same instant");
        // Over the next 10 s, in 20 ms steps: 200 a second, never more.
        let mut sent = 0;
        for step in 1..=500u32 {
            sent += rate.take(start + Duration::from_millis(20) * step, 5_000);
        }
        assert!((1_990..=2_000).contains(&sent), "{sent} sent in 10 s at 200 a second");
        // After a long quiet spell it still sends no more than the burst at once.
        assert_eq!(rate.take(start + Duration::from_secs(60), 5_000), 20);
    }

    #[test]
    fn the_rate_never_grants_more_than_is_wanted_and_keeps_the_rest() {
        let start = std::time::Instant::now();
        let mut rate = Rate::new(1_000, start);
        assert_eq!(rate.take(start, 3), 3);
        assert_eq!(rate.take(start, 1_000), 97);
    }

    #[test]
    fn a_rate_of_one_a_second_still_sends_one_at_once() {
        let start = std::time::Instant::now();
        let mut rate = Rate::new(1, start);
        assert_eq!(rate.take(start, 10), 1);
        assert_eq!(rate.take(start + Duration::from_millis(500), 10), 0);
        assert_eq!(rate.take(start + Duration::from_millis(1_000), 10), 1);
    }

    #[test]
    fn pending_devices_go_oldest_first_each_once_with_their_newest_revision() {
        let mut pending = Pending::default();
        assert_eq!(pending.push_all(changes(0..3, 7)), 0);
        assert_eq!(pending.push_all(vec![("dev-1".into(), 9), ("dev-0".into(), 5), ("dev-3".into(), 1)]), 0);
        assert_eq!(pending.len(), 4);
        let sent: Vec<_> = std::iter::from_fn(|| pending.pop()).collect();
        assert_eq!(
            sent,
            vec![("dev-0".into(), 7), ("dev-1".into(), 9), ("dev-2".into(), 7), ("dev-3".into(), 1)],
            "a newer revision replaces the waiting one in its place; an older one changes nothing"
        );
        assert!(pending.is_empty());
    }

    #[test]
    fn a_change_that_could_not_be_sent_goes_first_next_time() {
        let mut pending = Pending::default();
        pending.push_all(changes(0..2, 1));
        let (device, revision) = pending.pop().unwrap();
        pending.push_front(device, revision);
        assert_eq!(pending.pop(), Some(("dev-0".into(), 1)));
    }

    #[test]
    fn changes_past_the_limit_are_dropped_and_counted_while_waiting_ones_still_update() {
        let mut pending = Pending::default();
        let limit = MAX_PENDING as u32;
        assert_eq!(pending.push_all(changes(0..limit, 1)), 0);
        assert_eq!(pending.push_all(changes(limit - 2..limit + 3, 2)), 3);
        assert_eq!(pending.len(), MAX_PENDING);
        let last: Vec<_> = std::iter::from_fn(|| pending.pop()).skip(MAX_PENDING - 2).collect();
        assert_eq!(last, changes(limit - 2..limit, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wave_reaches_the_broker_at_the_configured_pace() {
        // A session whose event loop is never polled, with room for every request: what the
        // pacer has not sent yet is what it reports pending.
        let (client, _eventloop) = AsyncClient::new(rumqttc::MqttOptions::new("pacer-test", "127.0.0.1", 9), 10_000);
        let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
        let metrics = NotifyMetrics::default();
        let notifier = spawn(client, 100, metrics.clone(), cancel.clone(), &tasks);
        notifier.desired_changed(changes(0..1_000, 3));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(metrics.pending.get(), 990, "a tenth of a second's worth at once");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let sent = 1_000 - metrics.pending.get();
        assert!((205..=211).contains(&sent), "{sent} sent after 2 s at 100 a second");
        cancel.cancel();
        tasks.close();
        tasks.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_session_queue_keeps_the_rest_waiting_instead_of_losing_them() {
        let (client, _eventloop) = AsyncClient::new(rumqttc::MqttOptions::new("pacer-test", "127.0.0.1", 9), 5);
        let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
        let metrics = NotifyMetrics::default();
        let notifier = spawn(client, 1_000, metrics.clone(), cancel.clone(), &tasks);
        notifier.desired_changed(changes(0..50, 1));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(metrics.pending.get(), 45, "five went into the session's queue; the rest wait for room");
        assert_eq!(metrics.dropped.get(), 0);
        cancel.cancel();
        tasks.close();
        tasks.wait().await;
    }
}
