//! The one way this workspace builds HTTP clients: installs the ring TLS provider once per process
//! (reqwest is built without a provider so the agent binary does not carry aws-lc).

use std::sync::Once;
use std::time::Duration;

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

pub fn builder() -> reqwest::ClientBuilder {
    init_tls();
    reqwest::Client::builder().connect_timeout(Duration::from_secs(10))
}
