//! `fleetctl drift …`: compare two data sets as the fleet would (`compare`), and read the
//! fleet's drift verdicts per model, version, cohort and window (`show`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use fleet_server::drift::report::DriftReport;
use fleetctl::drift_compare::{compare, render};
use fleetctl::table;
use proto::drift::DriftPolicy;

use crate::ServerArgs;

#[derive(Subcommand)]
pub enum DriftCommand {
    /// Run the drift path on two CSV files (header row; numeric and text columns; an empty cell
    /// is missing): the reference profile a bundle would carry, the current rows sketched on
    /// `--shards` simulated devices, merged and tested as the server does.
    Compare {
        #[arg(long)]
        reference: PathBuf,
        #[arg(long)]
        current: PathBuf,
        /// Simulated devices the current rows are split over.
        #[arg(long, default_value_t = 1)]
        shards: usize,
        /// Print {"dataset_drift", "summary_bytes", "features": [...]} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The fleet's drift of a model: per version and time bucket, the devices' windows merged
    /// and tested against the bundle's reference; which features drifted, by which test.
    Show {
        #[arg(long)]
        model: String,
        /// Only devices whose labels match, e.g. site=plant-a (several: site=a,region=eu).
        #[arg(long, default_value = "")]
        cohort: String,
        /// How far back: 30m, 24h, 7d (at most 31 days), or unix seconds.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Bucket width: hour, day, or seconds (60 to 604800).
        #[arg(long, default_value = "hour")]
        bucket: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
}

pub async fn run(command: DriftCommand) -> Result<()> {
    match command {
        DriftCommand::Compare { reference, current, shards, json } => {
            let reference_table = table::read(&reference)?;
            let current_table = table::read(&current)?;
            let result =
                compare(&reference, &reference_table, &current, &current_table, shards, &DriftPolicy::default())
                    .context("drift compare failed")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                print!("{}", render(&result));
            }
            Ok(())
        }
        DriftCommand::Show { model, cohort, since, bucket, json, server } => {
            let since_ms = since_ms(&since, fleet_server::unix_ms())?;
            let bucket_secs = match bucket.as_str() {
                "hour" => 3600,
                "day" => 86_400,
                secs => secs.parse().with_context(|| format!("--bucket {secs:?} is not hour, day or seconds"))?,
            };
            let report = server.client()?.drift(&model, &cohort, Some(since_ms), bucket_secs).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render_report(&report));
            }
            Ok(())
        }
    }
}

/// `30m`, `24h`, `7d` before `now_ms`, or unix seconds.
fn since_ms(text: &str, now_ms: u64) -> Result<u64> {
    let (number, unit_ms) = match text.char_indices().last() {
        Some((i, 'm')) => (&text[..i], 60_000),
        Some((i, 'h')) => (&text[..i], 3_600_000),
        Some((i, 'd')) => (&text[..i], 86_400_000),
        _ => return text.parse::<u64>().map(|secs| secs * 1000).with_context(|| bad_since(text)),
    };
    let count: u64 = number.parse().with_context(|| bad_since(text))?;
    if count == 0 {
        bail!("{}", bad_since(text));
    }
    Ok(now_ms.saturating_sub(count * unit_ms))
}

fn bad_since(text: &str) -> String {
    format!("--since {text:?} is neither a duration like 30m, 24h or 7d nor unix seconds")
}

fn utc(ms: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64) {
        Ok(t) => format!("{}-{:02}-{:02} {:02}:{:02}", t.year(), t.month() as u8, t.day(), t.hour(), t.minute()),
        Err(_) => ms.to_string(),
    }
}

/// How a candidate in shadow compared with the version beside it over one bucket.
fn shadow_line(bucket: String, version: &str, s: &proto::shadow::ShadowSummary) -> String {
    let classes = (s.flips.len() as f64).sqrt() as usize;
    let flips: Vec<String> = (0..classes)
        .flat_map(|a| (0..classes).map(move |b| (a, b)))
        .filter(|(a, b)| a != b && s.flips[a * classes + b] > 0)
        .map(|(a, b)| format!("{a}->{b}: {}", s.flips[a * classes + b]))
        .collect();
    let latency = s.latency_quantile_us(0.95).map_or("-".into(), |us| format!("{us:.0} us"));
    format!(
        "shadow {bucket} {} beside {version}: {} requests, agreement {}, mean |diff| {}, class flips {}, p95 {latency}, errors {}, dropped {}\n",
        s.version,
        s.rows,
        s.agreement().map_or("-".into(), |a| format!("{:.1}%", a * 100.0)),
        s.mean_abs_diff().map_or("-".into(), |d| format!("{d:.4}")),
        if flips.is_empty() { "none".to_string() } else { flips.join(", ") },
        s.errors,
        s.dropped
    )
}

