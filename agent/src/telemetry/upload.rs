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
                Ok(Batch { rows: 0, .. }) => self.idle,
                Ok(Batch { rows, full }) => {
                    backoff.reset();
                    let paced = Duration::from_secs_f64(rows as f64 / self.rows_per_sec.max(1.0));
                    // A batch short of either limit emptied the buffer: wait for rows to gather
                    // rather than send a request for every handful (200 busy agents made 520
                    // uploads a second).
                    if full {
                        paced
                    } else {
                        paced.max(self.idle)
                    }
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

    /// Sends one batch of the oldest rows; says how many rows it carried and whether it was full.
    pub async fn upload_once(&self) -> Result<Batch, String> {
        // Leave room for the envelope and field prefixes in the body limit.
        let max_bytes = MAX_TELEMETRY_BATCH_BYTES * 3 / 4;
        let rows = self.sink.oldest(self.batch_rows, max_bytes).await.map_err(|e| e.to_string())?;
        if rows.is_empty() {
            return Ok(Batch { rows: 0, full: false });
        }
        let count = rows.len();
        let sent_through = rows.last().map_or(0, |r| r.seq);
        let body = proto::wire::encode(&TelemetryBatch { rows });
        // Full by rows, or by bytes give or take one row: more may be waiting.
        let full = count == self.batch_rows || body.len() >= max_bytes / 2;
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
        Ok(Batch { rows: count, full })
    }
}

/// What one upload carried.
pub struct Batch {
    pub rows: usize,
    /// It reached the row or byte limit, so rows may be waiting behind it.
    pub full: bool,
}
