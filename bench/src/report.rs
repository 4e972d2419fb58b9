//! Writing one section of docs/BENCHMARKS.md and keeping the others: shared by fleet-bench and
//! fleet-load.

use std::path::Path;

use anyhow::{Context, Result};

/// `existing` with the section starting at `marker` (up to the next `## ` heading) replaced by
/// `section`, or `section` appended when there is none: each mode writes its own part and keeps
/// every other.
pub fn replace_section(existing: &str, marker: &str, section: &str) -> String {
    match existing.find(marker) {
        Some(start) => {
            let rest = &existing[start + marker.len()..];
            let end = rest.find("\n## ").map_or(existing.len(), |i| start + marker.len() + i + 1);
            format!("{}{}\n{}", &existing[..start], section.trim_end(), &existing[end..]).trim_end().to_string() + "\n"
        }
        None => format!("{}\n\n{}", existing.trim_end(), section.trim_end()) + "\n",
    }
}

pub fn write_section(path: &Path, marker: &str, section: &str) -> Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, replace_section(&existing, marker, section))
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
