//! Closes a revoked device's sessions on EMQX through its REST API (v5). EMQX asks the server's
//! HTTP authenticator (`api/broker_auth.rs`) only when a client connects, so a device revoked
//! while connected would stay connected until it next reconnects; Mosquitto drops it when it
//! reloads the password file, the embedded broker's gate closes it at once.
//!
//! Every client logged in with the device's username is kicked, whatever client id it chose.

use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;
use thiserror::Error;

/// How long one call to EMQX may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Most sessions one device is expected to hold at once; more are listed on further pages
/// only by a misbehaving device, and one revocation kicks at most this many.
const MAX_SESSIONS: usize = 100;

#[derive(Debug, Error)]
pub enum EmqxError {
    #[error("EMQX API address {0:?} is not an http(s) URL")]
    Url(String),
    #[error("EMQX API key file must hold `key:secret` (an EMQX API key and its secret)")]
    Key,
    #[error("EMQX API call {what} failed: {source}")]
    Call { what: String, source: reqwest::Error },
    #[error("EMQX API call {what} answered {status}")]
    Status { what: String, status: reqwest::StatusCode },
}

/// EMQX's REST API as this server uses it; cheap to clone.
#[derive(Clone)]
pub struct EmqxApi {
    base: Url,
    key: String,
    secret: String,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct ClientPage {
    data: Vec<ClientEntry>,
}

#[derive(Deserialize)]
struct ClientEntry {
    clientid: String,
}

impl EmqxApi {
    /// `base` is EMQX's dashboard/API listener (e.g. `http://emqx:18083`); `key_file_text` holds
    /// `key:secret` of an API key made in EMQX.
    pub fn new(base: &str, key_file_text: &str) -> Result<EmqxApi, EmqxError> {
        let base = Url::parse(base).map_err(|_| EmqxError::Url(base.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(EmqxError::Url(base.to_string()));
        }
        let (key, secret) = key_file_text.trim().split_once(':').ok_or(EmqxError::Key)?;
        if key.is_empty() || secret.is_empty() {
            return Err(EmqxError::Key);
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|source| EmqxError::Call { what: "building the HTTP client".into(), source })?;
        Ok(EmqxApi { base, key: key.to_string(), secret: secret.to_string(), http })
    }

    /// `/api/v5/<segments…>`, each segment percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["api", "v5"]).extend(segments);
        }
        url
    }

    /// Disconnects every client logged in as `device`; returns how many were connected.
    pub async fn kick(&self, device: &str) -> Result<usize, EmqxError> {
        let mut list = self.url(&["clients"]);
        list.query_pairs_mut().append_pair("username", device).append_pair("limit", &MAX_SESSIONS.to_string());
        let what = format!("listing {device}'s clients");
        let response = self
            .http
            .get(list)
            .basic_auth(&self.key, Some(&self.secret))
            .send()
            .await
            .map_err(|source| EmqxError::Call { what: what.clone(), source })?;
        if !response.status().is_success() {
            return Err(EmqxError::Status { what, status: response.status() });
        }
        let page: ClientPage = response.json().await.map_err(|source| EmqxError::Call { what, source })?;
        let mut kicked = 0;
        for client in page.data {
            let what = format!("kicking client {:?} of {device}", client.clientid);
            let response = self
                .http
                .delete(self.url(&["clients", &client.clientid]))
                .basic_auth(&self.key, Some(&self.secret))
                .send()
                .await
                .map_err(|source| EmqxError::Call { what: what.clone(), source })?;
            match response.status() {
                status if status.is_success() => kicked += 1,
                // Gone between the listing and the kick.
                reqwest::StatusCode::NOT_FOUND => {}
                status => return Err(EmqxError::Status { what, status }),
            }
        }
        Ok(kicked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_address_and_key_are_checked_at_start_with_a_sentence_each() {
        let api = EmqxApi::new("http://emqx:18083/", "fleet:s3cret\n").unwrap();
        assert_eq!((api.key.as_str(), api.secret.as_str()), ("fleet", "s3cret"));
        assert_eq!(api.url(&["clients", "odd id/#"]).as_str(), "http://emqx:18083/api/v5/clients/odd%20id%2F%23");
        assert!(matches!(EmqxApi::new("emqx:18083", "a:b"), Err(EmqxError::Url(_))));
        assert!(matches!(EmqxApi::new("ftp://emqx", "a:b"), Err(EmqxError::Url(_))));
        for key in ["", "no-colon", ":secret", "key:"] {
            let refused = EmqxApi::new("http://emqx:18083", key).err().unwrap();
            assert_eq!(
                refused.to_string(),
                "EMQX API key file must hold `key:secret` (an EMQX API key and its secret)"
            );
        }
    }
}
