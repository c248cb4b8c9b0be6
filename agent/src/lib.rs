//! lifeboat-agent: backs up iPhones attached to a workstation to a Lifeboat server.
//!
//! - `net`: the protocol client (QUIC, pinned certificate); nothing else talks to the server.
//! - `device`: usbmuxd, lockdown and MobileBackup2 through idevice, into the local mirror;
//!   `device::staging`, the phone's moves out of `Snapshot/`, a directory at a time.
//! - `ios`: an encrypted backup's keys — the plaintext stored, the phone's bytes rebuilt.
//! - `pipeline`: files the phone finished → chunks → missing-chunk queries → sealed
//!   uploads, while the phone goes on; the local file cache; `pipeline::transfer`, a
//!   whole directory up as a snapshot and a snapshot back into a directory.
//! - `job`: one backup of one iPhone, from lockdown to a committed snapshot;
//!   `job::service`, `run` — watching usbmuxd, the schedule, concurrency and retries.
//! - `config`: settings from a file, the environment and flags.
//! - `progress`: live counters of a backup, for the progress bar and logs.
//! - `state`: what enrolment leaves in the state directory.

pub mod config;
pub mod device;
pub mod ios;
pub mod job;
pub mod net;
pub mod pipeline;
pub mod progress;
pub mod state;
