//! Names that end up in MQTT topics, URL paths and directory names. One validator for all of
//! them, so a name accepted anywhere is safe everywhere (no `/`, no `..`, no wildcards).

use thiserror::Error;

/// Longest model name or device id accepted.
pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "{kind} {name:?} is not valid: use 1-64 characters from a-z, 0-9, '-' and '_', starting with a letter or digit"
)]
pub struct InvalidName {
    pub kind: &'static str,
    pub name: String,
}

/// Checks a model name or device id; `kind` names it in the error ("model name", "device id").
pub fn validate(kind: &'static str, name: &str) -> Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(InvalidName { kind, name: name.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_a_path_or_topic_are_refused() {
        for bad in ["", "../x", "a/b", "a+b", "#", "A", "-x", &"x".repeat(65)] {
            assert!(validate("model name", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["tabular", "detector-v2", "a_1", "0cam"] {
            assert!(validate("model name", good).is_ok(), "{good:?} refused");
        }
    }
}
