//! Bundle download with resume: bytes go to `<name>-<version>.bundle.part`; a restart continues
//! with an HTTP Range request. The finished file must have the size and sha256 the server
//! announced (transport integrity; authenticity comes from the signature check after). The
//! digest is computed while the bytes stream in (a resumed prefix is hashed once, in chunks, on a
//! blocking thread): the bundle is never read back whole into memory.
//!
//! Every download is bounded: a free-space check before it starts, the client's read timeout on
//! every read, and a minimum throughput: fewer than `min_bytes_per_sec` over a `stall_window`
//! (a server or proxy that trickles or stops sending while holding the connection) abandons the
//! attempt, keeping the partial file for the next one.

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::io::AsyncWriteExt;

#[derive(Debug, Error)]
pub enum DownloadError {
    #[error("download of {url} failed: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("download of {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    /// 503 or 429: the server sheds load (fleet-server does past a queue of requests). Not the
    /// bundle's fault, so not counted as a failed attempt; `retry_after` is what it asked for.
    #[error("download of {url} answered HTTP {status}: the server is busy, will try again later")]
    Busy { url: String, status: u16, retry_after: Option<std::time::Duration> },
    #[error("bundle {url} is {size} bytes, over the {limit}-byte limit")]
    TooLarge { url: String, size: u64, limit: u64 },
    #[error("bundle {url} sent more than the announced {expected} bytes")]
    Overrun { url: String, expected: u64 },
    #[error("bundle {url} has sha256 {actual}, the server announced {expected}: discarded, will download again")]
    Digest { url: String, expected: String, actual: String },
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("download of {url} stalled: {bytes} bytes in the last {secs:.0} s, under the {min} bytes/s minimum")]
    Stalled { url: String, bytes: u64, secs: f64, min: u64 },
    #[error("not enough free space for bundle {url}: {need} bytes needed, {free} free")]
    NoSpace { url: String, need: u64, free: u64 },
}

pub struct Download<'a> {
    pub client: &'a reqwest::Client,
    pub url: String,
    pub credential: &'a str,
    pub dest: PathBuf,
    pub size: u64,
    pub sha256: &'a str,
    pub limit: u64,
    /// Slower than this over `stall_window` abandons the attempt.
    pub min_bytes_per_sec: u64,
    pub stall_window: std::time::Duration,
    /// Free bytes where the bundle goes, if known (checked against twice the bundle: the
    /// download and its unpacked copy).
    pub free_bytes: Option<u64>,
}

