//! `fleetctl broker config`: writes a Mosquitto setup for the fleet (see
//! `fleet_server::broker::mosquitto` for what each file holds and who keeps it current).

use std::path::Path;

use anyhow::{bail, Context, Result};
use fleet_server::broker::mosquitto::broker_config;
use fleet_server::broker::SERVER_USERNAME;

/// Writes the four files into `out` (refusing to overwrite a setup) and returns how to run them.
pub fn write(out: &Path, bind: &str, port: u16, tls: Option<(&Path, &Path)>) -> Result<String> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let out = out.canonicalize().with_context(|| format!("cannot resolve {}", out.display()))?;
    if out.join("passwords").exists() {
        bail!(
            "{} exists; refusing to overwrite a broker setup (choose another --out)",
            out.join("passwords").display()
        );
    }
    let config = broker_config(&out, bind, port, tls, SERVER_USERNAME);
    let files = [
        ("mosquitto.conf", config.mosquitto_conf.as_str(), false),
        ("acl", config.acl.as_str(), false),
        ("passwords", config.passwords.as_str(), true),
        ("server.password", config.server_password.as_str(), true),
    ];
    for (name, text, secret) in files {
        let path = out.join(name);
        let mode = if secret { 0o600 } else { 0o644 };
        crate::pki::create_new(&path, text, mode).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let scheme = if tls.is_some() { "mqtts" } else { "mqtt" };
    let server_port = if tls.is_some() { port.saturating_add(1) } else { port };
    Ok(format!(
        "Mosquitto setup in {dir}. Start the broker, then the server beside it:\n  \
         mosquitto -c {dir}/mosquitto.conf\n  \
         fleet-server --mqtt-url mqtt://127.0.0.1:{server_port} --mqtt-password-file {dir}/server.password \\\n    \
         --mosquitto-password-file {dir}/passwords --mosquitto-pid-file {dir}/mosquitto.pid ...\n\
         Agents use mqtt_url = \"{scheme}://<this host>:{port}\". The password file must be readable by Mosquitto \
         and writable by fleet-server.",
        dir = out.display()
    ))
}
