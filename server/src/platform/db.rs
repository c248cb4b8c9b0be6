//! The PostgreSQL connection pool and the schema migrations.
//!
//! Migrations are the numbered plain SQL files in `migrations/` (`V<n>__<name>.sql`),
//! embedded at compile time and applied by refinery at start. Several server replicas may
//! start at once, so migrating holds a PostgreSQL advisory lock: one replica migrates, the
//! others wait and then find nothing to do. Applied migrations are recorded, with their
//! checksums, in `lifeboat_schema_history`; a database migrated by a newer server, or whose
//! applied migrations differ from ours, is refused.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// Name of the database the server uses inside the embedded cluster.
pub const EMBEDDED_DB: &str = "lifeboat";

/// Table where refinery records applied migrations.
pub const MIGRATION_TABLE: &str = "lifeboat_schema_history";
/// Advisory lock key held while migrating (ASCII "lifeboat" as a big-endian i64).
pub const MIGRATION_LOCK_KEY: i64 = 0x6c69_6665_626f_6174;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to PostgreSQL at {target}: {cause}")]
    Connect { target: String, cause: tokio_postgres::Error },
    #[error("cannot connect to PostgreSQL at {target}: no answer within {timeout:?}")]
    ConnectTimeout { target: String, timeout: Duration },
    #[error("database URL is not valid: {0}")]
    BadUrl(tokio_postgres::Error),
    #[error("migrating the database schema: {0}")]
    Migrate(refinery::Error),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error("building the connection pool: {0}")]
    Pool(String),
}

/// Parses a libpq-style URL or key=value string.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, DbError> {
    url.parse().map_err(DbError::BadUrl)
}

/// Where a config connects, for messages: hosts, ports and database, never the password.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(h, p)| match h {
            tokio_postgres::config::Host::Tcp(h) => format!("{h}:{p}"),
            tokio_postgres::config::Host::Unix(path) => format!("{}/.s.PGSQL.{p}", path.display()),
        })
        .collect();
    format!("{} database {:?}", hosts.join(","), config.get_dbname().unwrap_or("(default)"))
}

/// Opens one connection and drives it on a background task.
pub async fn connect(config: &tokio_postgres::Config, timeout: Duration) -> Result<tokio_postgres::Client, DbError> {
    let target = describe(config);
    let (client, conn) = match tokio::time::timeout(timeout, config.connect(NoTls)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(cause)) => return Err(DbError::Connect { target, cause }),
        Err(_) => return Err(DbError::ConnectTimeout { target, timeout }),
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// Creates database `name` in the cluster `admin` is connected to, unless it exists.
pub async fn ensure_database(admin: &tokio_postgres::Client, name: &str) -> Result<(), DbError> {
    let exists = admin.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await?;
    if exists.is_none() {
        // Identifiers cannot be bound as parameters; quote it.
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        if let Err(e) = admin.batch_execute(&format!("CREATE DATABASE {quoted}")).await {
            // Another replica may have created it meanwhile.
            if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) {
                return Err(e.into());
            }
        }
        tracing::info!(db.name = name, "created database");
    }
    Ok(())
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this call, in order.
    pub applied: Vec<i32>,
    /// The newest version the schema is now at.
    pub current: Option<i32>,
}

/// The migrations compiled into this binary: (version, name).
pub fn known_migrations() -> Vec<(i32, String)> {
    // refinery lists them in file-name order (V10 before V2): by version here.
    let mut known: Vec<(i32, String)> =
        embedded::migrations::runner().get_migrations().iter().map(|m| (m.version(), m.name().to_string())).collect();
    known.sort_unstable();
    known
}

/// Applies pending migrations under the advisory lock.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<MigrationReport, DbError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY]).await?;
    let mut runner = embedded::migrations::runner().set_abort_divergent(true).set_abort_missing(true);
    runner.set_migration_table_name(MIGRATION_TABLE);
    let result = runner.run_async(client).await;
    // Unlock even when migrating failed; closing the connection would release it too.
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY]).await;
    let report = result.map_err(DbError::Migrate)?;
    unlocked?;
    let applied: Vec<i32> = report.applied_migrations().iter().map(|m| m.version()).collect();
    let current =
        client.query_one(&format!("SELECT max(version) FROM {MIGRATION_TABLE}"), &[]).await?.get::<_, Option<i32>>(0);
    for v in &applied {
        tracing::info!(db.migration = v, "applied migration");
    }
    Ok(MigrationReport { applied, current })
}

/// A pool of connections for request handlers and jobs.
pub fn pool(config: tokio_postgres::Config, max_size: usize) -> Result<Pool, DbError> {
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// `SELECT 1` through the pool, bounded in time: the readiness check.
pub async fn ping(pool: &Pool, timeout: Duration) -> Result<(), String> {
    let check = async {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        client.query_one("SELECT 1", &[]).await.map_err(|e| e.to_string())?;
        Ok(())
    };
    tokio::time::timeout(timeout, check).await.map_err(|_| format!("no answer within {timeout:?}"))?
}
