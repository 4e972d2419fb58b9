//! Whether a device may install a verified bundle (ADR 0010): the bundle's signed floor and
//! targets against what the device is and the highest floor it has seen. Pure: the agent
//! persists the floors and says which device it is.

use std::collections::BTreeMap;

use semver::Version;
use thiserror::Error;

use crate::bundle::Manifest;

/// What the device is, as bundle targets name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceClass {
    /// `std::env::consts::ARCH` of the agent's build.
    pub arch: String,
    pub labels: BTreeMap<String, String>,
}

impl DeviceClass {
    /// This build's architecture and the given labels.
    pub fn this_build(labels: BTreeMap<String, String>) -> DeviceClass {
        DeviceClass { arch: std::env::consts::ARCH.to_string(), labels }
    }
}

/// Why a device refuses a bundle; `bundle` is "<model> <version>".
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("{bundle} is below the floor {floor} this device has seen for {model}, so it is not installed")]
    BelowFloor { bundle: String, model: String, floor: Version },
    #[error("{bundle} is built for {wanted} and this device is {arch}, so it is not installed")]
    Architecture { bundle: String, wanted: String, arch: String },
    #[error("{bundle} is for devices labelled {key}={wanted} and this device has {found}, so it is not installed")]
    Label { bundle: String, key: String, wanted: String, found: String },
}

/// Accepts a bundle for installing (or for rolling back to) when its version is at or above
/// `floor`, the highest floor the device has seen for this model, and the device is one of its
/// targets.
pub fn admit(manifest: &Manifest, device: &DeviceClass, floor: Option<&Version>) -> Result<(), Refusal> {
    let bundle = || format!("{} {}", manifest.name, manifest.version);
    if let Some(floor) = floor.filter(|floor| manifest.version < **floor) {
        return Err(Refusal::BelowFloor { bundle: bundle(), model: manifest.name.clone(), floor: floor.clone() });
    }
    let targets = &manifest.targets;
    if !targets.arch.is_empty() && !targets.arch.contains(&device.arch) {
        return Err(Refusal::Architecture {
            bundle: bundle(),
            wanted: targets.arch.join(" or "),
            arch: device.arch.clone(),
        });
    }
    for (key, wanted) in &targets.labels {
        let found = device.labels.get(key);
        if found != Some(wanted) {
            return Err(Refusal::Label {
                bundle: bundle(),
                key: key.clone(),
                wanted: wanted.clone(),
                found: found.map_or_else(|| "no such label".to_string(), |v| format!("{key}={v}")),
            });
        }
    }
    Ok(())
}

/// The floor to keep after verifying `manifest`: the higher of the one seen and the manifest's.
/// Floors only rise.
pub fn raised_floor(seen: Option<&Version>, manifest: &Manifest) -> Option<Version> {
    match (seen, manifest.floor.as_ref()) {
        (Some(seen), Some(new)) => Some(seen.max(new).clone()),
        (seen, new) => seen.or(new).cloned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{DType, ModelContract, TensorSpec};

    fn manifest(version: &str) -> Manifest {
        let spec = |name: &str| TensorSpec { name: name.into(), dtype: DType::F32, shape: vec![1, 2] };
        let contract = ModelContract {
            input: spec("x"),
            output: spec("y"),
            feature_names: Vec::new(),
            output_labels: Vec::new(),
            features: Vec::new(),
        };
        Manifest::for_model("tabular", Version::parse(version).unwrap(), b"model", contract)
    }

    fn device(arch: &str, labels: &[(&str, &str)]) -> DeviceClass {
        DeviceClass { arch: arch.into(), labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    fn v(text: &str) -> Version {
        Version::parse(text).unwrap()
    }

    #[test]
    fn a_version_below_the_floor_is_refused_and_one_at_the_floor_is_not() {
        let any = device("x86_64", &[]);
        assert_eq!(admit(&manifest("1.2.0"), &any, Some(&v("1.2.0"))), Ok(()));
        assert_eq!(admit(&manifest("1.3.0"), &any, Some(&v("1.2.0"))), Ok(()));
        assert_eq!(admit(&manifest("1.0.0"), &any, None), Ok(()));
        let refusal = admit(&manifest("1.1.9"), &any, Some(&v("1.2.0"))).unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "tabular 1.1.9 is below the floor 1.2.0 this device has seen for tabular, so it is not installed"
        );
        // A prerelease of the floor is below it.
        assert!(admit(&manifest("1.2.0-rc.1"), &any, Some(&v("1.2.0"))).is_err());
    }

    #[test]
    fn floors_only_rise() {
        let mut raising = manifest("2.0.0");
        raising.floor = Some(v("1.5.0"));
        assert_eq!(raised_floor(None, &raising), Some(v("1.5.0")));
        assert_eq!(raised_floor(Some(&v("1.0.0")), &raising), Some(v("1.5.0")));
        assert_eq!(raised_floor(Some(&v("1.8.0")), &raising), Some(v("1.8.0")), "a lower floor does not lower it");
        assert_eq!(raised_floor(Some(&v("1.8.0")), &manifest("2.0.0")), Some(v("1.8.0")), "no floor keeps it");
        assert_eq!(raised_floor(None, &manifest("2.0.0")), None);
    }

    #[test]
    fn a_bundle_for_another_architecture_or_labels_is_refused_with_the_reason() {
        let mut bound = manifest("1.0.0");
        bound.targets.arch = vec!["aarch64".into(), "arm".into()];
        bound.targets.labels = [("accelerator".to_string(), "npu".to_string())].into();
        assert_eq!(admit(&bound, &device("aarch64", &[("accelerator", "npu"), ("site", "a")]), None), Ok(()));
        let wrong_arch = admit(&bound, &device("x86_64", &[("accelerator", "npu")]), None).unwrap_err();
        assert_eq!(
            wrong_arch.to_string(),
            "tabular 1.0.0 is built for aarch64 or arm and this device is x86_64, so it is not installed"
        );
        let missing = admit(&bound, &device("arm", &[]), None).unwrap_err();
        assert!(
            missing.to_string().contains("labelled accelerator=npu and this device has no such label"),
            "{missing}"
        );
        let other = admit(&bound, &device("arm", &[("accelerator", "gpu")]), None).unwrap_err();
        assert!(other.to_string().contains("this device has accelerator=gpu"), "{other}");
    }
}
