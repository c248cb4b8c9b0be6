//! lifeboat-agent: backs up iPhones attached to a workstation to a Lifeboat server.
//!
//! - `client`: the protocol client (QUIC, pinned certificate).
//! - `config`: settings from a file, the environment and flags.
//! - `device`: usbmuxd, lockdown and MobileBackup2 through idevice, into the local mirror.
//! - `pipeline`: files the phone finished → chunks → missing-chunk queries → sealed
//!   uploads, while the phone goes on; the local file cache.
//! - `job`: one backup of one iPhone, from lockdown to a committed snapshot.
//! - `service`: `run` — watching usbmuxd, the schedule, concurrency and retries.
//! - `transfer`: a whole directory up as a snapshot, and a snapshot back into a directory.
//! - `progress`: live counters of a backup, for the progress bar and logs.
//! - `staging`: the phone's moves out of `Snapshot/`, a directory at a time where it can.
//! - `state`: what enrolment leaves in the state directory.

pub mod client;
pub mod config;
pub mod device;
pub mod job;
pub mod pipeline;
pub mod progress;
pub mod service;
mod staging;
pub mod state;
pub mod transfer;
