use super::*;
use crate::keys::{parse_secret_key, TrustedKeys};
use ed25519_dalek::SigningKey;

fn key(seed: u8) -> SigningKey {
    parse_secret_key(&hex::encode([seed; 32])).unwrap()
}

fn manifest(model: &[u8]) -> Manifest {
    let contract = ModelContract {
        input: TensorSpec { name: "features".into(), dtype: DType::F32, shape: vec![1, 2] },
        output: TensorSpec { name: "probabilities".into(), dtype: DType::F32, shape: vec![1, 2] },
        feature_names: vec!["a".into(), "b".into()],
        output_labels: vec![],
        features: vec![],
    };
    Manifest {
        created_at: 1,
        golden: GoldenSet {
            tolerance: 1e-4,
            cases: vec![GoldenCase { input: vec![0.0, 1.0], expected: vec![0.5, 0.5] }],
        },
        ..Manifest::for_model("tabular", semver::Version::new(1, 0, 0), model, contract)
    }
}

fn signed_bundle(signer: &SigningKey) -> Vec<u8> {
    let model = b"onnx bytes".to_vec();
    let mut bundle = UnverifiedBundle {
        manifest_bytes: manifest(&model).to_json_bytes(),
        signatures: BTreeMap::new(),
        files: [(MODEL_PATH.to_string(), model)].into(),
    };
    add_signature(&mut bundle, signer);
    write_archive(&bundle.manifest_bytes, &bundle.files, &bundle.signatures)
}

fn verify(bytes: &[u8], trusted: &TrustedKeys) -> Result<VerifiedBundle, VerifyError> {
    read_archive(bytes, &Limits::default())?.verify(trusted)
}

fn trusted() -> TrustedKeys {
    TrustedKeys::new([key(1).verifying_key()])
}

#[test]
fn a_signed_bundle_verifies_with_its_key() {
    let verified = verify(&signed_bundle(&key(1)), &trusted()).unwrap();
    assert_eq!(verified.manifest.name, "tabular");
    assert_eq!(verified.model_bytes(), b"onnx bytes");
    assert_eq!(verified.signed_by, crate::KeyId::of(&key(1).verifying_key()));
}

#[test]
fn writing_the_same_bundle_twice_gives_the_same_bytes() {
    assert_eq!(signed_bundle(&key(1)), signed_bundle(&key(1)));
}

/// Replaces the first occurrence of `from` in the archive bytes by `to` (same length).
fn patch(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = bytes.windows(from.len()).position(|w| w == from).expect("pattern present");
    let mut out = bytes.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    // Keep the tar header checksums right so only our tamper is detected, not a broken archive.
    let mut bundle = read_archive(&out, &Limits::default()).unwrap();
    let rewritten = write_archive(&bundle.manifest_bytes, &bundle.files, &std::mem::take(&mut bundle.signatures));
    let original = read_archive(bytes, &Limits::default()).unwrap();
    let mut again = read_archive(&rewritten, &Limits::default()).unwrap();
    again.signatures = original.signatures;
    write_archive(&again.manifest_bytes, &again.files, &again.signatures)
}

#[test]
fn a_changed_model_byte_is_rejected_as_a_digest_mismatch() {
    let tampered = patch(&signed_bundle(&key(1)), b"onnx bytes", b"onnx bytez");
    let err = verify(&tampered, &trusted()).unwrap_err();
    assert!(matches!(err, VerifyError::DigestMismatch { ref path, .. } if path == MODEL_PATH), "{err}");
}

#[test]
fn a_changed_manifest_byte_is_rejected_as_a_bad_signature() {
    let tampered = patch(&signed_bundle(&key(1)), b"\"tabular\"", b"\"tabulax\"");
    let err = verify(&tampered, &trusted()).unwrap_err();
    assert!(matches!(err, VerifyError::BadSignature { .. }), "{err}");
}

#[test]
fn a_bundle_signed_by_an_unknown_key_is_rejected_naming_the_key() {
    let err = verify(&signed_bundle(&key(2)), &trusted()).unwrap_err();
    let id = crate::KeyId::of(&key(2).verifying_key()).to_string();
    assert!(matches!(err, VerifyError::UntrustedSigner(ref ids) if ids == &id), "{err}");
}

