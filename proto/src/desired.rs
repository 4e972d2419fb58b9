//! Checks on what a server tells a device to run, made before the device uses any of it in a
//! file path, a URL or a topic: a compromised or impersonated server must not be able to write
//! outside the data directory or send the device's credential elsewhere.

use thiserror::Error;

use crate::names::{self, InvalidName};
use crate::wire::{bundle_path, DesiredModel};

/// Longest version string accepted.
pub const MAX_VERSION_LEN: usize = 64;

#[derive(Debug, Error, PartialEq)]
pub enum InvalidDesired {
    #[error(transparent)]
    Name(#[from] InvalidName),
    #[error("version {0:?} is not a canonical semantic version of at most 64 characters")]
    Version(String),
    #[error("bundle path {found:?} is not the path of that model and version ({expected:?})")]
    BundlePath { found: String, expected: String },
    #[error("bundle digest {0:?} is not 64 lowercase hex digits")]
    Digest(String),
    #[error("shadow sample rate {0} is not in (0, 1]")]
    SampleRate(f32),
    #[error(transparent)]
    Window(#[from] crate::window::WindowError),
}

/// Accepts a desired model only if its name follows the name rules, its version is canonical
/// semver (what `semver` prints back, so no `v` prefix, spaces or path characters), its bundle
/// path is exactly the one this model and version have on the server, and its digest is a
/// SHA-256 in lowercase hex.
pub fn validate(model: &DesiredModel) -> Result<(), InvalidDesired> {
    names::validate("model name", &model.name)?;
    let canonical = semver::Version::parse(&model.version).map(|v| v.to_string());
    if model.version.len() > MAX_VERSION_LEN || canonical.ok().as_deref() != Some(model.version.as_str()) {
        return Err(InvalidDesired::Version(model.version.clone()));
    }
    let expected = bundle_path(&model.name, &model.version);
    if model.bundle_path != expected {
        return Err(InvalidDesired::BundlePath { found: model.bundle_path.clone(), expected });
    }
    let hex_digest = model.bundle_sha256.len() == 64
        && model.bundle_sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex_digest {
        return Err(InvalidDesired::Digest(model.bundle_sha256.clone()));
    }
    if let Some(window) = &model.activation_window {
        window.validate()?;
    }
    if let Some(shadow) = &model.shadow {
        if !(shadow.sample_rate > 0.0 && shadow.sample_rate <= 1.0) {
            return Err(InvalidDesired::SampleRate(shadow.sample_rate));
        }
        validate(&shadow.as_model(&model.name, model.attempt))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(name: &str, version: &str) -> DesiredModel {
        DesiredModel {
            name: name.into(),
            version: version.into(),
            bundle_path: bundle_path(name, version),
            bundle_sha256: "ab".repeat(32),
            bundle_size: 10,
            attempt: 0,
            shadow: None,
            activation_window: None,
        }
    }

    #[test]
    fn a_well_formed_desired_model_is_accepted() {
        assert_eq!(validate(&desired("tabular", "1.2.3")), Ok(()));
        assert_eq!(validate(&desired("tabular", "2.0.0-rc.1+build.5")), Ok(()));
    }

    #[test]
    fn traversing_or_odd_versions_and_names_are_refused() {
        for version in ["x/../../../tmp/p", "../1.0.0", "v1.0.0", "1.0", " 1.0.0", "1.0.0/", "01.0.0", ""] {
            assert_eq!(
                validate(&desired("tabular", version)),
                Err(InvalidDesired::Version(version.into())),
                "{version}"
            );
        }
        assert!(matches!(validate(&desired("../etc", "1.0.0")), Err(InvalidDesired::Name(_))));
        let long = format!("1.0.0-{}", "a".repeat(64));
        assert!(matches!(validate(&desired("tabular", &long)), Err(InvalidDesired::Version(_))));
    }

    #[test]
    fn a_bundle_path_other_than_the_models_own_is_refused() {
        for path in ["@evil.example/api/v1/bundles/tabular/1.0.0", "//evil/x", "/api/v1/bundles/other/1.0.0", ""] {
            let model = DesiredModel { bundle_path: path.into(), ..desired("tabular", "1.0.0") };
            assert!(matches!(validate(&model), Err(InvalidDesired::BundlePath { .. })), "{path}");
        }
    }

    #[test]
    fn a_digest_that_is_not_lowercase_hex_sha256_is_refused() {
        for digest in ["AB".repeat(32), "ab".repeat(31), "zz".repeat(32), String::new()] {
            let model = DesiredModel { bundle_sha256: digest.clone(), ..desired("tabular", "1.0.0") };
            assert_eq!(validate(&model), Err(InvalidDesired::Digest(digest)));
        }
    }
}
