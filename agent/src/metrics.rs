//! The device's Prometheus metrics at `GET /metrics`, off unless the config names a loopback
//! `metrics_listen` (the endpoint has no authentication). Everything is read at scrape time from
//! the parts that own it: the engine threads (inferences, errors, latency histogram per model
//! since it was loaded), the telemetry writer (drops, evictions), the outbox (records waiting
//! for the server's acknowledgement, evictions), agent.db (each model's last update step) and
//! the updater (when a check-in reply was last accepted).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::inference::engine::ServingMetrics;
use crate::inference::EngineHandle;
use crate::state::StateDb;
use crate::telemetry::TelemetrySink;
use crate::uplink::outbox::Outbox;

/// What a scrape reads from.
#[derive(Clone)]
pub struct Sources {
    pub engine: EngineHandle,
    pub telemetry: TelemetrySink,
    pub outbox: Outbox,
    pub state: Arc<StateDb>,
    pub last_checkin_ms: Arc<AtomicU64>,
}

/// One scrape's values.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    pub serving: Vec<ServingMetrics>,
    pub telemetry_dropped: u64,
    pub telemetry_evicted: u64,
    pub outbox_pending: u64,
    pub reports_evicted: u64,
    pub heartbeats_evicted: u64,
    /// (model, version, step) from each model's last update record.
    pub steps: Vec<(String, String, String)>,
    /// Seconds since a check-in reply was last accepted; None before the first.
    pub checkin_age_secs: Option<f64>,
}

impl Snapshot {
    async fn gather(sources: &Sources) -> Snapshot {
        let serving = sources.engine.serving_metrics().await;
        let outbox = sources.outbox.stats().await.ok();
        let state = sources.state.clone();
        let records = tokio::task::spawn_blocking(move || state.records()).await.ok().and_then(Result::ok);
        let last = sources.last_checkin_ms.load(Ordering::Relaxed);
        Snapshot {
            serving,
            telemetry_dropped: sources.telemetry.dropped(),
            telemetry_evicted: sources.telemetry.evicted(),
            outbox_pending: outbox.as_ref().map_or(0, |o| o.pending),
            reports_evicted: outbox.as_ref().map_or(0, |o| o.evicted.reports),
            heartbeats_evicted: outbox.as_ref().map_or(0, |o| o.evicted.heartbeats),
            steps: records
                .unwrap_or_default()
                .into_iter()
                .map(|r| (r.model, r.version, r.step.as_str().to_string()))
                .collect(),
            checkin_age_secs: (last > 0).then(|| crate::unix_ms().saturating_sub(last) as f64 / 1000.0),
        }
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut inferences = encoder.encode_descriptor(
            "edge_inferences",
            "Requests answered per model since it was loaded",
            None,
            MetricType::Counter,
        )?;
        for s in &self.serving {
            let labels = [("model", s.model.as_str()), ("version", s.version.as_str())];
            ConstCounter::new(s.inferences).encode(inferences.encode_family(&labels)?)?;
        }
        let mut errors = encoder.encode_descriptor(
            "edge_inference_errors",
            "Requests the model failed per model since it was loaded",
            None,
            MetricType::Counter,
        )?;
        for s in &self.serving {
            let labels = [("model", s.model.as_str()), ("version", s.version.as_str())];
            ConstCounter::new(s.errors).encode(errors.encode_family(&labels)?)?;
        }
        let mut latency = encoder.encode_descriptor(
            "edge_inference_duration_seconds",
            "Inference latency per model since it was loaded",
            None,
            MetricType::Histogram,
        )?;
        for s in &self.serving {
            let labels = [("model", s.model.as_str()), ("version", s.version.as_str())];
            let count = s.latency_buckets.iter().map(|(_, n)| n).sum();
            latency.encode_family(&labels)?.encode_histogram::<Vec<(String, String)>>(
                s.latency_sum_secs,
                count,
                &s.latency_buckets,
                None,
            )?;
        }
        let counters = [
            (
                "edge_telemetry_dropped",
                "Telemetry records dropped because the writer was behind",
                self.telemetry_dropped,
            ),
            ("edge_telemetry_evicted", "Telemetry rows evicted under the disk budget", self.telemetry_evicted),
            (
                "edge_reports_evicted",
                "Reports evicted under the disk budget before the server stored them",
                self.reports_evicted,
            ),
            ("edge_heartbeats_evicted", "Heartbeats evicted under the disk budget", self.heartbeats_evicted),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let pending = ConstGauge::new(self.outbox_pending as i64);
        pending.encode(encoder.encode_descriptor(
            "edge_outbox_pending",
            "Records waiting for the server's acknowledgement",
            None,
            pending.metric_type(),
        )?)?;
        let mut steps = encoder.encode_descriptor(
            "edge_update_step",
            "1 for each model's last update step (model, version, step)",
            None,
            MetricType::Gauge,
        )?;
        for (model, version, step) in &self.steps {
            let labels = [("model", model.as_str()), ("version", version.as_str()), ("step", step.as_str())];
            ConstGauge::new(1).encode(steps.encode_family(&labels)?)?;
        }
        if let Some(age) = self.checkin_age_secs {
            let gauge = ConstGauge::new(age);
            gauge.encode(encoder.encode_descriptor(
                "edge_checkin_age_seconds",
                "Seconds since a check-in reply was last accepted",
                None,
                gauge.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

pub fn render(snapshot: Snapshot) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

async fn scrape(State(sources): State<Sources>) -> Response {
    match render(Snapshot::gather(&sources).await) {
        Ok(text) => {
            let mut response = text.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            response
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serves `GET /metrics` until `cancel`.
pub async fn serve(listener: tokio::net::TcpListener, sources: Sources, cancel: CancellationToken) {
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape)).with_state(sources);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await {
        tracing::error!(error = %e, "the metrics endpoint stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_has_counters_a_histogram_and_a_step_per_model_and_the_checkin_age() {
        let snapshot = Snapshot {
            serving: vec![ServingMetrics {
                model: "tabular".into(),
                version: "2.0.0".into(),
                inferences: 7,
                errors: 1,
                latency_sum_secs: 0.0012,
                latency_buckets: vec![(0.00005, 3), (0.0001, 4), (f64::INFINITY, 0)],
            }],
            telemetry_dropped: 2,
            outbox_pending: 5,
            steps: vec![("tabular".into(), "2.0.0".into(), "active".into())],
            checkin_age_secs: Some(3.5),
            ..Default::default()
        };
        let text = render(snapshot).unwrap();
        for line in [
            "edge_inferences_total{model=\"tabular\",version=\"2.0.0\"} 7",
            "edge_inference_errors_total{model=\"tabular\",version=\"2.0.0\"} 1",
            "edge_inference_duration_seconds_bucket{le=\"0.0001\",model=\"tabular\",version=\"2.0.0\"} 7",
            "edge_inference_duration_seconds_count{model=\"tabular\",version=\"2.0.0\"} 7",
            "edge_telemetry_dropped_total 2",
            "edge_outbox_pending 5",
            "edge_update_step{model=\"tabular\",version=\"2.0.0\",step=\"active\"} 1",
            "edge_checkin_age_seconds 3.5",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
