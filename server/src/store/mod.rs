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
pub mod console;
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

/// Sets `revoked_at` on one row of a table of credentials (`agents`, `users`,
/// `enrollment_tokens`), of `tenant` if given (an operator command may name none).
/// Returns the row's tenant, or `None` if there is no such row or it was revoked already.
async fn revoke_row(
    client: &tokio_postgres::Client,
    table: Credentials,
    tenant: Option<lifeboat_shared::ids::TenantId>,
    id: uuid::Uuid,
) -> Result<Option<lifeboat_shared::ids::TenantId>, tokio_postgres::Error> {
    let table = match table {
        Credentials::Agents => "agents",
        Credentials::Users => "users",
        Credentials::EnrollmentTokens => "enrollment_tokens",
    };
    let sql = format!(
        "UPDATE {table} SET revoked_at = now() \
         WHERE ($1::uuid IS NULL OR tenant_id = $1) AND id = $2 AND revoked_at IS NULL RETURNING tenant_id"
    );
    Ok(client.query_opt(&sql, &[&tenant.map(|t| t.0), &id]).await?.map(|r| lifeboat_shared::ids::TenantId(r.get(0))))
}

/// The tables [`revoke_row`] may change (a closed set, so no table name comes from input).
#[derive(Debug, Clone, Copy)]
enum Credentials {
    Agents,
    Users,
    EnrollmentTokens,
}

/// Whether a query failed on this SQLSTATE (a constraint the caller turns into a refusal).
pub fn is(e: &tokio_postgres::Error, state: &tokio_postgres::error::SqlState) -> bool {
    e.code() == Some(state)
}

/// The constraint (or unique index) a refused statement broke.
pub fn constraint(e: &tokio_postgres::Error) -> Option<&str> {
    e.as_db_error().and_then(|d| d.constraint())
}
