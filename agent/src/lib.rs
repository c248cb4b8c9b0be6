//! lifeboat-agent: backs up iPhones attached to a workstation to a Lifeboat server.
//!
//! - `client`: the protocol client (QUIC, pinned certificate).
//! - `transfer`: a directory tree → chunks → missing-chunk queries → sealed uploads →
//!   commit, and a snapshot back into a directory.
//! - `state`: what enrolment leaves in the state directory.
//! - `device`: usbmuxd, lockdown and MobileBackup2 through idevice, into the local mirror.
//!
//! Not built yet: the long-running service (`run`: watching usbmuxd, scheduling,
//! retries), restore jobs from the API, the progress bar.

pub mod client;
pub mod device;
pub mod state;
pub mod transfer;
