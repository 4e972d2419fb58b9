//! Operators are named tokens with a role. A viewer reads but cannot change anything; an operator
//! runs deployments but cannot manage identities; each refusal is one sentence naming the role.
//! The audit log names the authenticated operator (a client cannot choose its actor), and a
//! revoked operator's token stops working.

use fleet_tests::*;
use fleetctl::client::{ClientError, FleetClient};
use proto::wire::{AuditAction, DeployRequest, Role};

fn refused(result: Result<impl std::fmt::Debug, ClientError>) -> String {
    match result {
        Err(ClientError::Refused { message, .. }) => message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_viewer_reads_an_operator_deploys_and_only_an_admin_manages_identities() {
    let fleet = Fleet::start(1, mqtt_from_env(), &[]).await;
    let admin = &fleet.client;
    let vera = admin.add_operator("vera", Role::Viewer).await.unwrap();
    let otto = admin.add_operator("otto", Role::Operator).await.unwrap();
    let url = fleet.server.url();
    let (viewer, operator) = (FleetClient::new(&url, &vera.token), FleetClient::new(&url, &otto.token));
    let bundle = fixture_bundle(&fleet.secret, "1.0.0", MLP).unwrap();
    let deploy = DeployRequest { model: "tabular".into(), version: "1.0.0".into(), devices: None, selector: None };

    // The viewer reads everything and changes nothing.
    assert_eq!(viewer.devices().await.unwrap().len(), 1);
    viewer.rollouts().await.unwrap();
    viewer.audit(None).await.unwrap();
    viewer.delivery().await.unwrap();
    for message in [
        refused(viewer.publish(bundle.clone()).await),
        refused(viewer.deploy(&deploy).await),
        refused(viewer.tokens(1).await),
        refused(viewer.add_operator("eve", Role::Admin).await),
    ] {
        assert!(message.contains("vera has the viewer role"), "{message}");
    }

    // The operator changes the fleet but not who may.
    operator.publish(bundle).await.unwrap();
    operator.deploy(&deploy).await.unwrap();
    operator.tokens(1).await.unwrap();
    let device = fleet.agents[0].device_id().unwrap();
    let message = refused(operator.revoke_device(&device).await);
    assert!(message.contains("otto has the operator role; this needs admin"), "{message}");
    let message = refused(operator.operators().await);
    assert!(message.contains("needs admin"), "{message}");

    // A client cannot put another name in the audit log: the actor is the token's operator.
    let response = edge_agent::http::client()
        .post(format!("{url}/api/v1/deployments"))
        .bearer_auth(&otto.token)
        .header("x-fleet-actor", "mallory")
        .json(&deploy)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let audit = admin.audit(None).await.unwrap();
    let deploys: Vec<_> = audit.iter().filter(|e| e.action == AuditAction::Deploy).collect();
    assert_eq!(deploys.len(), 2, "{audit:?}");
    assert!(deploys.iter().all(|e| e.actor == "otto"), "{deploys:?}");
    assert!(audit.iter().any(|e| e.action == AuditAction::OperatorAdded && e.actor == "admin"));

    // Revoked: the token is refused everywhere.
    admin.revoke_operator("otto").await.unwrap();
    let message = refused(operator.devices().await);
    assert!(message.contains("bearer token"), "{message}");
    let listed = admin.operators().await.unwrap();
    let otto_view = listed.iter().find(|o| o.name == "otto").unwrap();
    assert!(otto_view.revoked_ms.is_some());
    assert_eq!(listed.iter().find(|o| o.name == "admin").unwrap().role, Role::Admin);
    let message = refused(admin.revoke_operator("admin").await);
    assert!(message.contains("cannot revoke its own"), "{message}");
    fleet.shutdown().await;
}
