//! `fleetctl image configure`: writes one device's agent config into a disk image made by
//! `images/build.sh`, at flash time, without root and without mounting anything.
//!
//! The image's first partition is a small FAT file system (the boot partition, like a Raspberry
//! Pi's or balena's). The config goes to `/edge-agent/` on it: `agent.toml`, and `ca.pem` and
//! `root.json` when given. On every boot the image's `edge-agent-image-config.service` copies a
//! changed `/edge-agent/` into `/etc/edge-agent/` before the agent starts, and the agent enrolls
//! with the token on its first start. So one built image serves a whole batch: copy it, configure
//! the copy with the next device's token, write it to the card.
//!
//! The config is rendered (`render`, pure) and checked by the agent's own config parser before
//! anything is written, so a device never boots with a config it refuses.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use thiserror::Error;

/// The directory on the boot partition that `edge-agent-image-config.service` reads.
pub const CONFIG_DIR: &str = "edge-agent";
/// Where the image's first-boot unit puts the files on the device's root file system.
pub const DEVICE_CONFIG_DIR: &str = "/etc/edge-agent";
/// The systemd unit of the .deb lets the agent write only here.
pub const DEVICE_DATA_DIR: &str = "/var/lib/edge-agent";
/// The port of the fleet server's embedded MQTT broker (plain and TLS alike).
pub const DEFAULT_MQTT_PORT: u16 = 1884;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("cannot open image {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path} has no MBR partition table (no 0x55AA signature in its first sector): is it an image made by images/build.sh?")]
    NoPartitionTable { path: PathBuf },
    #[error("{path} has no FAT partition in its MBR: images/build.sh puts the boot partition first")]
    NoBootPartition { path: PathBuf },
    #[error(
        "the boot partition of {path} ends at byte {end}, beyond the image's {size} bytes: the image is truncated"
    )]
    Truncated { path: PathBuf, end: u64, size: u64 },
    #[error("cannot write the config into the boot partition of {path}: {source}")]
    Fat { path: PathBuf, source: std::io::Error },
    #[error("--server {url:?} must be an http:// or https:// URL with a host")]
    ServerUrl { url: String },
    #[error("label {label:?} must look like key=value")]
    Label { label: String },
    #[error("the config would not load on the device: {0}")]
    Config(String),
    #[error("--ca {path}: {message}")]
    Ca { path: PathBuf, message: String },
}

/// What one device needs to enroll and trust its fleet.
#[derive(Clone, Debug, Default)]
pub struct DeviceSettings {
    pub server_url: String,
    /// Derived from the server URL when absent: same host, port 1884, mqtts:// for https://.
    pub mqtt_url: Option<String>,
    pub enrollment_token: String,
    /// Hex ed25519 public keys whose bundle signatures the device accepts.
    pub trusted_keys: Vec<String>,
    /// The signed root of trust (JSON) instead of `trusted_keys`.
    pub root_json: Option<Vec<u8>>,
    /// PEM of the fleet's CA, pinned by the device.
    pub ca_pem: Option<Vec<u8>>,
    pub labels: BTreeMap<String, String>,
    /// Shown to operators; the device's host name (unique per device) when empty.
    pub name: Option<String>,
    pub api_listen: Option<SocketAddr>,
    pub allow_insecure: bool,
}

/// The files written to `/edge-agent/` on the boot partition, by name.
pub type ConfigFiles = BTreeMap<&'static str, Vec<u8>>;

/// `mqtt(s)://<host of the server>:1884`.
pub fn derive_mqtt_url(server_url: &str) -> Result<String, ImageError> {
    let bad = || ImageError::ServerUrl { url: server_url.to_string() };
    let url = reqwest::Url::parse(server_url).map_err(|_| bad())?;
    let scheme = match url.scheme() {
        "https" => "mqtts",
        "http" => "mqtt",
        _ => return Err(bad()),
    };
    // host_str keeps an IPv6 address in brackets, as a URL needs it.
    let host = url.host_str().ok_or_else(bad)?;
    Ok(format!("{scheme}://{host}:{DEFAULT_MQTT_PORT}"))
}

