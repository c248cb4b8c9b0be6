//! The virtual iPhone against real hosts: a plain usbmuxd client, idevice (the agent's
//! library), libimobiledevice's tools (Debian libimobiledevice-utils) and pymobiledevice3,
//! all through `USBMUXD_SOCKET_ADDRESS`.

// Test code: an unwrap is an assertion, and its panic message is the failure report.
#![allow(clippy::unwrap_used)]

mod backup;
mod cli;
mod encryption;
mod host_tools;
mod provider;
mod readers;
mod usbmuxd;

/// Whether a host tool (libimobiledevice-utils, pymobiledevice3) is installed; if not, the
/// test is skipped with a message — except in CI (`CI=true` or `1`), where it fails.
pub fn host_tool(program: &str) -> bool {
    if std::process::Command::new(program).arg("--version").output().is_ok() {
        return true;
    }
    let what = format!("{program} is not installed (scripts/test installs it)");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "{what} (CI: a test that cannot run fails)");
    eprintln!("SKIPPED: {what}");
    false
}
