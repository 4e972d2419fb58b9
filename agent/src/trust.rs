//! The device's root of trust (ADR 0010): read at start from the config's initial root or the
//! newest one it rotated to, and moved forward one version at a time by what the server offers.

use std::path::{Path, PathBuf};

use proto::root::{rotate, Root, RootError, SignedRoot, MAX_ROOT_BYTES};
use thiserror::Error;

use crate::state::{StateDb, StateError};

/// Most root versions followed after one check-in; the rest wait for the next.
pub const MAX_ROTATIONS_PER_CHECKIN: u64 = 16;

#[derive(Debug, Error)]
pub enum TrustError {
    #[error("cannot read the initial root {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("initial root {path} refused: {source}")]
    Initial { path: PathBuf, source: RootError },
    #[error("stored root refused (agent.db was altered?): {0}")]
    Stored(RootError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("root {version} from the server refused: {source}")]
    Rotation { version: u64, source: RootError },
    #[error("fetching root {version} from {url} failed: {reason}")]
    Fetch { version: u64, url: String, reason: String },
}

/// The root to start from (blocking): the newest stored rotation when it is newer than the
/// initial root in the config, else the initial root. Both must carry a threshold of their own
/// root keys' signatures.
pub fn current_root(initial: &Path, state: &StateDb) -> Result<Root, TrustError> {
    let bytes = read_bounded(initial).map_err(|source| TrustError::Read { path: initial.into(), source })?;
    let refused = |source| TrustError::Initial { path: initial.into(), source };
    let first = SignedRoot::parse(&bytes).and_then(|r| r.verify_initial()).map_err(refused)?;
    let Some(stored) = state.latest_root()? else {
        return Ok(first);
    };
    let stored = SignedRoot::parse(&stored).and_then(|r| r.verify_initial()).map_err(TrustError::Stored)?;
    Ok(if stored.version > first.version { stored } else { first })
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(MAX_ROOT_BYTES as u64 + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Follows the server's roots from `current` up to `latest` (at most
/// [`MAX_ROTATIONS_PER_CHECKIN`]), each checked by TUF's rule against the one before and stored
/// before it is used. Returns the newest root reached, which is `current` if none was accepted;
/// the first refusal stops the walk and is returned with the root reached so far. Expiry is
/// judged at `now_secs`, the device's trusted time (never below its time floor, ADR 0010), so a
/// device whose clock reads 1970 does not take an expired root.
pub async fn follow_rotations(
    http: &reqwest::Client,
    server_url: &str,
    credential: &str,
    state: &std::sync::Arc<StateDb>,
    current: &Root,
    latest: u64,
    now_secs: u64,
) -> (Root, Option<TrustError>) {
    let mut root = current.clone();
    let last = latest.min(current.version + MAX_ROTATIONS_PER_CHECKIN);
    while root.version < last {
        let version = root.version + 1;
        match next_root(http, server_url, credential, state, &root, version, now_secs).await {
            Ok(next) => {
                tracing::info!(version, "root of trust rotated");
                root = next;
            }
            Err(e) => return (root, Some(e)),
        }
    }
    (root, None)
}

async fn next_root(
    http: &reqwest::Client,
    server_url: &str,
    credential: &str,
    state: &std::sync::Arc<StateDb>,
    current: &Root,
    version: u64,
    now_secs: u64,
) -> Result<Root, TrustError> {
    let url = format!("{server_url}/api/v1/roots/{version}");
    let failed = |reason: String| TrustError::Fetch { version, url: url.clone(), reason };
    let response = http.get(&url).bearer_auth(credential).send().await.map_err(|e| failed(e.to_string()))?;
    if !response.status().is_success() {
        return Err(failed(format!("HTTP {}", response.status())));
    }
    let bytes = crate::http::read_capped(response, MAX_ROOT_BYTES).await.map_err(failed)?;
    let refused = |source| TrustError::Rotation { version, source };
    let signed = SignedRoot::parse(&bytes).map_err(refused)?;
    let next = rotate(current, &signed, now_secs).map_err(refused)?;
    let (state, document) = (state.clone(), signed.to_json_bytes());
    tokio::task::spawn_blocking(move || state.save_root(version, &document))
        .await
        .map_err(|e| failed(e.to_string()))??;
    Ok(next)
}
