//! A small client for the operator API, used by fleetctl and the demo.

use proto::rollout::RolloutPlan;
use proto::wire::{
    AuditEntry, BundleInfo, DeployRequest, DeployResponse, DeviceView, ErrorBody, OperatorCreated, OperatorRequest,
    OperatorView, Role, RootInfo, TokenRequest, TokenResponse, TokenRevokeRequest,
};

use fleet_server::api::rollouts::RolloutView;
use fleet_server::rollout::create::OperatorAction;
use serde::de::DeserializeOwned;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach the fleet server at {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("the fleet server refused {what}: {message}")]
    Refused { what: &'static str, message: String },
}

#[derive(Clone)]
pub struct FleetClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl FleetClient {
    pub fn new(base: &str, token: &str) -> FleetClient {
        FleetClient {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: edge_agent::http::client(),
        }
    }

    /// A client that trusts only the CA in `ca_pem` (the fleet's private CA) for `https://`.
    pub fn trusting(base: &str, token: &str, ca_pem: Option<&[u8]>) -> Result<FleetClient, String> {
        let http = edge_agent::http::builder_trusting(ca_pem)?.build().map_err(|e| e.to_string())?;
        Ok(FleetClient { base: base.trim_end_matches('/').to_string(), token: token.to_string(), http })
    }

