//! lifeboat-server: the centre of a Lifeboat installation.
//!
//! It keeps tenants, agents, devices, backup runs and snapshots in PostgreSQL (an embedded
//! private cluster by default), snapshot data in object storage through OpenDAL, and
//! answers agents over QUIC and people over HTTP. One module per subsystem; the map with
//! each one's invariants is in `ARCHITECTURE.md`.
//!
//! Dependency order, lowest first (nothing imports upwards): `platform`, `config`, `keys`
//! → `store`, `objects`, `ios` → `auth`, `session` → `app`, `users` → `ingest`, `restore` →
//! `agents`, `jobs`, `http` → `serve`, `admin`.

pub mod admin;
pub mod agents;
pub mod app;
pub mod audit;
pub mod auth;
pub mod config;
pub mod console;
pub mod escrow;
pub mod http;
pub mod ingest;
pub mod ios;
pub mod jobs;
pub mod keys;
pub mod objects;
pub mod platform;
pub mod restore;
pub mod serve;
pub mod session;
pub mod store;
pub mod users;
