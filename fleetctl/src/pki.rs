//! `fleetctl pki`: a private CA for one fleet and server certificates signed by it (ECDSA P-256,
//! rcgen on ring). Agents pin the CA (`ca_file`); the server serves the issued chain with
//! `--tls-cert` / `--tls-key`. Secret keys are written 0600 and never overwritten.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} exists; refusing to overwrite a key (choose another --out)")]
    Exists(PathBuf),
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("{path} is not a CA made by `fleetctl pki init`: {reason}")]
    NotCa { path: PathBuf, reason: String },
    #[error("host {0:?} is neither a DNS name nor an IP address")]
    BadHost(String),
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
/// The CA's common name, kept beside it so `issue` can name the issuer exactly as the CA
/// certificate names its subject.
const CA_NAME: &str = "ca.name";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks a little behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

fn ca_params(name: &str, days: u32) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    params
}

/// Writes `text` to a new file, readable by its owner only when `secret`.
fn create(path: &Path, text: &str, secret: bool) -> Result<(), PkiError> {
    create_new(path, text, if secret { 0o600 } else { 0o644 }).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => PkiError::Exists(path.to_path_buf()),
        _ => PkiError::Io { path: path.to_path_buf(), source: e },
    })
}

/// Creates `path` with `mode` and writes `text`; fails if it exists (keys are never overwritten).
pub fn create_new(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// Makes `<out>/ca.pem`, `<out>/ca.key` (0600) and `<out>/ca.name`; returns the cert and key paths.
pub fn init(out: &Path, name: &str, valid_days: u32) -> Result<(PathBuf, PathBuf), PkiError> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let (cert_path, key_path) = (out.join(CA_CERT), out.join(CA_KEY));
    if key_path.exists() {
        return Err(PkiError::Exists(key_path));
    }
    let key = KeyPair::generate()?;
    let cert = ca_params(name, valid_days).self_signed(&key)?;
    create(&key_path, &key.serialize_pem(), true)?;
    create(&cert_path, &cert.pem(), false)?;
    create(&out.join(CA_NAME), name, false)?;
    Ok((cert_path, key_path))
}

/// Issues a server certificate for `hosts` signed by the CA in `ca_dir`: `<out>/<name>.pem` holds
/// the certificate followed by the CA's (the chain to serve), `<out>/<name>.key` its key (0600).
pub fn issue(
    ca_dir: &Path,
    out: &Path,
    name: &str,
    hosts: &[String],
    valid_days: u32,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let read = |file: &str| {
        let path = ca_dir.join(file);
        std::fs::read_to_string(&path).map_err(|e| PkiError::NotCa { path, reason: e.to_string() })
    };
    let (ca_pem, ca_key, ca_name) = (read(CA_CERT)?, read(CA_KEY)?, read(CA_NAME)?);
    let ca_key =
        KeyPair::from_pem(&ca_key).map_err(|e| PkiError::NotCa { path: ca_dir.join(CA_KEY), reason: e.to_string() })?;
    let issuer = Issuer::new(ca_params(ca_name.trim(), valid_days), ca_key);

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, hosts.first().map_or(name, String::as_str));
    params.distinguished_name = dn;
    params.subject_alt_names = hosts.iter().map(|h| san(h)).collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, valid_days);

    std::fs::create_dir_all(out).map_err(io(out))?;
    let (cert_path, key_path) = (out.join(format!("{name}.pem")), out.join(format!("{name}.key")));
    if key_path.exists() {
        return Err(PkiError::Exists(key_path));
    }
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    create(&key_path, &key.serialize_pem(), true)?;
    create(&cert_path, &format!("{}{}", cert.pem(), ca_pem), false)?;
    Ok((cert_path, key_path))
}

fn san(host: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns = host.to_string().try_into().map_err(|_| PkiError::BadHost(host.to_string()))?;
    Ok(SanType::DnsName(dns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn issued_certificates_chain_to_the_ca_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ca_key) = init(&dir.path().join("ca"), "test CA", 30).unwrap();
        let (cert, key) = issue(
            &dir.path().join("ca"),
            &dir.path().join("srv"),
            "server",
            &["localhost".into(), "127.0.0.1".into()],
            30,
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        for secret in [&ca_key, &key] {
            assert_eq!(std::fs::metadata(secret).unwrap().permissions().mode() & 0o777, 0o600, "{}", secret.display());
        }
        // rustls accepts the chain for 127.0.0.1 with only the CA as root.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let chain = fleet_server::tls::read_certs(&cert).unwrap();
        assert_eq!(chain.len(), 2, "the served chain holds the server certificate and the CA");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(fleet_server::tls::read_certs(&ca).unwrap().remove(0)).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder(roots.into()).build().unwrap();
        let now = rustls::pki_types::UnixTime::now();
        for host in ["127.0.0.1", "localhost"] {
            let name = rustls::pki_types::ServerName::try_from(host).unwrap();
            verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], now).unwrap();
        }
        let other = rustls::pki_types::ServerName::try_from("fleet.example").unwrap();
        assert!(verifier.verify_server_cert(&chain[0], &chain[1..], &other, &[], now).is_err());
        assert!(
            matches!(init(&dir.path().join("ca"), "again", 30), Err(PkiError::Exists(_))),
            "keys are never overwritten"
        );
    }
}