    async fn send<T: DeserializeOwned>(
        &self,
        what: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let url = self.base.clone();
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| ClientError::Unreachable { url: url.clone(), source })?;
        if !response.status().is_success() {
            let status = response.status();
            let message = match response.json::<ErrorBody>().await {
                Ok(body) => body.error,
                Err(_) => format!("HTTP {status}"),
            };
            return Err(ClientError::Refused { what, message });
        }
        response.json().await.map_err(|source| ClientError::Unreachable { url, source })
    }

    pub async fn publish(&self, bundle: Vec<u8>) -> Result<BundleInfo, ClientError> {
        self.send("the bundle", self.http.post(format!("{}/api/v1/bundles", self.base)).body(bundle)).await
    }

    /// Publishes a signed root of trust (the first, or the next rotation); admin only.
    pub async fn publish_root(&self, document: Vec<u8>) -> Result<RootInfo, ClientError> {
        self.send("the root", self.http.post(format!("{}/api/v1/roots", self.base)).body(document)).await
    }

    pub async fn devices(&self) -> Result<Vec<DeviceView>, ClientError> {
        self.send("the device list", self.http.get(format!("{}/api/v1/devices", self.base))).await
    }

    pub async fn deploy(&self, request: &DeployRequest) -> Result<DeployResponse, ClientError> {
        self.send("the deployment", self.http.post(format!("{}/api/v1/deployments", self.base)).json(request)).await
    }

    pub async fn start_rollout(&self, plan: &RolloutPlan) -> Result<RolloutView, ClientError> {
        self.send("the rollout plan", self.http.post(format!("{}/api/v1/rollouts", self.base)).json(plan)).await
    }

    pub async fn rollouts(&self) -> Result<Vec<RolloutView>, ClientError> {
        self.send("the rollout list", self.http.get(format!("{}/api/v1/rollouts", self.base))).await
    }

    pub async fn rollout(&self, id: &str) -> Result<RolloutView, ClientError> {
        self.send("the rollout", self.http.get(format!("{}/api/v1/rollouts/{id}", self.base))).await
    }

    pub async fn rollout_action(&self, id: &str, action: OperatorAction) -> Result<RolloutView, ClientError> {
        let url = format!("{}/api/v1/rollouts/{id}/{}", self.base, action.as_str());
        self.send("the rollout action", self.http.post(url)).await
    }

    pub async fn audit(&self, rollout: Option<&str>) -> Result<Vec<AuditEntry>, ClientError> {
        let url = match rollout {
            // Rollout ids are `ro-<hex>`; anything else cannot match, so it need not be escaped.
            Some(id) if id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') => {
                format!("{}/api/v1/audit?rollout={id}", self.base)
            }
            Some(_) => return Ok(Vec::new()),
            None => format!("{}/api/v1/audit", self.base),
        };
        self.send("the audit log", self.http.get(url)).await
    }

    pub async fn set_labels(
        &self,
        device: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), ClientError> {
        let url = format!("{}/api/v1/devices/{device}/labels", self.base);
        let _: std::collections::BTreeMap<String, String> =
            self.send("the labels", self.http.put(url).json(labels)).await?;
        Ok(())
    }

    pub async fn tokens(&self, count: u32) -> Result<Vec<String>, ClientError> {
        self.tokens_valid_for(count, None).await
    }

    /// Enrollment tokens valid for `valid_hours` (the server's default of 7 days when None).
    pub async fn tokens_valid_for(&self, count: u32, valid_hours: Option<u32>) -> Result<Vec<String>, ClientError> {
        let response: TokenResponse = self
            .send(
                "the token request",
                self.http
                    .post(format!("{}/api/v1/enrollment-tokens", self.base))
                    .json(&TokenRequest { count, valid_hours }),
            )
            .await?;
        Ok(response.tokens)
    }

    pub async fn revoke_token(&self, token: &str) -> Result<(), ClientError> {
        let url = format!("{}/api/v1/enrollment-tokens/revoke", self.base);
        let body = TokenRevokeRequest { token: token.to_string() };
        self.send("the token revocation", self.http.post(url).json(&body)).await
    }

    pub async fn add_operator(&self, name: &str, role: Role) -> Result<OperatorCreated, ClientError> {
        let body = OperatorRequest { name: name.to_string(), role };
        self.send("the new operator", self.http.post(format!("{}/api/v1/operators", self.base)).json(&body)).await
    }

    pub async fn operators(&self) -> Result<Vec<OperatorView>, ClientError> {
        self.send("the operator list", self.http.get(format!("{}/api/v1/operators", self.base))).await
    }

    pub async fn revoke_operator(&self, name: &str) -> Result<(), ClientError> {
        let url = format!("{}/api/v1/operators/{}/revoke", self.base, percent_encode(name));
        self.send("the operator revocation", self.http.post(url)).await
    }

    pub async fn revoke_device(&self, device: &str) -> Result<(), ClientError> {
        let url = format!("{}/api/v1/devices/{}/revoke", self.base, percent_encode(device));
        self.send("the device revocation", self.http.post(url)).await
    }

    /// Every device's delivery counters.
    pub async fn delivery(&self) -> Result<Vec<proto::delivery::DeliveryView>, ClientError> {
        self.send("the delivery counters", self.http.get(format!("{}/api/v1/delivery", self.base))).await
    }

    /// One page of stored telemetry of `model`, after (device, seq) when given.
    pub async fn telemetry_page(
        &self,
        model: &str,
        version: Option<&str>,
        since_ms: Option<u64>,
        after: Option<(&str, u64)>,
    ) -> Result<Vec<proto::delivery::ExportedTelemetry>, ClientError> {
        let mut query: Vec<(&str, String)> = vec![("model", model.to_string())];
        if let Some(version) = version {
            query.push(("version", version.to_string()));
        }
        if let Some(since) = since_ms {
            query.push(("since_ms", since.to_string()));
        }
        if let Some((device, seq)) = after {
            query.push(("after_device", device.to_string()));
            query.push(("after_seq", seq.to_string()));
        }
        self.send("the telemetry export", self.http.get(self.query_url("/api/v1/telemetry", &query))).await
    }

    /// A model's drift per version and time bucket, for the devices matching `cohort`
    /// (`key=value,…`; empty for the whole fleet).
    pub async fn drift(
        &self,
        model: &str,
        cohort: &str,
        since_ms: Option<u64>,
        bucket_secs: u64,
    ) -> Result<fleet_server::drift::report::DriftReport, ClientError> {
        let mut query: Vec<(&str, String)> =
            vec![("model", model.to_string()), ("bucket_secs", bucket_secs.to_string())];
        if !cohort.is_empty() {
            query.push(("cohort", cohort.to_string()));
        }
        if let Some(since) = since_ms {
            query.push(("since_ms", since.to_string()));
        }
        self.send("the drift report", self.http.get(self.query_url("/api/v1/drift", &query))).await
    }

    /// Every published model version with its lineage.
    pub async fn models(&self) -> Result<Vec<proto::lineage::ModelVersionView>, ClientError> {
        self.send("the model list", self.http.get(format!("{}/api/v1/models", self.base))).await
    }

    /// One device's models, lineage, recent steps and audit lines.
    pub async fn device(&self, id: &str) -> Result<proto::lineage::DeviceDetail, ClientError> {
        // Device ids are `dev-<hex>`: nothing to escape; anything else is refused before sending.
        if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(ClientError::Refused {
                what: "the device",
                message: format!("{id:?} is not a device id (dev-…)"),
            });
        }
        self.send("the device", self.http.get(format!("{}/api/v1/devices/{id}", self.base))).await
    }

    fn query_url(&self, path: &str, query: &[(&str, String)]) -> String {
        let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={}", percent_encode(v))).collect();
        format!("{}{path}?{}", self.base, query.join("&"))
    }
}

/// Escapes a query value: everything but unreserved characters (RFC 3986) as %XX.
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
