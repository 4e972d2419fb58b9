use super::*;

const KEY: &str = "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c";
const MIB: u64 = 1 << 20;

fn settings() -> DeviceSettings {
    DeviceSettings {
        server_url: "https://fleet.example.com:8080".into(),
        enrollment_token: "tok-1".into(),
        trusted_keys: vec![KEY.into()],
        ca_pem: Some(b"-----BEGIN CERTIFICATE-----\n".to_vec()),
        labels: parse_labels(&["site=plant-a".into()]).unwrap(),
        ..DeviceSettings::default()
    }
}

fn agent_config(files: &ConfigFiles) -> edge_agent::AgentConfig {
    toml::from_str(std::str::from_utf8(&files["agent.toml"]).unwrap()).unwrap()
}

/// A disk like images/build.sh makes: an MBR, a FAT boot partition at 1 MiB, then a second
/// partition (standing in for the root file system) filled with a pattern.
fn disk_image(dir: &Path) -> PathBuf {
    let path = dir.join("edge.img");
    let (boot_start, boot_len, root_len) = (MIB, 8 * MIB, 2 * MIB);
    let mut mbr = [0u8; 512];
    let entry = |mbr: &mut [u8; 512], i: usize, kind: u8, start: u64, len: u64| {
        let at = 446 + 16 * i;
        mbr[at + 4] = kind;
        mbr[at + 8..at + 12].copy_from_slice(&((start / 512) as u32).to_le_bytes());
        mbr[at + 12..at + 16].copy_from_slice(&((len / 512) as u32).to_le_bytes());
    };
    entry(&mut mbr, 0, 0x0c, boot_start, boot_len);
    entry(&mut mbr, 1, 0x83, boot_start + boot_len, root_len);
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.write_all(&mbr).unwrap();
    file.set_len(boot_start + boot_len + root_len).unwrap();
    let slice = fscommon::StreamSlice::new(file.try_clone().unwrap(), boot_start, boot_start + boot_len).unwrap();
    fatfs::format_volume(slice, fatfs::FormatVolumeOptions::new()).unwrap();
    file.seek(SeekFrom::Start(boot_start + boot_len)).unwrap();
    file.write_all(&vec![0x5a; root_len as usize]).unwrap();
    path
}

fn outside_partition(path: &Path, extent: Extent) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    bytes.drain(extent.offset as usize..(extent.offset + extent.len) as usize);
    bytes
}

#[test]
fn the_rendered_config_loads_as_the_agents_own_config() {
    let files = render(&settings()).unwrap();
    let config = agent_config(&files);
    config.validate().unwrap();
    assert_eq!(config.server_url, "https://fleet.example.com:8080");
    assert_eq!(config.mqtt_url, "mqtts://fleet.example.com:1884");
    assert_eq!(config.enrollment_token.as_deref(), Some("tok-1"));
    assert_eq!(config.trusted_keys, [KEY]);
    assert_eq!(config.ca_file.as_deref(), Some(Path::new("/etc/edge-agent/ca.pem")));
    assert_eq!(config.data_dir, Path::new("/var/lib/edge-agent"));
    assert_eq!(config.labels["site"], "plant-a");
    assert_eq!(files["ca.pem"], b"-----BEGIN CERTIFICATE-----\n");
}

#[test]
fn a_root_of_trust_replaces_the_trusted_keys_and_travels_beside_the_config() {
    let files =
        render(&DeviceSettings { trusted_keys: vec![], root_json: Some(b"{}".to_vec()), ..settings() }).unwrap();
    let config = agent_config(&files);
    assert!(config.trusted_keys.is_empty());
    assert_eq!(config.root_file.as_deref(), Some(Path::new("/etc/edge-agent/root.json")));
    assert_eq!(files["root.json"], b"{}");
}

#[test]
fn plain_http_to_another_host_is_refused_at_configure_time_unless_allowed() {
    let plain = DeviceSettings { server_url: "http://10.0.2.2:8080".into(), ca_pem: None, ..settings() };
    let err = render(&plain).unwrap_err().to_string();
    assert!(err.contains("would not load on the device") && err.contains("allow_insecure"), "{err}");
    let files = render(&DeviceSettings { allow_insecure: true, ..plain }).unwrap();
    assert_eq!(agent_config(&files).mqtt_url, "mqtt://10.0.2.2:1884");
}

