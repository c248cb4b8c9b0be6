//! lifeboat-server: the centre of a Lifeboat installation.
//!
//! It keeps tenants, agents, devices, backup runs and snapshots in PostgreSQL (an embedded
//! private cluster by default), snapshot data in object storage through OpenDAL, and
//! answers HTTP for health, readiness and metrics. See `ARCHITECTURE.md` for the map.

pub mod admin;
pub mod api;
pub mod auth;
pub mod backup;
pub mod chunkstore;
pub mod config;
pub mod datadir;
pub mod db;
pub mod fleet;
pub mod http;
pub mod ingest;
pub mod keys;
pub mod metrics;
pub mod pg;
pub mod quic;
pub mod serve;
pub mod storage;
pub mod telemetry;
pub mod tenants;
pub mod testing;
pub mod tls;
pub mod users;
pub mod verify;
