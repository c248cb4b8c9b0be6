//! The platform the server stands on: its data directory, the embedded PostgreSQL, the
//! connection pool and migrations, the QUIC/TLS identity, TLS on the HTTP listener
//! (`https`), logging and the metrics
//! registry. Nothing here knows tenants, devices or snapshots; the only SQL is the
//! migrations, the database creation and the readiness ping (`db`).

pub mod datadir;
pub mod db;
pub mod https;
pub mod metrics;
pub mod pg;
pub mod telemetry;
pub mod tls;