#[test]
fn a_bad_trusted_key_is_refused_before_anything_is_written() {
    let err = render(&DeviceSettings { trusted_keys: vec!["zz".into()], ..settings() }).unwrap_err().to_string();
    assert!(err.contains("trusted_keys"), "{err}");
}

#[test]
fn the_mqtt_url_follows_the_servers_scheme_and_host() {
    assert_eq!(derive_mqtt_url("https://10.0.2.2:18080").unwrap(), "mqtts://10.0.2.2:1884");
    assert_eq!(derive_mqtt_url("http://[::1]:8080/").unwrap(), "mqtt://[::1]:1884");
    assert!(derive_mqtt_url("ftp://x").unwrap_err().to_string().contains("--server"));
    assert!(derive_mqtt_url("fleet.example.com").is_err());
}

#[test]
fn a_label_without_an_equals_sign_is_named() {
    let err = parse_labels(&["site".into()]).unwrap_err().to_string();
    assert_eq!(err, "label \"site\" must look like key=value");
}

#[test]
fn configure_writes_into_the_boot_partition_and_touches_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let image = disk_image(dir.path());
    let before = std::fs::read(&image).unwrap();
    let files = render(&settings()).unwrap();
    let extent = write_config(&image, &files).unwrap();
    assert_eq!(extent, Extent { offset: MIB, len: 8 * MIB });
    let read = read_config(&image).unwrap();
    assert_eq!(read.keys().collect::<Vec<_>>(), ["agent.toml", "ca.pem"]);
    assert_eq!(read["agent.toml"], files["agent.toml"]);
    let mut unchanged = before.clone();
    unchanged.drain(MIB as usize..(9 * MIB) as usize);
    assert_eq!(outside_partition(&image, extent), unchanged);
    assert_ne!(std::fs::read(&image).unwrap(), before, "the partition itself changed");
}

#[test]
fn configuring_again_replaces_the_previous_device_and_drops_files_no_longer_given() {
    let dir = tempfile::tempdir().unwrap();
    let image = disk_image(dir.path());
    write_config(&image, &render(&settings()).unwrap()).unwrap();
    let second = DeviceSettings { enrollment_token: "tok-2".into(), ca_pem: None, ..settings() };
    let second = DeviceSettings { server_url: "http://127.0.0.1:8080".into(), ..second };
    write_config(&image, &render(&second).unwrap()).unwrap();
    let read = read_config(&image).unwrap();
    assert_eq!(read.keys().collect::<Vec<_>>(), ["agent.toml"]);
    let text = String::from_utf8(read["agent.toml"].clone()).unwrap();
    assert!(text.contains("tok-2") && !text.contains("tok-1"), "{text}");
}

#[test]
fn a_file_without_a_partition_table_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.img");
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let err = write_config(&path, &render(&settings()).unwrap()).unwrap_err().to_string();
    assert!(err.contains("plain.img") && err.contains("no MBR partition table"), "{err}");
}

#[test]
fn an_mbr_without_a_fat_partition_is_refused() {
    let mut sector = [0u8; 512];
    sector[446 + 4] = 0x83;
    sector[446 + 12] = 8;
    sector[510..].copy_from_slice(&[0x55, 0xAA]);
    let err = boot_partition(&sector, Path::new("x.img")).unwrap_err().to_string();
    assert!(err.contains("no FAT partition"), "{err}");
}

#[test]
fn a_truncated_image_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let image = disk_image(dir.path());
    std::fs::OpenOptions::new().write(true).open(&image).unwrap().set_len(4 * MIB).unwrap();
    let err = write_config(&image, &render(&settings()).unwrap()).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn show_masks_the_enrollment_token() {
    let text = mask_token("server_url = \"x\"\nenrollment_token = \"secret\"\n");
    assert_eq!(text, "server_url = \"x\"\nenrollment_token = \"***\"\n");
}