/// `key=value` pairs into labels.
pub fn parse_labels(pairs: &[String]) -> Result<BTreeMap<String, String>, ImageError> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
            _ => Err(ImageError::Label { label: pair.clone() }),
        })
        .collect()
}

/// Renders the device's files and checks `agent.toml` with the agent's own parser and rules.
pub fn render(settings: &DeviceSettings) -> Result<ConfigFiles, ImageError> {
    let mqtt_url = match &settings.mqtt_url {
        Some(url) => url.clone(),
        None => derive_mqtt_url(&settings.server_url)?,
    };
    let mut table = toml::Table::new();
    let mut set = |key: &str, value: toml::Value| table.insert(key.to_string(), value);
    set("server_url", settings.server_url.clone().into());
    set("mqtt_url", mqtt_url.into());
    set("enrollment_token", settings.enrollment_token.clone().into());
    set("data_dir", DEVICE_DATA_DIR.into());
    if let Some(name) = &settings.name {
        set("name", name.clone().into());
    }
    let mut files = ConfigFiles::new();
    if let Some(root) = &settings.root_json {
        set("root_file", format!("{DEVICE_CONFIG_DIR}/root.json").into());
        files.insert("root.json", root.clone());
    } else {
        set("trusted_keys", toml::Value::Array(settings.trusted_keys.iter().map(|k| k.clone().into()).collect()));
    }
    if let Some(ca) = &settings.ca_pem {
        set("ca_file", format!("{DEVICE_CONFIG_DIR}/ca.pem").into());
        files.insert("ca.pem", ca.clone());
    }
    if settings.allow_insecure {
        set("allow_insecure", true.into());
    }
    if let Some(addr) = settings.api_listen {
        set("api_listen", addr.to_string().into());
    }
    let labels: toml::Table = settings.labels.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
    set("labels", labels.into());
    let body = toml::to_string(&table).map_err(|e| ImageError::Config(e.to_string()))?;
    let text = format!(
        "# Written by `fleetctl image configure`; installed to {DEVICE_CONFIG_DIR}/agent.toml on boot.\n{body}"
    );
    let config: edge_agent::AgentConfig =
        toml::from_str(&text).map_err(|e| ImageError::Config(e.message().to_string()))?;
    config.validate().map_err(|e| ImageError::Config(e.to_string()))?;
    files.insert("agent.toml", text.into_bytes());
    Ok(files)
}

/// Checks that `pem` holds a CA certificate the agent can pin.
pub fn check_ca(path: &Path, pem: &[u8]) -> Result<(), ImageError> {
    edge_agent::http::rustls_trusting(pem).map(|_| ()).map_err(|message| ImageError::Ca { path: path.into(), message })
}

/// A partition's place in the image, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// MBR partition types of FAT file systems (FAT12, FAT16, FAT32 CHS and LBA, FAT16 LBA).
const FAT_TYPES: [u8; 6] = [0x01, 0x04, 0x06, 0x0b, 0x0c, 0x0e];

/// The first FAT partition of an MBR. The layout is fixed (four 16-byte entries at byte 446,
/// type at +4, first sector and sector count as little-endian u32 at +8 and +12): read here
/// rather than through a partitioning crate that would bring a serializer for 64 bytes.
pub fn boot_partition(sector0: &[u8; 512], path: &Path) -> Result<Extent, ImageError> {
    if sector0[510..512] != [0x55, 0xAA] {
        return Err(ImageError::NoPartitionTable { path: path.into() });
    }
    let u32_at =
        |at: usize| u64::from(u32::from_le_bytes([sector0[at], sector0[at + 1], sector0[at + 2], sector0[at + 3]]));
    (0..4)
        .map(|i| 446 + 16 * i)
        .find(|&entry| FAT_TYPES.contains(&sector0[entry + 4]) && u32_at(entry + 12) > 0)
        .map(|entry| Extent { offset: u32_at(entry + 8) * 512, len: u32_at(entry + 12) * 512 })
        .ok_or_else(|| ImageError::NoBootPartition { path: path.into() })
}

