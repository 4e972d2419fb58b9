//! The bundle reader as a device runs it on downloaded bytes: strict tar reading under limits,
//! then the manifest and the file digests. Nothing may panic, loop or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::bundle::{read_archive, verify_files, Limits, Manifest};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_bundle_bytes: 1 << 20, ..Limits::default() };
    if let Ok(bundle) = read_archive(data, &limits) {
        if let Ok(manifest) = Manifest::parse(&bundle.manifest_bytes) {
            let _ = verify_files(&manifest, &bundle.files);
        }
    }
});
