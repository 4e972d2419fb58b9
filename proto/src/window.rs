//! Maintenance windows (ADR 0012): a rollout may say "download now, activate only between 02:00
//! and 04:00" in each device's own time zone. The window travels in the plan and in the desired
//! state; the device reads its local clock and this arithmetic decides. Pure: the caller passes
//! the minute of the day.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Minutes in a day.
pub const MINUTES_PER_DAY: u16 = 24 * 60;

/// A daily window `[start, end)` in the device's local time, as "HH:MM". An end before the start
/// spans midnight ("22:00" to "02:00"); an equal start and end is the whole day.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ActivationWindow {
    pub start: String,
    pub end: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WindowError {
    #[error("activation window time {0:?} is not a 24-hour time written HH:MM, e.g. \"02:00\" or \"23:30\"")]
    Time(String),
}

impl ActivationWindow {
    pub fn new(start: &str, end: &str) -> ActivationWindow {
        ActivationWindow { start: start.into(), end: end.into() }
    }

    /// Both ends as minutes of the day.
    pub fn minutes(&self) -> Result<(u16, u16), WindowError> {
        Ok((minute_of(&self.start)?, minute_of(&self.end)?))
    }

    pub fn validate(&self) -> Result<(), WindowError> {
        self.minutes().map(|_| ())
    }

    /// Whether `minute` (of the local day, 0..1440) falls inside the window.
    pub fn contains(&self, minute: u16) -> Result<bool, WindowError> {
        let (start, end) = self.minutes()?;
        let minute = minute % MINUTES_PER_DAY;
        Ok(match start.cmp(&end) {
            std::cmp::Ordering::Equal => true,
            std::cmp::Ordering::Less => (start..end).contains(&minute),
            std::cmp::Ordering::Greater => minute >= start || minute < end,
        })
    }

    /// Minutes from `minute` until the window next opens (0 when it is open).
    pub fn minutes_until_open(&self, minute: u16) -> Result<u16, WindowError> {
        if self.contains(minute)? {
            return Ok(0);
        }
        let (start, _) = self.minutes()?;
        let minute = minute % MINUTES_PER_DAY;
        Ok((start + MINUTES_PER_DAY - minute) % MINUTES_PER_DAY)
    }
}

impl std::fmt::Display for ActivationWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// "HH:MM" (two digits each, 00:00 to 23:59) as minutes of the day.
fn minute_of(text: &str) -> Result<u16, WindowError> {
    let bad = || WindowError::Time(text.to_string());
    let bytes = text.as_bytes();
    if bytes.len() != 5 || bytes[2] != b':' || !bytes.iter().enumerate().all(|(i, b)| i == 2 || b.is_ascii_digit()) {
        return Err(bad());
    }
    let hours: u16 = text[..2].parse().map_err(|_| bad())?;
    let minutes: u16 = text[3..].parse().map_err(|_| bad())?;
    if hours > 23 || minutes > 59 {
        return Err(bad());
    }
    Ok(hours * 60 + minutes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(hhmm: &str) -> u16 {
        minute_of(hhmm).unwrap()
    }

    #[test]
    fn a_window_within_one_day_holds_its_start_but_not_its_end() {
        let w = ActivationWindow::new("02:00", "04:00");
        assert!(!w.contains(at("01:59")).unwrap());
        assert!(w.contains(at("02:00")).unwrap());
        assert!(w.contains(at("03:59")).unwrap());
        assert!(!w.contains(at("04:00")).unwrap());
        assert!(!w.contains(at("12:00")).unwrap());
    }

    #[test]
    fn a_window_ending_before_it_starts_spans_midnight() {
        let w = ActivationWindow::new("22:30", "01:15");
        assert!(w.contains(at("22:30")).unwrap());
        assert!(w.contains(at("23:59")).unwrap());
        assert!(w.contains(at("00:00")).unwrap());
        assert!(w.contains(at("01:14")).unwrap());
        assert!(!w.contains(at("01:15")).unwrap());
        assert!(!w.contains(at("22:29")).unwrap());
        assert!(!w.contains(at("12:00")).unwrap());
    }

    #[test]
    fn equal_start_and_end_is_the_whole_day() {
        let w = ActivationWindow::new("05:00", "05:00");
        assert!((0..MINUTES_PER_DAY).all(|m| w.contains(m).unwrap()));
    }

    #[test]
    fn minutes_until_open_count_forward_across_midnight() {
        let w = ActivationWindow::new("02:00", "04:00");
        assert_eq!(w.minutes_until_open(at("01:00")).unwrap(), 60);
        assert_eq!(w.minutes_until_open(at("03:00")).unwrap(), 0);
        assert_eq!(w.minutes_until_open(at("04:00")).unwrap(), 22 * 60);
        assert_eq!(w.minutes_until_open(at("23:30")).unwrap(), 150);
    }

    #[test]
    fn malformed_times_are_refused_with_the_text_that_was_wrong() {
        for bad in ["2:00", "24:00", "12:60", "12-00", "", "ab:cd", "02:00 ", "+1:00", "0x:10"] {
            let w = ActivationWindow::new(bad, "04:00");
            assert_eq!(w.validate(), Err(WindowError::Time(bad.to_string())), "{bad:?}");
            assert!(w.contains(0).is_err());
        }
        assert!(ActivationWindow::new("00:00", "23:59").validate().is_ok());
    }
}
