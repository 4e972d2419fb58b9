use super::*;
use crate::keys::public_key_hex;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn id(key: &SigningKey) -> String {
    KeyId::of(&key.verifying_key()).to_string()
}

/// Root `version` with root keys `roots` (threshold `k`), one targets and one timestamp key,
/// unsigned.
fn root(version: u64, roots: &[&SigningKey], k: u32) -> SignedRoot {
    let (targets, timestamp) = (key(100), key(101));
    let mut keys: BTreeMap<String, String> =
        roots.iter().map(|r| (id(r), public_key_hex(&r.verifying_key()))).collect();
    keys.insert(id(&targets), public_key_hex(&targets.verifying_key()));
    keys.insert(id(&timestamp), public_key_hex(&timestamp.verifying_key()));
    SignedRoot {
        signed: Root {
            version,
            expires: 2_000_000_000,
            keys,
            roles: Roles {
                root: Role { keyids: roots.iter().map(|r| id(r)).collect(), threshold: k },
                targets: Role { keyids: vec![id(&targets)], threshold: 1 },
                timestamp: Role { keyids: vec![id(&timestamp)], threshold: 1 },
            },
        },
        signatures: Vec::new(),
    }
}

fn signed(mut root: SignedRoot, by: &[&SigningKey]) -> SignedRoot {
    for key in by {
        root.sign(key);
    }
    root
}

const NOW: u64 = 1_800_000_000;

#[test]
fn an_initial_root_needs_a_threshold_of_its_own_root_keys() {
    let (a, b, c) = (key(1), key(2), key(3));
    let two_of_three = root(1, &[&a, &b, &c], 2);
    assert_eq!(
        signed(two_of_three.clone(), &[&a]).verify_initial(),
        Err(RootError::BelowThreshold { version: 1, whose: "its own", valid: 1, threshold: 2 })
    );
    assert!(signed(two_of_three.clone(), &[&a, &c]).verify_initial().is_ok());
    // The same key twice is one signature.
    let mut twice = signed(two_of_three.clone(), &[&a]);
    twice.signatures.push(twice.signatures[0].clone());
    assert!(matches!(twice.verify_initial(), Err(RootError::BelowThreshold { valid: 1, .. })));
    // Signatures by keys outside the root role count for nothing.
    assert!(matches!(
        signed(two_of_three, &[&a, &key(100)]).verify_initial(),
        Err(RootError::BelowThreshold { valid: 1, .. })
    ));
}

#[test]
fn a_rotation_needs_a_threshold_of_the_old_root_keys_and_of_the_new() {
    let (a, b, c, d) = (key(1), key(2), key(3), key(4));
    let current = signed(root(1, &[&a, &b], 2), &[&a, &b]).verify_initial().unwrap();
    // Root 2 replaces b with c (threshold 2 of a, c).
    let next = root(2, &[&a, &c], 2);
    assert!(rotate(&current, &signed(next.clone(), &[&a, &b, &c]), NOW).is_ok());
    assert_eq!(
        rotate(&current, &signed(next.clone(), &[&a, &c]), NOW),
        Err(RootError::BelowThreshold { version: 2, whose: "current", valid: 1, threshold: 2 }),
        "a stolen new key and one old key are not enough"
    );
    assert_eq!(
        rotate(&current, &signed(next.clone(), &[&a, &b]), NOW),
        Err(RootError::BelowThreshold { version: 2, whose: "its own", valid: 1, threshold: 2 }),
        "the new keys must accept their role"
    );
    // Keys nobody trusts cannot make a root at all.
    let forged = signed(root(2, &[&d], 1), &[&d]);
    assert!(matches!(rotate(&current, &forged, NOW), Err(RootError::BelowThreshold { whose: "current", .. })));
}

#[test]
fn a_rotation_must_raise_the_version_by_one_and_not_be_expired() {
    let a = key(1);
    let current = signed(root(1, &[&a], 1), &[&a]).verify_initial().unwrap();
    let skip = signed(root(3, &[&a], 1), &[&a]);
    assert_eq!(rotate(&current, &skip, NOW), Err(RootError::NotNext { current: 1, found: 3 }));
    let same = signed(root(1, &[&a], 1), &[&a]);
    assert_eq!(rotate(&current, &same, NOW), Err(RootError::NotNext { current: 1, found: 1 }));
    let mut stale = root(2, &[&a], 1);
    stale.signed.expires = NOW;
    assert!(matches!(rotate(&current, &signed(stale, &[&a]), NOW), Err(RootError::Expired { .. })));
}

#[test]
fn an_altered_root_fails_its_signature() {
    let a = key(1);
    let mut altered = signed(root(1, &[&a], 1), &[&a]);
    altered.signed.expires += 1;
    assert_eq!(altered.verify_initial(), Err(RootError::BadSignature { version: 1, keyid: id(&a) }));
}

#[test]
fn a_root_whose_roles_do_not_add_up_is_refused() {
    let a = key(1);
    let mut zero = root(1, &[&a], 1);
    zero.signed.roles.targets.threshold = 0;
    assert!(matches!(zero.signed.check(), Err(RootError::Threshold { role: "targets", .. })));
    let mut too_high = root(1, &[&a], 2);
    assert!(matches!(too_high.signed.check(), Err(RootError::Threshold { role: "root", .. })));
    too_high.signed.roles.root.threshold = 1;
    too_high.signed.roles.timestamp.keyids.push("0011223344556677".into());
    assert!(matches!(too_high.signed.check(), Err(RootError::UnknownRoleKey { role: "timestamp", .. })));
    let mut mislabelled = root(1, &[&a], 1);
    let public = mislabelled.signed.keys.remove(&id(&a)).unwrap();
    mislabelled.signed.keys.insert("0011223344556677".into(), public);
    assert!(matches!(mislabelled.signed.check(), Err(RootError::KeyIdMismatch { .. })));
}

#[test]
fn a_root_survives_its_file_and_gives_the_targets_threshold_to_bundles() {
    let a = key(1);
    let mut two_targets = root(1, &[&a], 1);
    let extra = key(102);
    two_targets.signed.keys.insert(id(&extra), public_key_hex(&extra.verifying_key()));
    two_targets.signed.roles.targets = Role { keyids: vec![id(&key(100)), id(&extra)], threshold: 2 };
    let file = signed(two_targets, &[&a]).to_json_bytes();
    let root = SignedRoot::parse(&file).unwrap().verify_initial().unwrap();
    let targets = root.targets();
    assert_eq!(targets.threshold(), 2);
    assert!(targets.get(&KeyId::of(&extra.verifying_key())).is_some());
    assert!(targets.get(&KeyId::of(&a.verifying_key())).is_none(), "root keys do not sign bundles");
}
