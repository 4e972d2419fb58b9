//! `fleetctl models` and `fleetctl devices show ID`: where each model version came from, and
//! how each device got what it runs.

use anyhow::Result;
use proto::lineage::{DeviceDetail, ModelVersionView};

use crate::ServerArgs;

pub async fn models(json: bool, server: &ServerArgs) -> Result<()> {
    let models = server.client()?.models().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&models)?);
    } else {
        print!("{}", render_models(&models));
    }
    Ok(())
}

pub async fn device(id: &str, json: bool, server: &ServerArgs) -> Result<()> {
    let detail = server.client()?.device(id).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&detail)?);
    } else {
        print!("{}", render_device(&detail));
    }
    Ok(())
}

fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

pub fn render_models(models: &[ModelVersionView]) -> String {
    let mut out = format!(
        "{:<12} {:<10} {:<13} {:<17} {:<11} {:<16} {:<10} metrics\n",
        "model", "version", "sha256", "signer", "created", "training data", "commit"
    );
    for m in models {
        let metrics: Vec<String> = m.lineage.metrics.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!(
            "{:<12} {:<10} {:<13} {:<17} {:<11} {:<16} {:<10} {}\n",
            m.name,
            m.version,
            short(&m.sha256),
            m.signed_by,
            m.created_at,
            short(m.lineage.training_data.trim_start_matches("sha256:")),
            m.lineage.code_commit,
            metrics.join(" ")
        ));
    }
    out
}

pub fn render_device(d: &DeviceDetail) -> String {
    let labels: Vec<String> = d.device.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut out = format!("{} ({}) labels: {}\n", d.device.id, d.device.name, labels.join(" "));
    for m in &d.models {
        out.push_str(&format!(
            "model {}: active {} (previous {}), bundle {}, installed by {}{}\n",
            m.name,
            m.active_version.as_deref().unwrap_or("-"),
            m.previous_version.as_deref().unwrap_or("-"),
            m.bundle_sha256.as_deref().map(short).unwrap_or("-"),
            m.installed_by.as_deref().unwrap_or("-"),
            m.installed_ms.map(|ms| format!(" at {ms} ms")).unwrap_or_default()
        ));
        if let Some(l) = &m.lineage {
            out.push_str(&format!("  lineage: training data {}, code {}\n", l.training_data, l.code_commit));
        }
        for e in m.history.iter().take(10) {
            let detail = if e.detail.is_empty() { String::new() } else { format!(" ({})", e.detail) };
            out.push_str(&format!("  {:>15} {} {}{detail}\n", e.at_ms, e.version, e.step.as_str()));
        }
    }
    if !d.audit.is_empty() {
        out.push_str("audit:\n");
        for a in d.audit.iter().take(20) {
            out.push_str(&format!("  {:>15} {} {} {}\n", a.at_ms, a.actor, a.action.as_str(), a.detail));
        }
    }
    out
}