fn render_report(report: &DriftReport) -> String {
    let cohort = if report.cohort.is_empty() {
        "the whole fleet".to_string()
    } else {
        report.cohort.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    };
    let mut out = format!("drift of {} for {cohort}, {} s buckets (UTC)\n", report.model, report.bucket_secs);
    out.push_str(&format!(
        "{:<17} {:<10} {:>7} {:>7} {:<8} {:<14} {:<18} drifted features (test score)\n",
        "bucket", "version", "devices", "rows", "dataset", "est. accuracy", "predictions"
    ));
    for b in &report.buckets {
        let v = &b.verdict;
        let drifted: Vec<String> = v
            .drifted_features()
            .map(|f| {
                if f.missing_drifted {
                    format!(
                        "{} (missing {:.0}% vs {:.0}%)",
                        f.name,
                        f.missing_rate * 100.0,
                        f.reference_missing_rate * 100.0
                    )
                } else {
                    format!("{} ({} {:.3})", f.name, f.test.as_str(), f.score)
                }
            })
            .collect();
        let accuracy = match (v.estimated_accuracy, v.reference_accuracy) {
            (Some(now), Some(then)) => format!("{now:.3} ({then:.3})"),
            (Some(now), None) => format!("{now:.3}"),
            _ => "-".into(),
        };
        let predictions = match &v.prediction {
            Some(p) => format!("{} {} {:.3}", if p.drifted { "SHIFT" } else { "same" }, p.test.as_str(), p.score),
            None => "-".into(),
        };
        out.push_str(&format!(
            "{:<17} {:<10} {:>7} {:>7} {:<8} {:<14} {:<18} {}\n",
            utc(b.start_ms),
            b.version,
            b.devices,
            v.rows,
            if v.dataset_drift { "YES" } else { "no" },
            accuracy,
            predictions,
            if drifted.is_empty() { "-".to_string() } else { drifted.join(", ") }
        ));
    }
    for b in report.buckets.iter().filter(|b| b.shadow.is_some()) {
        if let Some(s) = &b.shadow {
            out.push_str(&shadow_line(utc(b.start_ms), &b.version, s));
        }
    }
    if report.buckets.is_empty() {
        out.push_str("no drift windows in that time for that cohort\n");
    }
    if report.skipped_windows > 0 {
        out.push_str(&format!(
            "{} windows skipped (unreadable, or of a version without a bundle)\n",
            report.skipped_windows
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shadow_line_shows_agreement_difference_flips_latency_and_drops() {
        let mut s = proto::shadow::ShadowSummary::empty("2.0.0", 2);
        s.observe(&[0.9, 0.1], &[0.8, 0.2], 40);
        s.observe(&[0.9, 0.1], &[0.3, 0.7], 40);
        s.dropped = 3;
        let line = shadow_line("2026-12-02 05:00".into(), "1.0.0", &s);
        assert!(line.starts_with("shadow 2026-12-02 05:00 2.0.0 beside 1.0.0: 2 requests, agreement 50.0%, mean |diff| 0.3500, class flips 0->1: 1, p95 "), "{line}");
        assert!(line.ends_with("errors 0, dropped 3\n"), "{line}");
    }

    #[test]
    fn since_takes_durations_and_unix_seconds_and_says_what_it_wants_otherwise() {
        assert_eq!(since_ms("30m", 10_000_000).unwrap(), 10_000_000 - 1_800_000);
        assert_eq!(since_ms("2d", 1_000_000_000).unwrap(), 1_000_000_000 - 172_800_000);
        assert_eq!(since_ms("1700000000", 0).unwrap(), 1_700_000_000_000);
        let err = since_ms("yesterday", 0).unwrap_err().to_string();
        assert_eq!(err, "--since \"yesterday\" is neither a duration like 30m, 24h or 7d nor unix seconds");
    }
}