/// Replaces `/edge-agent/` on the image's boot partition with `files`. Nothing outside that
/// partition is written.
pub fn write_config(image: &Path, files: &ConfigFiles) -> Result<Extent, ImageError> {
    let open_err = |source| ImageError::Open { path: image.into(), source };
    let mut disk = OpenOptions::new().read(true).write(true).open(image).map_err(open_err)?;
    let mut sector0 = [0u8; 512];
    disk.read_exact(&mut sector0).map_err(open_err)?;
    let extent = boot_partition(&sector0, image)?;
    let size = disk.seek(SeekFrom::End(0)).map_err(open_err)?;
    if extent.offset + extent.len > size {
        return Err(ImageError::Truncated { path: image.into(), end: extent.offset + extent.len, size });
    }
    let fat_err = |source| ImageError::Fat { path: image.into(), source };
    let slice = fscommon::StreamSlice::new(disk, extent.offset, extent.offset + extent.len).map_err(fat_err)?;
    let fs = fatfs::FileSystem::new(fscommon::BufStream::new(slice), fatfs::FsOptions::new()).map_err(fat_err)?;
    replace_dir(&fs.root_dir(), files).map_err(fat_err)?;
    fs.unmount().map_err(fat_err)?;
    Ok(extent)
}

fn replace_dir<T: fatfs::ReadWriteSeek>(root: &fatfs::Dir<T>, files: &ConfigFiles) -> std::io::Result<()> {
    let dir = match root.open_dir(CONFIG_DIR) {
        Ok(dir) => dir,
        Err(_) => root.create_dir(CONFIG_DIR)?,
    };
    // A file left from an earlier configuration (a CA no longer given) must not linger.
    let stale: Vec<String> = dir
        .iter()
        .filter_map(Result::ok)
        .filter(|e| e.is_file() && !files.contains_key(e.file_name().as_str()))
        .map(|e| e.file_name())
        .collect();
    for name in stale {
        dir.remove(&name)?;
    }
    for (name, bytes) in files {
        let mut file = dir.create_file(name)?;
        file.truncate()?;
        file.write_all(bytes)?;
        file.flush()?;
    }
    Ok(())
}

/// Reads `/edge-agent/` back from an image's boot partition (what a device will install).
pub fn read_config(image: &Path) -> Result<BTreeMap<String, Vec<u8>>, ImageError> {
    let open_err = |source| ImageError::Open { path: image.into(), source };
    // fatfs wants a writable device even to read; nothing is written here.
    let mut disk = OpenOptions::new().read(true).write(true).open(image).map_err(open_err)?;
    let mut sector0 = [0u8; 512];
    disk.read_exact(&mut sector0).map_err(open_err)?;
    let extent = boot_partition(&sector0, image)?;
    let fat_err = |source| ImageError::Fat { path: image.into(), source };
    let slice = fscommon::StreamSlice::new(disk, extent.offset, extent.offset + extent.len).map_err(fat_err)?;
    let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).map_err(fat_err)?;
    let dir = fs.root_dir().open_dir(CONFIG_DIR).map_err(fat_err)?;
    let mut out = BTreeMap::new();
    for entry in dir.iter() {
        let entry = entry.map_err(fat_err)?;
        if entry.is_file() {
            let mut bytes = Vec::new();
            entry.to_file().read_to_end(&mut bytes).map_err(fat_err)?;
            out.insert(entry.file_name(), bytes);
        }
    }
    Ok(out)
}

