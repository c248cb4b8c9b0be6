//! The operator subcommands (`tenant create`, `token list`, …): their database access,
//! their audit records, and (in `credentials`) the commands on tokens, users and agents.
//!
//! They work whether or not the server is running: with a configured database URL they
//! connect to it; with the embedded cluster they connect to the running server's
//! PostgreSQL if the data directory is locked by it, or else start the cluster
//! themselves for the length of the command.

pub mod credentials;

use std::time::Duration;

use anyhow::Context as _;

use crate::config::{Config, DatabaseConfig};
use crate::platform::datadir::{DataDir, DataDirError};
use crate::platform::db::{self, EMBEDDED_DB};
use crate::platform::pg::{self, Cluster, ClusterOptions};

/// A database connection for one command, and what must be stopped afterwards.
#[derive(Debug)]
pub struct AdminDb {
    pub client: tokio_postgres::Client,
    owned: Option<(Cluster, DataDir)>,
}

impl AdminDb {
    pub async fn open(config: &Config) -> anyhow::Result<Self> {
        let timeout = Duration::from_secs(10);
        match &config.database {
            DatabaseConfig::External(url) => {
                let mut client = db::connect(&db::parse_url(url.expose())?, timeout).await?;
                db::migrate(&mut client).await?;
                Ok(Self { client, owned: None })
            }
            DatabaseConfig::Embedded => match DataDir::open(&config.data_dir) {
                Ok(dd) => {
                    let opts = ClusterOptions::new(dd.path().join("postgres"));
                    let cluster = tokio::task::spawn_blocking(move || Cluster::start(&opts))
                        .await
                        .context("starting the embedded PostgreSQL")??;
                    let admin = db::connect(&cluster.config("postgres"), timeout).await?;
                    db::ensure_database(&admin, EMBEDDED_DB).await?;
                    let mut client = db::connect(&cluster.config(EMBEDDED_DB), timeout).await?;
                    db::migrate(&mut client).await?;
                    Ok(Self { client, owned: Some((cluster, dd)) })
                }
                Err(DataDirError::InUse { .. }) => {
                    // The server is running: use its PostgreSQL. postmaster.pid line 5 is the socket directory.
                    let data = std::fs::canonicalize(&config.data_dir)?.join("postgres");
                    let pidfile = data.join("data/postmaster.pid");
                    let text = std::fs::read_to_string(&pidfile)
                        .with_context(|| format!("the server is running but {} is unreadable", pidfile.display()))?;
                    let socket_dir = text.lines().nth(4).unwrap_or_default().trim().to_string();
                    let mut c = tokio_postgres::Config::new();
                    c.host_path(socket_dir).port(5432).user(pg::SUPERUSER).dbname(EMBEDDED_DB);
                    Ok(Self { client: db::connect(&c, timeout).await?, owned: None })
                }
                Err(e) => Err(e.into()),
            },
        }
    }

    /// Stops the cluster if this command started it.
    pub async fn close(self) {
        drop(self.client);
        if let Some((cluster, dd)) = self.owned {
            let _ = tokio::task::spawn_blocking(move || cluster.stop()).await;
            drop(dd);
        }
    }
}

/// Runs one operator command on the server's database (the embedded PostgreSQL started
/// for it if the server is not running), then closes it.
pub fn with_db(
    config: &Config,
    f: impl AsyncFnOnce(&tokio_postgres::Client) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let db = AdminDb::open(config).await?;
        let result = f(&db.client).await;
        db.close().await;
        result
    })
}

/// Records an operator's change to credentials in the tenant's audit log.
pub async fn audit_operator(
    client: &tokio_postgres::Client,
    tenant: lifeboat_shared::ids::TenantId,
    action: &str,
    detail: serde_json::Value,
) -> anyhow::Result<()> {
    let event =
        crate::store::audit::Event { detail, ..crate::store::audit::Event::new(tenant, "operator (CLI)", action) };
    crate::store::audit::record(client, &event).await?;
    Ok(())
}
