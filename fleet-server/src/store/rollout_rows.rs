//! How both stores lay a rollout out: its head (everything but the members) as JSON in the
//! rollout's row, and each member as JSON in a `rollout_members` row of its own, so a save writes
//! only the members that changed (`MemberWrites`).

use std::collections::BTreeMap;

use crate::rollout::state::RolloutHead;
use crate::rollout::{Member, MemberWrites, Rollout};
use crate::store::StoreError;

/// The rollout's head, as the rollout's row keeps it.
pub fn head_json(rollout: &Rollout) -> Result<String, StoreError> {
    serde_json::to_string(&rollout.head()).map_err(|e| StoreError::Corrupt(format!("rollout {}: {e}", rollout.id)))
}

/// The (device, member JSON) rows a save writes.
pub fn member_rows(rollout: &Rollout, writes: &MemberWrites) -> Result<(Vec<String>, Vec<String>), StoreError> {
    let chosen: Vec<(&String, &Member)> = match writes {
        MemberWrites::All => rollout.members.iter().collect(),
        MemberWrites::Only(ids) => ids
            .iter()
            .map(|id| {
                rollout.members.get_key_value(id).ok_or_else(|| {
                    StoreError::Corrupt(format!("rollout {} saves member {id}, which it does not have", rollout.id))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let mut devices = Vec::with_capacity(chosen.len());
    let mut members = Vec::with_capacity(chosen.len());
    for (device, member) in chosen {
        devices.push(device.clone());
        members.push(
            serde_json::to_string(member)
                .map_err(|e| StoreError::Corrupt(format!("rollout {} member {device}: {e}", rollout.id)))?,
        );
    }
    Ok((devices, members))
}

/// The rollout stored as `head` (its row's JSON) and `members` ((device, member JSON) rows).
pub fn rollout_from_rows(
    head: &str,
    revision: u64,
    members: impl IntoIterator<Item = (String, String)>,
) -> Result<Rollout, StoreError> {
    let head: RolloutHead =
        serde_json::from_str(head).map_err(|e| StoreError::Corrupt(format!("rollout state: {e}")))?;
    let members = members
        .into_iter()
        .map(|(device, text)| {
            let member: Member = serde_json::from_str(&text)
                .map_err(|e| StoreError::Corrupt(format!("rollout {} member {device}: {e}", head.id)))?;
            Ok((device, member))
        })
        .collect::<Result<BTreeMap<_, _>, StoreError>>()?;
    Ok(Rollout::from_parts(head, members, revision))
}