/// Flashable disk images made by images/build.sh (docs/FLASHING.md).
#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Write one device's config into the image's boot partition (no root needed); the device
    /// installs it on boot and enrolls with the token on its first start.
    Configure(Box<ConfigureArgs>),
    /// Print the config an image will install (the enrollment token masked).
    Show { image: PathBuf },
}

#[derive(clap::Args)]
pub struct ConfigureArgs {
    /// The disk image (or the card it was written to, e.g. /dev/sdb, as root).
    image: PathBuf,
    /// Fleet server base URL as the device reaches it, e.g. https://fleet.example.com:8080.
    #[arg(long)]
    server: String,
    /// MQTT broker URL [default: the server's host, port 1884, mqtts:// for an https:// server].
    #[arg(long)]
    mqtt: Option<String>,
    /// One-time enrollment token (`fleetctl tokens create`): one per device.
    #[arg(long)]
    enrollment_token: String,
    /// Public key (hex or a .pub file) whose bundle signatures the device accepts; repeatable.
    #[arg(long = "trusted-key", required_unless_present = "root", conflicts_with = "root")]
    trusted_keys: Vec<String>,
    /// A signed root of trust (`fleetctl root init`) instead of --trusted-key.
    #[arg(long)]
    root: Option<PathBuf>,
    /// PEM of the fleet's CA (`fleetctl pki init`), pinned by the device.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// key=value label (selects rollout cohorts); repeatable.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Name shown to operators [default: the device's host name, unique per device].
    #[arg(long)]
    name: Option<String>,
    /// Local inference API address on the device [default: 127.0.0.1:8686].
    #[arg(long)]
    api_listen: Option<SocketAddr>,
    /// Let the device send its credential in clear (plain http:// or mqtt:// to another host).
    #[arg(long)]
    allow_insecure: bool,
}

pub fn run(command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Configure(args) => configure(*args),
        ImageCommand::Show { image } => {
            for (name, bytes) in read_config(&image)? {
                println!("==> {CONFIG_DIR}/{name} ({} bytes)", bytes.len());
                if name.ends_with(".toml") {
                    print!("{}", mask_token(&String::from_utf8_lossy(&bytes)));
                }
            }
            Ok(())
        }
    }
}

fn configure(args: ConfigureArgs) -> anyhow::Result<()> {
    let read = |path: &Path| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    let ca_pem = args.ca.as_deref().map(read).transpose()?;
    if let (Some(path), Some(pem)) = (&args.ca, &ca_pem) {
        check_ca(path, pem)?;
    }
    let root_json = args.root.as_deref().map(read).transpose()?;
    let trusted_keys = args.trusted_keys.iter().map(|k| crate::key_text(k)).collect::<anyhow::Result<Vec<_>>>()?;
    let settings = DeviceSettings {
        server_url: args.server,
        mqtt_url: args.mqtt,
        enrollment_token: args.enrollment_token,
        trusted_keys,
        root_json,
        ca_pem,
        labels: parse_labels(&args.labels)?,
        name: args.name,
        api_listen: args.api_listen,
        allow_insecure: args.allow_insecure,
    };
    let files = render(&settings)?;
    let extent = write_config(&args.image, &files)?;
    let names: Vec<&str> = files.keys().copied().collect();
    println!(
        "{}: wrote {CONFIG_DIR}/{{{}}} to the boot partition (bytes {}..{}); the device installs them on boot",
        args.image.display(),
        names.join(","),
        extent.offset,
        extent.offset + extent.len
    );
    Ok(())
}

/// The token is a credential until the device enrolls: not for terminals and logs.
fn mask_token(toml_text: &str) -> String {
    toml_text
        .lines()
        .map(|line| if line.starts_with("enrollment_token") { "enrollment_token = \"***\"" } else { line })
        .fold(String::new(), |out, line| out + line + "\n")
}

#[cfg(test)]
#[path = "image_tests.rs"]
mod tests;
