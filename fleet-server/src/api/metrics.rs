//! Prometheus metrics at `GET /metrics` (a viewer's token, as every read): API latency per route
//! from a middleware, and what the store holds read at each scrape (devices by state, rollouts
//! by phase, reports and telemetry stored, redeliveries dropped, rejected signatures, evictions
//! devices reported). Totals from the store are monotonic counters: `rate()` of
//! `fleet_reports_stored_total` is the ingest rate.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use proto::wire::Role;

use super::{blocking, ApiError, AppState};

/// A device not heard from for this long counts as offline.
pub const ONLINE_WINDOW_MS: u64 = 5 * 60 * 1000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    method: String,
    route: String,
    status: u16,
}

/// The metrics the server keeps between scrapes: a clone shares them (the family is reference
/// counted), so every request and the scrape see the same histograms.
#[derive(Clone)]
pub struct ApiMetrics {
    latency: Family<RouteLabels, Histogram>,
    /// The rollout driver's ticks over every running rollout (the driver observes into a clone).
    pub rollout_tick: Histogram,
    /// 1 while this server holds the named lease (`crate::lease`), else 0.
    pub leases_held: Family<LeaseLabels, Gauge>,
    /// The desired-state notification pacer's queue and drops.
    pub notifications: crate::notify::NotifyMetrics,
    /// Rows deleted by retention.
    pub retention: crate::retention::RetentionMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    pub lease: String,
}

impl ApiMetrics {
    /// The gauge a [`crate::lease::Lease`] named `lease` keeps.
    pub fn lease_held(&self, lease: &str) -> Gauge {
        self.leases_held.get_or_create(&LeaseLabels { lease: lease.to_string() }).clone()
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics {
            // 0.5 ms to ~8 s.
            latency: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 15))),
            // 1 ms to ~16 s.
            rollout_tick: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            leases_held: Family::default(),
            notifications: Default::default(),
            retention: Default::default(),
        }
    }
}

/// Times every request by its route pattern (never the raw path: ids would explode the labels).
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let labels = RouteLabels { method, route, status: response.status().as_u16() };
    state.metrics.latency.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    response
}

/// What the store holds, read once per scrape.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StoreSnapshot {
    pub devices_online: u64,
    pub devices_offline: u64,
    pub devices_revoked: u64,
    /// (phase, count), every phase listed.
    pub rollouts: Vec<(&'static str, u64)>,
    pub reports_stored: u64,
    pub reports_duplicates: u64,
    pub reports_rejected: u64,
    pub telemetry_stored: u64,
    pub telemetry_duplicates: u64,
    pub evicted_telemetry: u64,
    pub evicted_heartbeats: u64,
    pub evicted_reports: u64,
}

impl StoreSnapshot {
    pub fn read(store: &dyn crate::store::Store, now_ms: u64) -> Result<StoreSnapshot, crate::store::StoreError> {
        use crate::rollout::Phase;
        let mut s = StoreSnapshot::default();
        for device in store.list_devices()? {
            if device.revoked_ms.is_some() {
                s.devices_revoked += 1;
            } else if device.last_seen_ms.is_some_and(|at| now_ms.saturating_sub(at) < ONLINE_WINDOW_MS) {
                s.devices_online += 1;
            } else {
                s.devices_offline += 1;
            }
        }
        let counted = store.rollout_phases()?;
        let count_of = |phase: Phase| counted.iter().find(|(p, _)| *p == phase).map_or(0, |(_, count)| *count);
        s.rollouts = Phase::ALL.iter().map(|p| (p.as_str(), count_of(*p))).collect();
        for d in store.delivery()? {
            s.reports_stored += d.reports_stored;
            s.reports_duplicates += d.reports_duplicates;
            s.reports_rejected += d.rejected;
            s.telemetry_stored += d.telemetry_stored;
            s.telemetry_duplicates += d.telemetry_duplicates;
            s.evicted_telemetry += d.evicted.telemetry;
            s.evicted_heartbeats += d.evicted.heartbeats;
            s.evicted_reports += d.evicted.reports;
        }
        Ok(s)
    }
}

