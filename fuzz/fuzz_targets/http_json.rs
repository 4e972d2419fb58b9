//! JSON bodies from the other side: what the agent reads from the server (check-in reply, with
//! the field validation done before any use; enrollment reply; telemetry acknowledgement) and
//! what the server reads from devices and operators.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::delivery::TelemetryAck;
use proto::rollout::RolloutPlan;
use proto::wire::{CheckinRequest, DesiredState, EnrollRequest, EnrollResponse, OperatorRequest, TokenRequest};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    match kind % 7 {
        0 => {
            if let Ok(desired) = serde_json::from_slice::<DesiredState>(body) {
                for model in &desired.models {
                    let _ = proto::desired::validate(model);
                }
            }
        }
        1 => drop(serde_json::from_slice::<EnrollResponse>(body)),
        2 => drop(serde_json::from_slice::<TelemetryAck>(body)),
        3 => drop(serde_json::from_slice::<EnrollRequest>(body)),
        4 => drop(serde_json::from_slice::<CheckinRequest>(body)),
        5 => drop(serde_json::from_slice::<RolloutPlan>(body)),
        _ => {
            let _ = serde_json::from_slice::<OperatorRequest>(body);
            let _ = serde_json::from_slice::<TokenRequest>(body);
        }
    }
});
