//! lifeboat-shared's integration tests: golden bytes of every wire frame, the frozen
//! fixtures of every released storage format version, and the playbook in
//! docs/operations.md against the states and reasons there are.

// Test code: an unwrap is an assertion, and its panic message is the failure report.
#![allow(clippy::unwrap_used)]

mod fixtures;
mod golden;
mod playbook;

/// Writes expected files instead of comparing with them (review the diff).
pub fn bless() -> bool {
    std::env::var_os("LIFEBOAT_BLESS").is_some_and(|v| v == "1")
}

/// `shared/tests/<dir>`.
pub fn dir(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(name)
}
