//! The one way this workspace builds HTTP clients: installs the ring TLS provider once per process
//! (reqwest is built without a provider so the agent binary does not carry aws-lc). Also the
//! agent's rules for talking to the server: every reply read with a size cap, retries with
//! exponential backoff and jitter.

use std::sync::Once;
use std::time::Duration;

use futures_util::StreamExt;

static PROVIDER: Once = Once::new();

/// Installs the TLS provider if nothing else has; safe to call any number of times.
pub fn init_tls() {
    PROVIDER.call_once(|| {
        // Err means another provider was installed first, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A client with a connect timeout.
pub fn client() -> reqwest::Client {
    builder().build().unwrap_or_else(|_| {
        // Building fails only for invalid TLS settings, which `builder` does not set.
        reqwest::Client::new()
    })
}

/// Connect timeout, and a read timeout: a server that stops sending mid-reply (a stalled proxy)
/// fails the request instead of holding it forever.
pub fn builder() -> reqwest::ClientBuilder {
    init_tls();
    reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).read_timeout(Duration::from_secs(30))
}

/// [`builder`] trusting only `ca_pem` (the fleet's own CA, pinned) when given; the system's
/// roots otherwise.
pub fn builder_trusting(ca_pem: Option<&[u8]>) -> Result<reqwest::ClientBuilder, String> {
    let builder = builder();
    let Some(pem) = ca_pem else {
        return Ok(builder);
    };
    let ca = reqwest::Certificate::from_pem(pem).map_err(|e| format!("ca_file is not a PEM certificate: {e}"))?;
    Ok(builder.tls_certs_only([ca]))
}

/// A rustls client config that trusts only the CA certificates in `ca_pem` (for MQTT over TLS).
pub fn rustls_trusting(ca_pem: &[u8]) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    init_tls();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| format!("ca_file is not a PEM certificate: {e}"))?;
        roots.add(cert).map_err(|e| format!("ca_file certificate refused: {e}"))?;
    }
    if roots.is_empty() {
        return Err("ca_file holds no certificate".into());
    }
    Ok(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}

/// Reads a reply body, refusing one larger than `limit` bytes without reading the rest.
pub async fn read_capped(response: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let url = response.url().clone();
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(format!("reply from {url} is larger than the {limit}-byte limit"));
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("reading the reply from {url}: {e}"))?;
        if body.len() + chunk.len() > limit {
            return Err(format!("reply from {url} is larger than the {limit}-byte limit"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads a capped JSON reply.
pub async fn json_capped<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    limit: usize,
) -> Result<T, String> {
    let url = response.url().clone();
    let body = read_capped(response, limit).await?;
    serde_json::from_slice(&body).map_err(|e| format!("reply from {url} is not the expected JSON: {e}"))
}

/// Exponential backoff with full jitter: each delay is random in [base, cap-limited 2^n * base].
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap, failures: 0 }
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << self.failures.min(16)).min(self.cap);
        self.failures += 1;
        let spread = ceiling.saturating_sub(self.base).as_millis() as u64;
        self.base + Duration::from_millis(if spread == 0 { 0 } else { jitter() % (spread + 1) })
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A random number for jitter, from the standard library's per-process hash keys (no RNG crate
/// in the agent for this).
fn jitter() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher
        .write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_delays_grow_to_the_cap_and_stay_within_it() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_secs(2)));
        assert_eq!(delays[0], Duration::from_millis(100), "the first retry waits the base delay");
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_reply_over_the_cap_is_refused() {
        let app = axum::Router::new().route("/big", axum::routing::get(|| async { vec![b'x'; 5000] }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/big", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let response = client().get(&url).send().await.unwrap();
        let err = read_capped(response, 4096).await.unwrap_err();
        assert!(err.contains("larger than the 4096-byte limit"), "{err}");
        let response = client().get(&url).send().await.unwrap();
        assert_eq!(read_capped(response, 5000).await.unwrap().len(), 5000);
    }
}
