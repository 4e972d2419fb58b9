//! The delivery half of the PostgreSQL store: sequenced reports stored at most once (a
//! `received` entry per (device, seq), forgotten below the device's floor), per-device delivery
//! counters, and uploaded telemetry. Same statements as `sqlite_delivery.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use postgres::{Client, GenericClient, Transaction};
use proto::delivery::{DeliveryEvent, DeliveryView, Evicted, TelemetryAck, TelemetryRow};

use super::devices::{drifts_into, heartbeats_into, status_into};
use super::prepared::{PgConn, Prepared};
use crate::store::{Accepted, Pruned, Report, SequencedReport, StoreError, StoredTelemetry, TelemetryQuery};

/// Stores a batch of sequenced reports in one transaction, with the outcomes they would have
/// one by one in order. One commit for the whole batch is what lets the server keep up with a
/// site draining its backlog; and what every report needs (is the device known, its floor, was
/// (device, seq) received before, its counters) is one statement for the whole batch, so that
/// only each report's own rows take statements of their own, prepared once per connection: a
/// report costs two or three round trips where it cost sixteen.
pub fn record_reports(conn: &mut PgConn, reports: &[SequencedReport<'_>]) -> Result<Vec<Accepted>, StoreError> {
    let devices: Vec<&str> = reports.iter().map(|r| r.device).collect::<BTreeSet<_>>().into_iter().collect();
    let (mut tx, statements) = conn.transaction_and_statements()?;
    let mut prepared = Prepared::new(&mut tx, statements);
    let floors = lock_ingest(&mut prepared, &devices)?;
    let (candidate_devices, candidate_seqs): (Vec<&str>, Vec<i64>) = candidates(reports, &floors).into_iter().unzip();
    let newly_received = prepared
        .query(
            "INSERT INTO received (device, seq) SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[])
             ON CONFLICT DO NOTHING RETURNING device, seq",
            &[&candidate_devices, &candidate_seqs],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<HashSet<(String, i64)>, StoreError>>()?;
    let settled = settle(reports, &floors, &newly_received);
    // Heartbeats and windows are written a statement per table for the whole batch (its rows
    // stay locked until the commit). A status goes one by one, after the pending
    // heartbeats of its device: both write a model's active version, and the later must win.
    let (mut heartbeats, mut windows) = (Vec::new(), Vec::new());
    let mut pending = HashSet::new();
    for (r, accepted) in reports.iter().zip(&settled.accepted) {
        if *accepted != Accepted::Stored {
            continue;
        }
        match &r.report {
            Report::Status(status) => {
                if pending.contains(r.device) {
                    heartbeats_into(&mut prepared, &std::mem::take(&mut heartbeats))?;
                    pending.clear();
                }
                status_into(&mut prepared, r.device, status)?;
            }
            Report::Heartbeat(heartbeat) => {
                pending.insert(r.device);
                heartbeats.push((r.device, *heartbeat));
            }
            Report::Drift(drift) => windows.push((r.device, drift)),
            // Counted below with the other counters.
            Report::Event(DeliveryEvent::Evicted { .. }) => {}
        }
    }
    heartbeats_into(&mut prepared, &heartbeats)?;
    drifts_into(&mut prepared, &windows)?;
    write_counters(&mut prepared, &settled.counters)?;
    tx.commit()?;
    Ok(settled.accepted)
}

/// Takes the ingest's lock on each of `devices` that is enrolled, in the order of their ids, and
/// returns their floors: the lock is the device's `delivery` row, created here if it is missing.
/// Every transaction that writes what a device reports (an ingest batch, a single heartbeat or
/// status) takes it first, so no two of them wait for each other in a cycle, whatever their
/// order of reports, and none of them locks a `devices` row, which check-ins update: a batch
/// used to lock its devices' rows for its whole length, and check-ins queued behind it
/// (docs/BENCHMARKS.md, "Device rows out of ingest batches").
pub fn lock_ingest(
    conn: &mut Prepared<'_, impl GenericClient>,
    devices: &[&str],
) -> Result<HashMap<String, i64>, StoreError> {
    conn.execute(
        "INSERT INTO delivery (device) SELECT id FROM devices WHERE id = ANY($1) ORDER BY id ON CONFLICT DO NOTHING",
        &[&devices],
    )?;
    conn.query(
        "SELECT delivery.device, delivery.floor FROM delivery JOIN devices ON devices.id = delivery.device
         WHERE delivery.device = ANY($1) ORDER BY delivery.device FOR NO KEY UPDATE OF delivery",
        &[&devices],
    )?
    .iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .collect()
}

/// Each (device, seq) of a known device at or above its stored floor, once: the rows to try
/// in `received`.
fn candidates<'a>(reports: &[SequencedReport<'a>], floors: &HashMap<String, i64>) -> Vec<(&'a str, i64)> {
    let mut seen = HashSet::new();
    reports
        .iter()
        .filter(|r| floors.get(r.device).is_some_and(|floor| r.seq as i64 >= *floor))
        .map(|r| (r.device, r.seq as i64))
        .filter(|pair| seen.insert(*pair))
        .collect()
}

