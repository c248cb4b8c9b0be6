//! A private PostgreSQL cluster, started from the machine's PostgreSQL binaries.
//!
//! The server's embedded default (no `database.url` configured) and every test process
//! use it: initdb into a directory, start `postgres` on a Unix socket in that directory
//! with no TCP port, stop it when the owner exits — also when the owner is SIGKILLed,
//! through a guard process that notices the owner is gone.

mod bindir;
mod cluster;

pub use bindir::{BinDir, BinDirError};
pub use cluster::{Cluster, ClusterError, ClusterOptions, Durability, SUPERUSER};