impl Download<'_> {
    /// Fetches (or resumes) into `dest` and returns its path once size and sha256 match.
    pub async fn run(&self) -> Result<PathBuf, DownloadError> {
        let url = self.url.clone();
        if self.size > self.limit {
            return Err(DownloadError::TooLarge { url, size: self.size, limit: self.limit });
        }
        let part = self.dest.with_extension("bundle.part");
        // A finished download kept for later (a version staged for its activation window) is
        // used again when its size and digest still match; anything else there is replaced.
        if let Ok(kept) = tokio::fs::metadata(&self.dest).await {
            if kept.len() == self.size
                && hex::encode(hash_prefix(&self.dest, self.size).await?.finalize()) == self.sha256
            {
                return Ok(self.dest.clone());
            }
            let _ = tokio::fs::remove_file(&self.dest).await;
        }
        if let Some(free) = self.free_bytes {
            let need = self.size.saturating_mul(2);
            if need > free {
                return Err(DownloadError::NoSpace { url, need, free });
            }
        }
        if let Some(parent) = self.dest.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io("create", parent))?;
        }
        let have = tokio::fs::metadata(&part).await.map(|m| m.len()).unwrap_or(0).min(self.size + 1);
        let mut hasher = hash_prefix(&part, have).await?;
        let written = if have < self.size { self.fetch_from(have, &part, &mut hasher).await? } else { have };
        let actual = hex::encode(hasher.finalize());
        if written != self.size || actual != self.sha256 {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(DownloadError::Digest { url, expected: self.sha256.to_string(), actual });
        }
        tokio::fs::rename(&part, &self.dest).await.map_err(io("rename", &self.dest))?;
        Ok(self.dest.clone())
    }

    /// Appends from `have` (or starts over when the server ignores the Range), hashing each
    /// chunk as it is written; returns the file's length.
    async fn fetch_from(&self, have: u64, part: &Path, hasher: &mut Sha256) -> Result<u64, DownloadError> {
        let url = self.url.clone();
        let http = |source| DownloadError::Http { url: url.clone(), source };
        let mut request = self.client.get(&self.url).bearer_auth(self.credential);
        if have > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let response = request.send().await.map_err(http)?;
        let status = response.status().as_u16();
        let mut file = match status {
            206 => tokio::fs::OpenOptions::new().append(true).open(part).await,
            200 => {
                *hasher = Sha256::new();
                tokio::fs::File::create(part).await
            }
            429 | 503 => return Err(DownloadError::Busy { url, status, retry_after: retry_after(&response) }),
            _ => return Err(DownloadError::Status { url, status }),
        }
        .map_err(io("open", part))?;
        let mut written = if status == 206 { have } else { 0 };
        let mut stream = response.bytes_stream();
        let stalled = |bytes: u64, secs: f64| DownloadError::Stalled {
            url: url.clone(),
            bytes,
            secs,
            min: self.min_bytes_per_sec,
        };
        let mut window_start = tokio::time::Instant::now();
        let mut window_bytes = 0u64;
        loop {
            let remaining = self.stall_window.saturating_sub(window_start.elapsed());
            let next = match tokio::time::timeout(remaining, stream.next()).await {
                Ok(next) => next,
                Err(_) => return Err(stalled(window_bytes, self.stall_window.as_secs_f64())),
            };
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(http)?;
            window_bytes += chunk.len() as u64;
            let elapsed = window_start.elapsed();
            if elapsed >= self.stall_window {
                if (window_bytes as f64) < self.min_bytes_per_sec as f64 * elapsed.as_secs_f64() {
                    return Err(stalled(window_bytes, elapsed.as_secs_f64()));
                }
                window_start = tokio::time::Instant::now();
                window_bytes = 0;
            }
            written += chunk.len() as u64;
            if written > self.size {
                drop(file);
                let _ = tokio::fs::remove_file(part).await;
                return Err(DownloadError::Overrun { url, expected: self.size });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io("write", part))?;
        }
        file.sync_all().await.map_err(io("sync", part))?;
        Ok(written)
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError {
    let path = path.to_path_buf();
    move |source| DownloadError::Io { action, path, source }
}

/// A `Retry-After` given in seconds (the form fleet-server sends; an HTTP date reads as none).
fn retry_after(response: &reqwest::Response) -> Option<std::time::Duration> {
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse().ok().map(std::time::Duration::from_secs)
}

/// The digest state after the first `len` bytes of a partial download, read in chunks on a
/// blocking thread.
async fn hash_prefix(part: &Path, len: u64) -> Result<Sha256, DownloadError> {
    if len == 0 {
        return Ok(Sha256::new());
    }
    let path = part.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut hasher = Sha256::new();
        let mut file = std::fs::File::open(&path)?.take(len);
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                return Ok(hasher);
            }
            hasher.update(&buffer[..n]);
        }
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()));
    hashed.and_then(|r| r).map_err(io("read", part))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;

    use super::*;

    type Served = (Arc<Vec<u8>>, Arc<Mutex<Vec<String>>>);

    /// Serves `body`, honouring `Range: bytes=N-`, and records every Range header it saw.
    async fn serve(body: Vec<u8>) -> (String, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = (Arc::new(body), seen.clone());
        let app = axum::Router::new()
            .route(
                "/b",
                axum::routing::get(|State((body, seen)): State<Served>, headers: HeaderMap| async move {
                    match headers.get("range").and_then(|v| v.to_str().ok()) {
                        Some(range) => {
                            seen.lock().unwrap().push(range.to_string());
                            let from: usize = range.trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
                            (StatusCode::PARTIAL_CONTENT, body[from..].to_vec()).into_response()
                        }
                        None => (StatusCode::OK, body.to_vec()).into_response(),
                    }
                }),
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/b", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, seen)
    }

    fn download<'a>(client: &'a reqwest::Client, url: &str, dest: PathBuf, body: &[u8], sha: &'a str) -> Download<'a> {
        Download {
            client,
            url: url.to_string(),
            credential: "c",
            dest,
            size: body.len() as u64,
            sha256: sha,
            limit: 1 << 20,
            min_bytes_per_sec: 1,
            stall_window: std::time::Duration::from_secs(30),
            free_bytes: None,
        }
    }

    #[tokio::test]
    async fn an_interrupted_download_resumes_with_a_range_request() {
        let body: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let sha = hex::encode(Sha256::digest(&body));
        let (url, seen) = serve(body.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("m-1.0.0.bundle");
        std::fs::write(dest.with_extension("bundle.part"), &body[..20_000]).unwrap();
        let client = crate::http::client();
        let got = download(&client, &url, dest.clone(), &body, &sha).run().await.unwrap();
        assert_eq!(std::fs::read(&got).unwrap(), body, "the resumed file is whole and verified");
        assert_eq!(*seen.lock().unwrap(), vec!["bytes=20000-".to_string()]);
        assert!(dest.exists() && !dest.with_extension("bundle.part").exists());
    }

    #[tokio::test]
    async fn a_corrupted_partial_file_is_discarded_and_the_next_attempt_starts_over() {
        let body: Vec<u8> = (0..10_000u32).map(|i| (i % 13) as u8).collect();
        let sha = hex::encode(Sha256::digest(&body));
        let (url, seen) = serve(body.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("m-1.0.0.bundle");
        std::fs::write(dest.with_extension("bundle.part"), vec![0xAA; 4_000]).unwrap();
        let client = crate::http::client();
        let err = download(&client, &url, dest.clone(), &body, &sha).run().await.unwrap_err();
        assert!(err.to_string().contains("discarded, will download again"), "{err}");
        let got = download(&client, &url, dest, &body, &sha).run().await.unwrap();
        assert_eq!(std::fs::read(got).unwrap(), body);
        assert_eq!(seen.lock().unwrap().len(), 1, "the second attempt must not resume from the bad bytes");
    }

    #[tokio::test]
    async fn an_announced_size_over_the_limit_is_refused_before_downloading() {
        let client = crate::http::client();
        let dir = tempfile::tempdir().unwrap();
        let mut d = download(&client, "http://127.0.0.1:9/b", dir.path().join("x.bundle"), &[0; 10], "00");
        d.size = 2 << 20;
        assert!(matches!(d.run().await, Err(DownloadError::TooLarge { .. })));
    }

    /// A server that announces `body_len` bytes, sends `sent` (in 64 KiB pieces), then holds the
    /// connection open when `hold`, else closes it.
    async fn serve_raw(body_len: usize, sent: usize, hold: bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/b", listener.local_addr().unwrap());
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 1024];
                    let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut request).await;
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {body_len}\r\n\r\n");
                    let _ = socket.write_all(head.as_bytes()).await;
                    let mut left = sent;
                    while left > 0 {
                        let piece = left.min(65_536);
                        if socket.write_all(&vec![7u8; piece]).await.is_err() {
                            return;
                        }
                        left -= piece;
                    }
                    if hold {
                        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                    }
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn a_server_that_stops_sending_mid_download_fails_the_attempt_within_the_stall_window() {
        let url = serve_raw(100_000, 1300, true).await;
        let client = crate::http::client();
        let dir = tempfile::tempdir().unwrap();
        let body = vec![7u8; 100_000];
        let sha = hex::encode(Sha256::digest(&body));
        let mut d = download(&client, &url, dir.path().join("m-1.0.0.bundle"), &body, &sha);
        d.stall_window = std::time::Duration::from_millis(300);
        d.min_bytes_per_sec = 10_000;
        let err = d.run().await.unwrap_err();
        assert!(matches!(err, DownloadError::Stalled { .. }), "{err}");
        assert!(err.to_string().contains("stalled"), "{err}");
    }

    #[tokio::test]
    async fn a_server_that_lies_about_the_length_is_cut_off_at_the_announced_size() {
        // The check-in said 10,000 bytes; the download claims 50 MB and keeps sending.
        let url = serve_raw(50_000_000, 50_000_000, false).await;
        let body = vec![7u8; 10_000];
        let sha = hex::encode(Sha256::digest(&body));
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("m-1.0.0.bundle");
        let client = crate::http::client();
        let err = download(&client, &url, dest.clone(), &body, &sha).run().await.unwrap_err();
        assert!(matches!(err, DownloadError::Overrun { expected: 10_000, .. }), "{err}");
        assert!(!dest.exists() && !dest.with_extension("bundle.part").exists(), "nothing of it is kept");
    }

    #[tokio::test]
    async fn a_busy_server_is_told_apart_from_a_failure_with_the_pause_it_asked_for() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/b", listener.local_addr().unwrap());
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut request).await;
                let head = "HTTP/1.1 503 Service Unavailable\r\nretry-after: 5\r\ncontent-length: 0\r\n\r\n";
                let _ = socket.write_all(head.as_bytes()).await;
            }
        });
        let client = crate::http::client();
        let dir = tempfile::tempdir().unwrap();
        let body = vec![7u8; 100];
        let sha = hex::encode(Sha256::digest(&body));
        let err = download(&client, &url, dir.path().join("m-1.0.0.bundle"), &body, &sha).run().await.unwrap_err();
        match err {
            DownloadError::Busy { status: 503, retry_after, .. } => {
                assert_eq!(retry_after, Some(std::time::Duration::from_secs(5)))
            }
            other => panic!("expected Busy, got {other}"),
        }
    }

    #[tokio::test]
    async fn a_bundle_that_does_not_fit_on_disk_is_refused_before_downloading() {
        let client = crate::http::client();
        let dir = tempfile::tempdir().unwrap();
        let mut d = download(&client, "http://127.0.0.1:9/b", dir.path().join("x.bundle"), &[0; 1000], "00");
        d.free_bytes = Some(1500);
        let err = d.run().await.unwrap_err();
        assert!(err.to_string().contains("not enough free space"), "{err}");
    }
}