impl Collector for StoreSnapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut devices =
            encoder.encode_descriptor("fleet_devices", "Enrolled devices by state", None, MetricType::Gauge)?;
        for (state, n) in
            [("online", self.devices_online), ("offline", self.devices_offline), ("revoked", self.devices_revoked)]
        {
            ConstGauge::new(n as i64).encode(devices.encode_family(&[("state", state)])?)?;
        }
        let mut rollouts = encoder.encode_descriptor("fleet_rollouts", "Rollouts by phase", None, MetricType::Gauge)?;
        for (phase, n) in &self.rollouts {
            ConstGauge::new(*n as i64).encode(rollouts.encode_family(&[("phase", *phase)])?)?;
        }
        let counters = [
            ("fleet_reports_stored", "Device reports stored (each sequence once)", self.reports_stored),
            ("fleet_reports_duplicates", "Device reports received again and dropped", self.reports_duplicates),
            ("fleet_reports_rejected", "Device reports whose signature did not verify, dropped", self.reports_rejected),
            ("fleet_telemetry_rows_stored", "Telemetry rows stored", self.telemetry_stored),
            ("fleet_telemetry_rows_duplicates", "Telemetry rows received again and dropped", self.telemetry_duplicates),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let mut evicted = encoder.encode_descriptor(
            "fleet_device_evictions",
            "Records devices evicted from their buffers before sending, by kind (as they reported)",
            None,
            MetricType::Counter,
        )?;
        for (kind, n) in [
            ("telemetry", self.evicted_telemetry),
            ("heartbeats", self.evicted_heartbeats),
            ("reports", self.evicted_reports),
        ] {
            ConstCounter::new(n).encode(evicted.encode_family(&[("kind", kind)])?)?;
        }
        Ok(())
    }
}

/// Renders the text exposition of the API latencies and a store snapshot.
pub fn render(metrics: &ApiMetrics, snapshot: StoreSnapshot) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register(
        "fleet_api_request_duration_seconds",
        "API request latency by method, route pattern and status",
        metrics.latency.clone(),
    );
    registry.register(
        "fleet_rollout_tick_duration_seconds",
        "How long one rollout driver tick over every running rollout takes",
        metrics.rollout_tick.clone(),
    );
    registry.register(
        "fleet_lease_held",
        "1 while this server holds the lease (of several servers on one database, the one that does this work)",
        metrics.leases_held.clone(),
    );
    registry.register(
        "fleet_notifications_pending",
        "Devices whose desired-state notification waits for its turn (notifications are paced)",
        metrics.notifications.pending.clone(),
    );
    registry.register(
        "fleet_notifications_dropped",
        "Desired-state changes not notified because the pacer's queue was full (devices learn them at check-in)",
        metrics.notifications.dropped.clone(),
    );
    registry.register(
        "fleet_retention_deleted_drift_windows",
        "Drift windows deleted by retention since this server started (--retention-days)",
        metrics.retention.drift_windows.clone(),
    );
    registry.register(
        "fleet_retention_deleted_telemetry_rows",
        "Telemetry rows deleted by retention since this server started (--retention-days)",
        metrics.retention.telemetry_rows.clone(),
    );
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

pub async fn scrape(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    state.require(&headers, Role::Viewer).await?;
    let now = crate::unix_ms();
    let snapshot = blocking(&state, move |s| StoreSnapshot::read(s, now)).await?;
    let text = render(&state.metrics, snapshot).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_names_every_state_phase_and_total_with_the_route_latencies() {
        let metrics = ApiMetrics::default();
        let labels = RouteLabels { method: "GET".into(), route: "/api/v1/devices".into(), status: 200 };
        metrics.latency.get_or_create(&labels).observe(0.003);
        metrics.notifications.pending.set(42);
        metrics.notifications.dropped.inc_by(5);
        metrics.retention.telemetry_rows.inc_by(9);
        let snapshot = StoreSnapshot {
            devices_online: 3,
            devices_offline: 1,
            rollouts: vec![("running", 1), ("completed", 2)],
            reports_stored: 120,
            reports_rejected: 4,
            evicted_telemetry: 7,
            ..Default::default()
        };
        let text = render(&metrics, snapshot).unwrap();
        for line in [
            "fleet_devices{state=\"online\"} 3",
            "fleet_devices{state=\"revoked\"} 0",
            "fleet_rollouts{phase=\"completed\"} 2",
            "fleet_reports_stored_total 120",
            "fleet_reports_rejected_total 4",
            "fleet_device_evictions_total{kind=\"telemetry\"} 7",
            "fleet_api_request_duration_seconds_count{method=\"GET\",route=\"/api/v1/devices\",status=\"200\"} 1",
            "fleet_notifications_pending 42",
            "fleet_notifications_dropped_total 5",
            "fleet_retention_deleted_telemetry_rows_total 9",
            "fleet_retention_deleted_drift_windows_total 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