#[test]
fn a_bundle_without_signatures_is_rejected() {
    let mut bundle = read_archive(&signed_bundle(&key(1)), &Limits::default()).unwrap();
    bundle.signatures.clear();
    let bytes = write_archive(&bundle.manifest_bytes, &bundle.files, &bundle.signatures);
    assert!(matches!(verify(&bytes, &trusted()), Err(VerifyError::MissingSignature)));
}

#[test]
fn a_file_not_in_the_manifest_is_rejected() {
    let mut bundle = read_archive(&signed_bundle(&key(1)), &Limits::default()).unwrap();
    bundle.files.insert("extra.bin".into(), b"surprise".to_vec());
    let bytes = write_archive(&bundle.manifest_bytes, &bundle.files, &bundle.signatures);
    assert!(matches!(verify(&bytes, &trusted()), Err(VerifyError::UnlistedFile(p)) if p == "extra.bin"));
}

#[test]
fn a_missing_listed_file_is_rejected() {
    let mut bundle = read_archive(&signed_bundle(&key(1)), &Limits::default()).unwrap();
    bundle.files.clear();
    let bytes = write_archive(&bundle.manifest_bytes, &bundle.files, &bundle.signatures);
    assert!(matches!(verify(&bytes, &trusted()), Err(VerifyError::MissingFile(p)) if p == MODEL_PATH));
}

#[test]
fn a_second_trusted_signature_that_is_bad_fails_verification() {
    let mut bundle = read_archive(&signed_bundle(&key(1)), &Limits::default()).unwrap();
    bundle.signatures.insert(crate::KeyId::of(&key(3).verifying_key()), vec![0; 64]);
    let bytes = write_archive(&bundle.manifest_bytes, &bundle.files, &bundle.signatures);
    let both = TrustedKeys::new([key(1).verifying_key(), key(3).verifying_key()]);
    assert!(matches!(verify(&bytes, &both), Err(VerifyError::BadSignature { .. })));
}

#[test]
fn path_traversal_and_links_in_the_archive_are_refused() {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(1);
    header.set_entry_type(tar::EntryType::Regular);
    // set_path refuses "..", so write the raw name field as an attacker would.
    header.as_old_mut().name[..8].copy_from_slice(b"../evil\0");
    header.set_cksum();
    builder.append(&header, &b"x"[..]).unwrap();
    let err = read_archive(&builder.into_inner().unwrap(), &Limits::default()).unwrap_err();
    assert!(matches!(err, ArchiveError::UnsafeEntry(p) if p == "../evil"));

    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_entry_type(tar::EntryType::Symlink);
    builder.append_link(&mut header, "model.onnx", "/etc/passwd").unwrap();
    let err = read_archive(&builder.into_inner().unwrap(), &Limits::default()).unwrap_err();
    assert!(matches!(err, ArchiveError::UnsafeEntry(_)), "{err}");
}

#[test]
fn a_bundle_over_the_size_limit_is_refused_before_parsing() {
    let limits = Limits { max_bundle_bytes: 100, ..Limits::default() };
    assert!(matches!(read_archive(&signed_bundle(&key(1)), &limits), Err(ArchiveError::TooLarge { limit: 100 })));
}

#[test]
fn golden_cases_that_do_not_fit_the_contract_are_refused() {
    let mut m = manifest(b"x");
    m.golden.cases[0].input.push(1.0);
    assert!(matches!(m.check(), Err(ManifestError::GoldenInputLen { case: 0, got: 3, want: 2 })));
}

#[test]
fn a_bundle_read_from_a_stream_equals_the_one_read_from_bytes() {
    let bytes = signed_bundle(&key(1));
    let from_stream = read_archive_from(std::io::Cursor::new(&bytes), &Limits::default()).unwrap();
    let from_bytes = read_archive(&bytes, &Limits::default()).unwrap();
    assert_eq!(from_stream.manifest_bytes, from_bytes.manifest_bytes);
    assert_eq!(from_stream.files, from_bytes.files);
    assert_eq!(from_stream.signatures, from_bytes.signatures);
}

