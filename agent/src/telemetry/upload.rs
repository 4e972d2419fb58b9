//! The telemetry uploader: while the device is connected it sends the oldest buffered inference
//! records to the server in batches, oldest first, and deletes a batch only once the server's
//! reply says it is stored. Rate-limited, so a site returning from a long outage does not flood
//! the server; failures back off with jitter.

use std::time::Duration;

use proto::delivery::{TelemetryAck, TelemetryBatch, MAX_TELEMETRY_BATCH_BYTES};
use tokio_util::sync::CancellationToken;

use super::TelemetrySink;
use crate::http::{read_capped, Backoff};

pub struct Uploader {
    pub http: reqwest::Client,
    /// `…/api/v1/devices/{id}/telemetry`
    pub url: String,
    pub credential: String,
    pub sink: TelemetrySink,
    /// Most rows per batch.
    pub batch_rows: usize,
    /// Upload pace once a backlog exists.
    pub rows_per_sec: f64,
    /// How often an idle uploader looks for new rows.
    pub idle: Duration,
    /// Total time one upload may take.
    pub timeout: Duration,
}

impl Uploader {
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        loop {
            let pause = match self.upload_once().await {
                Ok(0) => self.idle,
                Ok(rows) => {
                    backoff.reset();
                    Duration::from_secs_f64(rows as f64 / self.rows_per_sec.max(1.0))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "telemetry upload failed; will retry");
                    backoff.next_delay()
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Sends one batch of the oldest rows; returns how many rows it carried.
    pub async fn upload_once(&self) -> Result<usize, String> {
        // Leave room for the envelope and field prefixes in the body limit.
        let rows =
            self.sink.oldest(self.batch_rows, MAX_TELEMETRY_BATCH_BYTES * 3 / 4).await.map_err(|e| e.to_string())?;
        if rows.is_empty() {
            return Ok(0);
        }
        let count = rows.len();
        let sent_through = rows.last().map_or(0, |r| r.seq);
        let body = proto::wire::encode(&TelemetryBatch { rows });
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(&self.credential)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .timeout(self.timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| format!("POST {}: {e}", self.url))?;
        let status = response.status();
        let reply = read_capped(response, proto::wire::MAX_REPLY_BYTES).await?;
        if !status.is_success() {
            return Err(format!("POST {} answered HTTP {status}: {}", self.url, String::from_utf8_lossy(&reply)));
        }
        let ack: TelemetryAck =
            serde_json::from_slice(&reply).map_err(|e| format!("telemetry acknowledgement is not JSON: {e}"))?;
        // Never delete past what was sent, whatever the reply says.
        self.sink.stored(ack.through.min(sent_through)).await.map_err(|e| e.to_string())?;
        Ok(count)
    }
}
