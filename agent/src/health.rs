//! Device health from sysinfo: CPU, memory, and the disk holding the data directory.

use std::path::{Path, PathBuf};

use proto::wire::Health;
use sysinfo::{Disks, System};

pub struct HealthProbe {
    system: Option<System>,
    data_dir: PathBuf,
}

impl HealthProbe {
    pub fn new(data_dir: &Path) -> HealthProbe {
        // sysinfo reports an error on platforms it cannot read; health then reports zeros.
        let mut system = System::new().ok();
        if let Some(system) = system.as_mut() {
            system.refresh_cpu_usage();
        }
        HealthProbe { system, data_dir: data_dir.canonicalize().unwrap_or_else(|_| data_dir.to_path_buf()) }
    }

    /// CPU usage is measured since the previous call.
    pub fn sample(&mut self) -> Health {
        let Some(system) = self.system.as_mut() else {
            return Health::default();
        };
        system.refresh_cpu_usage();
        system.refresh_memory();
        let disks = Disks::new_with_refreshed_list().ok();
        let disk = disks.as_ref().and_then(|d| disk_of(d, &self.data_dir));
        Health {
            cpu_percent: system.global_cpu_usage(),
            memory_used_bytes: system.used_memory(),
            memory_total_bytes: system.total_memory(),
            disk_free_bytes: disk.map_or(0, |d| d.available_space()),
            disk_total_bytes: disk.map_or(0, |d| d.total_space()),
        }
    }
}

/// The disk (mount) holding `path`: the longest mount point that is a prefix of it.
fn disk_of<'a>(disks: &'a Disks, path: &Path) -> Option<&'a sysinfo::Disk> {
    disks.iter().filter(|d| path.starts_with(d.mount_point())).max_by_key(|d| d.mount_point().as_os_str().len())
}

/// Free bytes on the disk holding `path` (blocking: reads the mount table), if it can be told.
pub fn free_space(path: &Path) -> Option<u64> {
    let path = path.canonicalize().ok()?;
    let disks = Disks::new_with_refreshed_list().ok()?;
    disk_of(&disks, &path).map(|d| d.available_space())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_sample_reports_real_memory_and_the_data_disk() {
        let dir = tempfile::tempdir().unwrap();
        let health = super::HealthProbe::new(dir.path()).sample();
        assert!(health.memory_total_bytes > 0 && health.memory_used_bytes <= health.memory_total_bytes);
        assert!(health.disk_total_bytes > 0, "{health:?}");
    }
}
