//! The HTTP authenticator for brokers that ask a web service who may connect (EMQX's `http`
//! password backend): the broker posts each CONNECT's username and password and gets allow or
//! deny, with the topics that login may use. The same rules as the embedded broker's gate: a
//! device logs in as its id with its enrollment credential and may use only its own topics; the
//! server's own session (the login fleet-server connects with) may use the whole tree. Off unless
//! fleet-server is given `--broker-auth-secret-file`; the broker sends that secret as a bearer
//! token, so no one else can use the endpoint to test credentials.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use proto::wire::{ErrorBody, TOPIC_ROOT};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{bearer, blocking, ApiError, AppState};
use crate::broker::{login_credential, login_device, same_secret};
use crate::ingest::MqttLogin;

/// What the endpoint checks against; present only when it is on.
#[derive(Clone)]
pub struct BrokerAuth {
    /// The bearer token the broker presents.
    pub secret: String,
    /// The login of fleet-server's own session on that broker, if it has one.
    pub server_login: Option<MqttLogin>,
}

/// What the broker sends (EMQX: `body { username = "${username}", password = "${password}",
/// clientid = "${clientid}" }`).
#[derive(Deserialize, ToSchema)]
pub struct BrokerLogin {
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Logged with a refusal; not checked (devices choose their client ids).
    #[serde(default)]
    pub clientid: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// One topic rule of the login (EMQX 5.8 and later apply them; older ones use acl.conf).
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq, Eq)]
pub struct AclRule {
    /// `allow` or `deny`.
    pub permission: String,
    /// `publish`, `subscribe` or `all`.
    pub action: String,
    pub topic: String,
}

/// The answer: never a superuser, so the broker always applies the rules.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq, Eq)]
pub struct BrokerVerdict {
    pub result: Verdict,
    pub is_superuser: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acl: Vec<AclRule>,
}

fn rule(permission: &str, action: &str, topic: &str) -> AclRule {
    AclRule { permission: permission.into(), action: action.into(), topic: topic.into() }
}

/// A device: its own topics, nothing else.
pub fn device_verdict(device: &str) -> BrokerVerdict {
    BrokerVerdict {
        result: Verdict::Allow,
        is_superuser: false,
        acl: vec![rule("allow", "all", &format!("{TOPIC_ROOT}/{device}/#")), rule("deny", "all", "#")],
    }
}

/// fleet-server's own session: the fleet's tree, also as a shared subscription
/// (`--mqtt-share-group`).
pub fn server_verdict() -> BrokerVerdict {
    BrokerVerdict {
        result: Verdict::Allow,
        is_superuser: false,
        acl: vec![
            rule("allow", "all", "fleet/#"),
            rule("allow", "subscribe", "$share/+/fleet/#"),
            rule("deny", "all", "#"),
        ],
    }
}

pub fn denied() -> BrokerVerdict {
    BrokerVerdict { result: Verdict::Deny, is_superuser: false, acl: Vec::new() }
}

/// Allow or deny one broker login. 404 while the authenticator is off, 401 without its secret;
/// a store failure is a 500, which EMQX treats as "ignore" (no other authenticator: refused).
#[utoipa::path(
    post,
    path = "/api/v1/broker/authenticate",
    tag = "broker",
    request_body = BrokerLogin,
    responses(
        (status = 200, description = "Allowed with the login's topic rules, or denied", body = BrokerVerdict),
        (status = 400, description = "Body is not a login", body = ErrorBody),
        (status = 401, description = "Missing or wrong broker secret", body = ErrorBody),
        (status = 404, description = "The authenticator is off (no --broker-auth-secret-file)", body = ErrorBody),
    ),
    security(("broker_secret" = []))
)]
pub async fn authenticate(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<BrokerLogin>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<BrokerVerdict>, ApiError> {
    let Some(auth) = state.broker_auth.clone() else {
        return Err(ApiError::NotFound(
            "the broker authenticator is off: start fleet-server with --broker-auth-secret-file".into(),
        ));
    };
    let presented = bearer(&headers).ok_or(ApiError::Unauthorized)?;
    if !same_secret(presented, &auth.secret) {
        return Err(ApiError::Unauthorized);
    }
    let Json(login) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "body must be {{\"username\": ..., \"password\": ..., \"clientid\": ...}}: {}",
            e.body_text()
        ))
    })?;
    if let (Some(server), Some(username)) = (&auth.server_login, login.username.as_deref()) {
        if username == server.username {
            let right = login.password.as_deref().is_some_and(|given| same_secret(given, &server.password));
            return Ok(Json(if right {
                server_verdict()
            } else {
                refused(&login, "wrong password for the server's login")
            }));
        }
    }
    let (username, hash) =
        match login_credential(login.username.as_deref(), login.password.as_deref().map(str::as_bytes)) {
            Ok(credential) => credential,
            Err(reason) => return Ok(Json(refused(&login, &reason))),
        };
    let found = blocking(&state, move |s| s.device_for_credential(&hash)).await?;
    Ok(Json(match login_device(&username, found) {
        Ok(device) => device_verdict(&device),
        Err(reason) => refused(&login, &reason),
    }))
}

fn refused(login: &BrokerLogin, reason: &str) -> BrokerVerdict {
    tracing::info!(username = ?login.username, clientid = ?login.clientid, reason, "broker login denied");
    denied()
}