/// A device's counters moved by one batch.
#[derive(Debug, Default, PartialEq)]
struct Moved {
    stored: i64,
    duplicates: i64,
    evicted: Evicted,
    /// The floor after the batch, and whether a stored report moved it.
    floor: i64,
    floor_moved: bool,
}

/// What became of each report of a batch and what it does to each device's counters.
#[derive(Debug)]
struct Settled<'a> {
    accepted: Vec<Accepted>,
    counters: BTreeMap<&'a str, Moved>,
}

/// The outcome of each report as if the batch were stored one report at a time, in order:
/// unknown device; a duplicate if below the floor as it stands at that report (a stored report
/// earlier in the batch may have moved it), received before this batch, or repeated within it;
/// stored otherwise. `newly_received` holds the candidates `received` did not have yet.
fn settle<'a>(
    reports: &[SequencedReport<'a>],
    floors: &HashMap<String, i64>,
    newly_received: &HashSet<(String, i64)>,
) -> Settled<'a> {
    let mut taken = HashSet::new();
    let mut counters: BTreeMap<&str, Moved> = BTreeMap::new();
    let accepted = reports
        .iter()
        .map(|r| {
            let Some(stored_floor) = floors.get(r.device) else {
                return Accepted::UnknownDevice;
            };
            let moved = counters.entry(r.device).or_insert_with(|| Moved { floor: *stored_floor, ..Moved::default() });
            let seq = r.seq as i64;
            let new = seq >= moved.floor
                && newly_received.contains(&(r.device.to_owned(), seq))
                && taken.insert((r.device, seq));
            if !new {
                moved.duplicates += 1;
                return Accepted::Duplicate;
            }
            moved.stored += 1;
            if let Report::Event(DeliveryEvent::Evicted { evicted, .. }) = r.report {
                moved.evicted.telemetry += evicted.telemetry;
                moved.evicted.heartbeats += evicted.heartbeats;
                moved.evicted.reports += evicted.reports;
            }
            if r.floor as i64 > moved.floor {
                moved.floor = r.floor as i64;
                moved.floor_moved = true;
            }
            Accepted::Stored
        })
        .collect();
    Settled { accepted, counters }
}

