//! How long a published record waits for the server's acknowledgement before it is sent again,
//! learnt from how long acknowledgements take (after RFC 6298, TCP's retransmission timer).
//!
//! A fixed wait fails under load: when the server stores more slowly than devices publish, its
//! acknowledgements come later than the wait, every record is sent again, and the server spends
//! its time recognising duplicates instead of storing what is new, which makes it slower still.
//! Measured at 200 agents on two cores: 190 duplicates a second against 25 records stored, and
//! no drift window newer than the rollout reached the server in eight minutes. With the wait
//! following the measured delay, a busy server is waited for instead of buried.

use std::time::Duration;

/// The longest wait learnt, however slow acknowledgements become, and the longest a record
/// waits between two sends whatever its backoff (unless the configured wait is longer).
pub const MAX_ACK_TIMEOUT: Duration = Duration::from_secs(600);

/// A record sent again waits twice as long for its acknowledgement each time, up to this factor.
pub const MAX_BACKOFF_FACTOR: u32 = 16;

/// The acknowledgement delay seen so far: a smoothed mean and mean deviation.
#[derive(Clone, Debug)]
pub struct AckTimer {
    /// The configured wait: the least it waits, and the wait before any acknowledgement.
    floor: Duration,
    smoothed: Option<Duration>,
    deviation: Duration,
}

impl AckTimer {
    pub fn new(floor: Duration) -> AckTimer {
        AckTimer { floor, smoothed: None, deviation: Duration::ZERO }
    }

    /// Takes in one record's delay from its first publish to its acknowledgement. For a record
    /// sent more than once this is at most the delay of any one copy too long, never too short,
    /// so the wait errs towards patience (TCP skips such samples, which under a steady overload
    /// would leave it no sample at all).
    pub fn observe(&mut self, delay: Duration) {
        let delay = delay.min(MAX_ACK_TIMEOUT);
        match self.smoothed {
            None => {
                self.smoothed = Some(delay);
                self.deviation = delay / 2;
            }
            Some(smoothed) => {
                let difference = delay.abs_diff(smoothed);
                self.deviation = self.deviation * 3 / 4 + difference / 4;
                self.smoothed = Some(smoothed * 7 / 8 + delay / 8);
            }
        }
    }

    /// The wait for a record's first send: the smoothed delay plus four deviations, at least the
    /// configured wait, at most [`MAX_ACK_TIMEOUT`].
    pub fn timeout(&self) -> Duration {
        let learnt = self.smoothed.map_or(Duration::ZERO, |smoothed| smoothed + self.deviation * 4);
        learnt.clamp(self.floor, self.ceiling())
    }

    /// The wait after a record's `sends`-th send: [`AckTimer::timeout`] doubled for each send
    /// before it, up to [`MAX_BACKOFF_FACTOR`] times, and never over [`MAX_ACK_TIMEOUT`] (or the
    /// configured wait, if longer), so a record whose acknowledgement was lost goes again within
    /// ten minutes however slow acknowledgements have been.
    pub fn wait(&self, sends: u32) -> Duration {
        let factor = 2u32.saturating_pow(sends.saturating_sub(1)).min(MAX_BACKOFF_FACTOR);
        (self.timeout() * factor).min(self.ceiling())
    }

    fn ceiling(&self) -> Duration {
        MAX_ACK_TIMEOUT.max(self.floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: Duration = Duration::from_secs(3);

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn before_any_acknowledgement_and_while_they_are_quick_it_waits_the_configured_time() {
        let mut timer = AckTimer::new(FLOOR);
        assert_eq!(timer.timeout(), FLOOR);
        for _ in 0..50 {
            timer.observe(secs(0.02));
        }
        assert_eq!(timer.timeout(), FLOOR);
    }

    #[test]
    fn acknowledgements_slower_than_the_configured_time_lengthen_the_wait_beyond_them() {
        let mut timer = AckTimer::new(FLOOR);
        for _ in 0..5 {
            timer.observe(secs(0.05));
        }
        // A server falling behind: acknowledgements take 30 s.
        timer.observe(secs(30.0));
        assert!(timer.timeout() > secs(30.0), "one slow acknowledgement: {:?}", timer.timeout());
        for _ in 0..40 {
            timer.observe(secs(30.0));
        }
        let steady = timer.timeout();
        assert!(steady > secs(30.0) && steady < secs(36.0), "settled near the delay: {steady:?}");
    }

    #[test]
    fn the_wait_comes_back_down_when_the_server_catches_up() {
        let mut timer = AckTimer::new(FLOOR);
        for _ in 0..20 {
            timer.observe(secs(40.0));
        }
        for _ in 0..60 {
            timer.observe(secs(0.1));
        }
        assert_eq!(timer.timeout(), FLOOR);
    }

    #[test]
    fn each_send_doubles_the_wait_up_to_the_factor_and_the_ceiling() {
        let mut timer = AckTimer::new(FLOOR);
        let waits: Vec<Duration> = (1..=6).map(|sends| timer.wait(sends)).collect();
        assert_eq!(waits, [3.0, 6.0, 12.0, 24.0, 48.0, 48.0].map(secs));
        for _ in 0..40 {
            timer.observe(secs(100.0));
        }
        assert_eq!(timer.wait(1), timer.timeout());
        assert_eq!(timer.wait(5), MAX_ACK_TIMEOUT, "a slow server's backoff stops at the ceiling");
    }

    #[test]
    fn the_wait_never_exceeds_the_ceiling_nor_goes_below_a_floor_above_it() {
        let mut timer = AckTimer::new(FLOOR);
        for _ in 0..10 {
            timer.observe(secs(100_000.0));
        }
        assert_eq!(timer.timeout(), MAX_ACK_TIMEOUT);
        let patient = AckTimer::new(secs(900.0));
        assert_eq!(patient.timeout(), secs(900.0), "a configured wait above the ceiling is kept");
    }
}
