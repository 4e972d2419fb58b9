//! The device's local wall clock, for activation windows (ADR 0012): its configured IANA time
//! zone, or the system's. The window arithmetic itself is pure, in `proto::window`.

use jiff::tz::TimeZone;

use crate::config::ConfigError;

#[derive(Clone, Debug)]
pub struct LocalClock {
    zone: TimeZone,
    /// The zone as operators read it in status details ("Europe/Berlin", "system").
    name: String,
}

impl LocalClock {
    /// `name` from the config's `time_zone`, looked up in this system's time zone database; the
    /// system's own zone when absent. Blocking: reads the database.
    pub fn new(name: Option<&str>) -> Result<LocalClock, ConfigError> {
        match name {
            Some(name) => {
                let zone = TimeZone::get(name).map_err(|e| {
                    ConfigError::Invalid(format!(
                        "time_zone {name:?} is not in this system's time zone database (install tzdata, or use a name such as \"Europe/Berlin\" or \"UTC\"): {e}"
                    ))
                })?;
                Ok(LocalClock { zone, name: name.to_string() })
            }
            None => {
                let zone = TimeZone::system();
                let name = zone.iana_name().unwrap_or("system").to_string();
                Ok(LocalClock { zone, name })
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The minute of the local day (0..1440) at `unix_ms`.
    pub fn minute_of_day(&self, unix_ms: u64) -> u16 {
        let at = jiff::Timestamp::from_millisecond(unix_ms.min(i64::MAX as u64) as i64).unwrap_or(jiff::Timestamp::MAX);
        let local = at.to_zoned_datetime(self.zone.clone());
        local.hour() as u16 * 60 + local.minute() as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minute_of_day_follows_the_configured_zone() {
        // 2026-01-15 12:34 UTC.
        let noon = 1_768_480_440_000;
        assert_eq!(LocalClock::new(Some("UTC")).unwrap().minute_of_day(noon), 12 * 60 + 34);
        // Etc/GMT-6 is six hours ahead of UTC (POSIX signs are reversed).
        assert_eq!(LocalClock::new(Some("Etc/GMT-6")).unwrap().minute_of_day(noon), 18 * 60 + 34);
        // Berlin is one hour ahead in January.
        assert_eq!(LocalClock::new(Some("Europe/Berlin")).unwrap().minute_of_day(noon), 13 * 60 + 34);
    }

    #[test]
    fn an_unknown_zone_is_refused_with_a_sentence_naming_it() {
        let err = LocalClock::new(Some("Mars/Olympus_Mons")).unwrap_err().to_string();
        assert!(err.contains("\"Mars/Olympus_Mons\" is not in this system's time zone database"), "{err}");
    }
}