/// Adds a batch's counters to every device's in one statement, moves floors up (never down:
/// another server may have moved one further meanwhile) and forgets what is received below them.
fn write_counters(
    prepared: &mut Prepared<'_, Transaction<'_>>,
    counters: &BTreeMap<&str, Moved>,
) -> Result<(), StoreError> {
    let column = |f: fn(&Moved) -> i64| counters.values().map(f).collect::<Vec<i64>>();
    let devices: Vec<&str> = counters.keys().copied().collect();
    prepared.execute(
        "UPDATE delivery SET reports_stored = reports_stored + u.stored,
           reports_duplicates = reports_duplicates + u.duplicates,
           evicted_telemetry = evicted_telemetry + u.telemetry, evicted_heartbeats = evicted_heartbeats + u.heartbeats,
           evicted_reports = evicted_reports + u.reports, floor = GREATEST(delivery.floor, u.floor)
         FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[], $7::BIGINT[])
           AS u(device, stored, duplicates, telemetry, heartbeats, reports, floor)
         WHERE delivery.device = u.device",
        &[
            &devices,
            &column(|m| m.stored),
            &column(|m| m.duplicates),
            &column(|m| m.evicted.telemetry as i64),
            &column(|m| m.evicted.heartbeats as i64),
            &column(|m| m.evicted.reports as i64),
            &column(|m| m.floor),
        ],
    )?;
    let (floored, floors): (Vec<&str>, Vec<i64>) =
        counters.iter().filter(|(_, m)| m.floor_moved).map(|(device, m)| (*device, m.floor)).unzip();
    if !floored.is_empty() {
        prepared.execute(
            "DELETE FROM received USING UNNEST($1::TEXT[], $2::BIGINT[]) AS u(device, floor)
             WHERE received.device = u.device AND received.seq < u.floor",
            &[&floored, &floors],
        )?;
    }
    Ok(())
}

pub fn record_telemetry(conn: &mut Client, device: &str, rows: &[TelemetryRow]) -> Result<TelemetryAck, StoreError> {
    let mut tx = conn.transaction()?;
    let mut ack = TelemetryAck::default();
    let insert = tx.prepare(
        "INSERT INTO telemetry (device, seq, model, version, at_ms, latency_us, features, outputs, received_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
    )?;
    let received_ms = crate::unix_ms() as i64;
    for r in rows {
        let inserted = tx.execute(
            &insert,
            &[
                &device,
                &(r.seq as i64),
                &r.model,
                &r.version,
                &(r.at_ms as i64),
                &i64::from(r.latency_us),
                &f32s(&r.features),
                &f32s(&r.outputs),
                &received_ms,
            ],
        )?;
        if inserted == 1 {
            ack.stored += 1;
        } else {
            ack.duplicates += 1;
        }
        ack.through = ack.through.max(r.seq);
    }
    tx.execute("INSERT INTO delivery (device) VALUES ($1) ON CONFLICT DO NOTHING", &[&device])?;
    tx.execute(
        "UPDATE delivery SET telemetry_stored = telemetry_stored + $2, telemetry_duplicates = telemetry_duplicates + $3
         WHERE device = $1",
        &[&device, &(ack.stored as i64), &(ack.duplicates as i64)],
    )?;
    tx.commit()?;
    Ok(ack)
}

fn f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn from_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

pub fn telemetry(conn: &mut Client, q: &TelemetryQuery) -> Result<Vec<StoredTelemetry>, StoreError> {
    let (after_device, after_seq) = q.after.clone().unwrap_or_default();
    let rows = conn.query(
        "SELECT device, seq, model, version, at_ms, latency_us, features, outputs FROM telemetry
         WHERE model = $1 AND ($2::TEXT IS NULL OR version = $2) AND at_ms >= $3 AND (device, seq) > ($4, $5)
         ORDER BY device, seq LIMIT $6",
        &[
            &q.model,
            &q.version,
            &(q.since_ms.unwrap_or(0) as i64),
            &after_device,
            &(after_seq as i64),
            &(q.limit as i64),
        ],
    )?;
    rows.iter()
        .map(|r| {
            Ok(StoredTelemetry {
                device: r.try_get(0)?,
                row: TelemetryRow {
                    seq: r.try_get::<_, i64>(1)? as u64,
                    model: r.try_get(2)?,
                    version: r.try_get(3)?,
                    at_ms: r.try_get::<_, i64>(4)? as u64,
                    // Written from a u32.
                    latency_us: r.try_get::<_, i64>(5)? as u32,
                    features: from_f32s(r.try_get(6)?),
                    outputs: from_f32s(r.try_get(7)?),
                },
            })
        })
        .collect()
}

