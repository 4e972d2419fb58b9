//! The signed manifest's parser (JSON with a contract, golden cases, lineage and reference).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = proto::Manifest::parse(data) {
        // What was accepted serializes and parses back to the same manifest.
        let again = proto::Manifest::parse(&manifest.to_json_bytes()).expect("a parsed manifest parses again");
        assert_eq!(again, manifest);
    }
});
