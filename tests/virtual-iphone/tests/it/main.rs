//! The virtual usbmuxd against a plain client and against libimobiledevice's real
//! `idevice_id` (Debian libimobiledevice-utils) through `USBMUXD_SOCKET_ADDRESS`.

// Test code: an unwrap is an assertion, and its panic message is the failure report.
#![allow(clippy::unwrap_used)]

mod usbmuxd;