pub fn views(conn: &mut Client) -> Result<Vec<DeliveryView>, StoreError> {
    let rows = conn.query(
        "SELECT d.id, COALESCE(reports_stored, 0), COALESCE(reports_duplicates, 0), COALESCE(telemetry_stored, 0),
                COALESCE(telemetry_duplicates, 0), COALESCE(evicted_telemetry, 0), COALESCE(evicted_heartbeats, 0),
                COALESCE(evicted_reports, 0), COALESCE(rejected, 0)
         FROM devices d LEFT JOIN delivery ON delivery.device = d.id ORDER BY d.name, d.id",
        &[],
    )?;
    rows.iter()
        .map(|r| {
            let n = |i| r.try_get::<_, i64>(i).map(|v| v as u64);
            Ok(DeliveryView {
                device: r.try_get(0)?,
                reports_stored: n(1)?,
                reports_duplicates: n(2)?,
                telemetry_stored: n(3)?,
                telemetry_duplicates: n(4)?,
                evicted: Evicted { telemetry: n(5)?, heartbeats: n(6)?, reports: n(7)? },
                rejected: n(8)?,
            })
        })
        .collect()
}

/// Deletes at most `limit` drift windows and `limit` telemetry rows stored before `before_ms`
/// (found through the `received_ms` indexes, deleted by row address).
pub fn prune(conn: &mut Client, before_ms: u64, limit: usize) -> Result<Pruned, StoreError> {
    let mut tx = conn.transaction()?;
    let bounds: [&(dyn postgres::types::ToSql + Sync); 2] = [&(before_ms as i64), &(limit as i64)];
    let drift_windows = tx.execute(
        "DELETE FROM drift WHERE ctid = ANY(ARRAY(SELECT ctid FROM drift WHERE received_ms < $1 LIMIT $2))",
        &bounds,
    )? as usize;
    let telemetry_rows = tx.execute(
        "DELETE FROM telemetry WHERE ctid = ANY(ARRAY(SELECT ctid FROM telemetry WHERE received_ms < $1 LIMIT $2))",
        &bounds,
    )? as usize;
    tx.commit()?;
    Ok(Pruned { drift_windows, telemetry_rows })
}

#[cfg(test)]
mod tests {
    use proto::wire::Heartbeat;

    use super::*;

    fn heartbeat() -> Heartbeat {
        Heartbeat { at_ms: 1, uptime_secs: 1, health: Default::default(), models: Vec::new() }
    }

    #[test]
    fn a_batch_settles_as_its_reports_would_one_by_one() {
        let hb = heartbeat();
        let report = |device, seq, floor| SequencedReport { device, seq, floor, report: Report::Heartbeat(&hb) };
        let batch = [
            report("d1", 4, 4),
            report("d1", 4, 4),
            report("nobody", 1, 1),
            report("d1", 9, 8),
            report("d1", 6, 4),
            report("d2", 2, 1),
            report("d2", 1, 1),
        ];
        let floors = HashMap::from([("d1".to_owned(), 3), ("d2".to_owned(), 1)]);
        let offered = candidates(&batch, &floors);
        assert_eq!(offered, vec![("d1", 4), ("d1", 9), ("d1", 6), ("d2", 2), ("d2", 1)]);
        // d2's 1 was received by an earlier batch.
        let newly_received: HashSet<(String, i64)> =
            offered.iter().filter(|pair| **pair != ("d2", 1)).map(|(d, s)| (d.to_string(), *s)).collect();
        let settled = settle(&batch, &floors, &newly_received);
        use Accepted::{Duplicate, Stored, UnknownDevice};
        assert_eq!(settled.accepted, vec![Stored, Duplicate, UnknownDevice, Stored, Duplicate, Stored, Duplicate]);
        let d1 = &settled.counters["d1"];
        assert_eq!((d1.stored, d1.duplicates, d1.floor, d1.floor_moved), (2, 2, 8, true));
        let d2 = &settled.counters["d2"];
        assert_eq!((d2.stored, d2.duplicates, d2.floor, d2.floor_moved), (1, 1, 1, false));
        assert!(!settled.counters.contains_key("nobody"));
    }
}