#[test]
fn a_stream_longer_than_the_bundle_limit_is_refused_as_too_large() {
    let bytes = signed_bundle(&key(1));
    let limits = Limits { max_bundle_bytes: 1024, ..Limits::default() };
    assert!(bytes.len() > 2048, "the fixture bundle has more than the limit before its end marker");
    let err = read_archive_from(std::io::Cursor::new(&bytes), &limits).unwrap_err();
    assert!(matches!(err, ArchiveError::TooLarge { .. }), "{err}");
}

#[test]
fn a_manifest_below_its_own_floor_or_with_an_odd_architecture_is_invalid() {
    let mut below = manifest(b"m");
    below.floor = Some(semver::Version::new(2, 0, 0));
    assert!(matches!(below.check(), Err(ManifestError::BelowOwnFloor { .. })));
    below.floor = Some(semver::Version::new(1, 0, 0));
    assert!(below.check().is_ok(), "a floor at its own version");
    below.targets.arch = vec!["../x86".into()];
    assert!(matches!(below.check(), Err(ManifestError::BadArch(_))));
}

#[test]
fn a_manifest_without_floor_or_targets_writes_neither() {
    let text = String::from_utf8(manifest(b"m").to_json_bytes()).unwrap();
    assert!(!text.contains("floor") && !text.contains("targets"), "{text}");
    let mut bound = manifest(b"m");
    bound.floor = Some(semver::Version::new(1, 0, 0));
    bound.targets.arch = vec!["aarch64".into()];
    assert_eq!(Manifest::parse(&bound.to_json_bytes()).unwrap(), bound);
}

#[test]
fn a_threshold_of_two_needs_two_distinct_trusted_signatures() {
    let (first, second) = (key(1), key(2));
    let both = TrustedKeys::new([first.verifying_key(), second.verifying_key()]).with_threshold(2);
    let one = signed_bundle(&first);
    assert!(matches!(verify(&one, &both), Err(VerifyError::BelowThreshold { valid: 1, threshold: 2 })));
    let mut bundle = read_archive(&one, &Limits::default()).unwrap();
    add_signature(&mut bundle, &second);
    let two = write_archive(&bundle.manifest_bytes, &bundle.files, &bundle.signatures);
    assert!(verify(&two, &both).is_ok());
    // A third signature by a key outside the set adds nothing and takes nothing away.
    add_signature(&mut bundle, &key(9));
    let three = write_archive(&bundle.manifest_bytes, &bundle.files, &bundle.signatures);
    assert!(verify(&three, &both).is_ok());
    let revoked = TrustedKeys::new([first.verifying_key(), key(3).verifying_key()]).with_threshold(2);
    assert!(matches!(verify(&three, &revoked), Err(VerifyError::BelowThreshold { valid: 1, .. })));
}

#[test]
fn a_manifest_and_model_from_two_releases_do_not_verify_together() {
    let signer = key(1);
    let release = |model: &[u8], version: u64| {
        let mut bundle = UnverifiedBundle {
            manifest_bytes: Manifest { version: semver::Version::new(version, 0, 0), ..manifest(model) }
                .to_json_bytes(),
            signatures: BTreeMap::new(),
            files: [(MODEL_PATH.to_string(), model.to_vec())].into(),
        };
        add_signature(&mut bundle, &signer);
        bundle
    };
    let (one, two) = (release(b"model one", 1), release(b"model two", 2));
    // Release 1's signed manifest with release 2's model: both parts are genuine, the pair is not.
    let mixed = write_archive(&one.manifest_bytes, &two.files, &one.signatures);
    let trusted = TrustedKeys::new([signer.verifying_key()]);
    assert!(matches!(verify(&mixed, &trusted), Err(VerifyError::DigestMismatch { .. })));
    // And release 2's manifest under release 1's signature.
    let swapped = write_archive(&two.manifest_bytes, &two.files, &one.signatures);
    assert!(matches!(verify(&swapped, &trusted), Err(VerifyError::BadSignature { .. })));
}
