//! The store: every PostgreSQL query of the server, one module per table it owns.
//!
//! Everything else asks the store and never writes SQL of its own, so a rule about a
//! table (which runs hold a lease, which chunks are indexed, which restore jobs an agent
//! may read) lives in one place and is tested there.
//!
//! Invariants:
//! - Every query that reads or writes a tenant's rows names the tenant. The exceptions
//!   are keyed by what is unique across tenants or serve the operator, and say so: the
//!   fleet gauges and restore-test candidates (every tenant, for the jobs), run ids in
//!   the sweep, enrolment-token and refresh-secret hashes, API credential hashes, agent
//!   revocation and `verify` across tenants (operator commands).
//! - A transaction never waits on storage or on another service: callers write objects
//!   before or after, never inside.
//! - Functions return plain data or `tokio_postgres::Error`; refusals an agent or a user
//!   sees are decided by the caller (a typed result where the caller must branch).

pub mod agents;
pub mod audit;
pub mod chunks;
pub mod devices;
pub mod escrow;
pub mod fleet;
pub mod locks;
pub mod restore_jobs;
pub mod restore_tests;
pub mod runs;
pub mod snapshots;
pub mod tenants;
pub mod users;

/// RFC 3339 UTC rendering of a timestamptz column, done by PostgreSQL.
macro_rules! ts {
    ($col:literal) => {
        concat!("to_char(", $col, " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
    };
}
pub(crate) use ts;

/// Whether a query failed on this SQLSTATE (a constraint the caller turns into a refusal).
pub fn is(e: &tokio_postgres::Error, state: &tokio_postgres::error::SqlState) -> bool {
    e.code() == Some(state)
}

/// The constraint (or unique index) a refused statement broke.
pub fn constraint(e: &tokio_postgres::Error) -> Option<&str> {
    e.as_db_error().and_then(|d| d.constraint())
}
