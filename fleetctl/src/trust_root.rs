//! `fleetctl root`: writing and changing root-of-trust documents offline (ADR 0010). A root is
//! written unsigned, then signed by each key holder (`fleetctl root sign`), then published.

use std::collections::BTreeMap;

use proto::keys::{public_key_hex, KeyId, VerifyingKey};
use proto::root::{Role, Roles, Root, SignedRoot};

/// The keys and threshold of one role.
#[derive(Clone, Debug)]
pub struct RoleKeys {
    pub keys: Vec<VerifyingKey>,
    pub threshold: u32,
}

/// What a new root says, or what a rotation changes (a role left `None` is kept).
#[derive(Clone, Debug, Default)]
pub struct RootChanges {
    pub root: Option<RoleKeys>,
    pub targets: Option<RoleKeys>,
    pub timestamp: Option<RoleKeys>,
    /// Unix seconds.
    pub expires: Option<u64>,
}

fn role(keys: &RoleKeys) -> Role {
    Role { keyids: keys.keys.iter().map(|k| KeyId::of(k).to_string()).collect(), threshold: keys.threshold }
}

/// The keys every role names, and nothing else: a key that leaves every role is revoked.
fn keys_of(roots: &Root, changes: &RootChanges) -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    for (change, kept) in [
        (&changes.root, &roots.roles.root),
        (&changes.targets, &roots.roles.targets),
        (&changes.timestamp, &roots.roles.timestamp),
    ] {
        match change {
            Some(given) => {
                for key in &given.keys {
                    keys.insert(KeyId::of(key).to_string(), public_key_hex(key));
                }
            }
            None => {
                for id in &kept.keyids {
                    if let Some(public) = roots.keys.get(id) {
                        keys.insert(id.clone(), public.clone());
                    }
                }
            }
        }
    }
    keys
}

/// Root 1 from every role's keys, unsigned; `None` when a role is missing.
pub fn first(changes: &RootChanges, expires: u64) -> Option<SignedRoot> {
    let (root, targets, timestamp) = (changes.root.as_ref()?, changes.targets.as_ref()?, changes.timestamp.as_ref()?);
    let empty = Root {
        version: 1,
        expires,
        keys: BTreeMap::new(),
        roles: Roles { root: role(root), targets: role(targets), timestamp: role(timestamp) },
    };
    let keys = keys_of(&empty, changes);
    Some(SignedRoot { signed: Root { keys, ..empty }, signatures: Vec::new() })
}

/// The next root after `previous` with `changes` applied, unsigned: it then needs a threshold of
/// `previous`'s root keys and of its own.
pub fn next(previous: &Root, changes: &RootChanges) -> SignedRoot {
    let pick = |change: &Option<RoleKeys>, kept: &Role| change.as_ref().map_or_else(|| kept.clone(), role);
    let roles = Roles {
        root: pick(&changes.root, &previous.roles.root),
        targets: pick(&changes.targets, &previous.roles.targets),
        timestamp: pick(&changes.timestamp, &previous.roles.timestamp),
    };
    let signed = Root {
        version: previous.version + 1,
        expires: changes.expires.unwrap_or(previous.expires),
        keys: keys_of(previous, changes),
        roles,
    };
    SignedRoot { signed, signatures: Vec::new() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::keys::SigningKey;
    use proto::root::rotate;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn one(key: &SigningKey) -> Option<RoleKeys> {
        Some(RoleKeys { keys: vec![key.verifying_key()], threshold: 1 })
    }

    #[test]
    fn a_rotation_that_replaces_the_targets_key_revokes_the_old_one() {
        let (root_key, old_targets, new_targets, timestamp) = (key(1), key(2), key(3), key(4));
        let changes =
            RootChanges { root: one(&root_key), targets: one(&old_targets), timestamp: one(&timestamp), expires: None };
        let mut first = first(&changes, 2_000_000_000).unwrap();
        first.sign(&root_key);
        let current = first.verify_initial().unwrap();
        assert_eq!(current.keys.len(), 3);

        let mut second = next(&current, &RootChanges { targets: one(&new_targets), ..RootChanges::default() });
        assert_eq!(second.signed.version, 2);
        assert!(!second.signed.keys.contains_key(&KeyId::of(&old_targets.verifying_key()).to_string()), "revoked");
        second.sign(&root_key);
        let rotated = rotate(&current, &second, 1_800_000_000).unwrap();
        assert!(rotated.targets().get(&KeyId::of(&new_targets.verifying_key())).is_some());
        assert!(rotated.targets().get(&KeyId::of(&old_targets.verifying_key())).is_none());
        assert_eq!(rotated.roles.root, current.roles.root, "roles not named are kept");
    }

    #[test]
    fn a_first_root_needs_every_role() {
        let changes = RootChanges { root: one(&key(1)), targets: one(&key(2)), ..RootChanges::default() };
        assert!(first(&changes, 1).is_none());
    }
}
