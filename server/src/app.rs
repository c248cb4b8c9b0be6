//! The shared context of a running server: the database pool, object storage, the
//! master key and the cache of unwrapped tenant keys, the access-token signer, metrics,
//! the scratch directory and the policy agents are given. Every subsystem borrows what
//! it needs from one `App`; none of them owns another's state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifeboat_shared::ids::TenantId;

use crate::auth::Signer;
use crate::ios::Scratch;
use crate::keys::{MasterKey, TenantKeys};
use crate::platform::metrics::Metrics;
use crate::store::tenants::{self, TenantError};

pub use crate::config::DEFAULT_BACKUP_INTERVAL;

#[derive(Debug)]
pub struct App {
    pub db: deadpool_postgres::Pool,
    pub storage: opendal::Operator,
    pub master: Arc<MasterKey>,
    pub signer: Signer,
    pub metrics: Arc<Metrics>,
    /// Where SQLite copies read out of snapshots go (`ios::Scratch`).
    pub scratch: Scratch,
    /// The backup policy agents ask for: a device is due when its last successful backup
    /// is older than this.
    pub backup_interval: Duration,
    /// How the console behaves (cookies, session lifetimes, what "stale" means).
    pub console: ConsoleSettings,
    /// Snapshots' datasets parsed for the console and the API.
    pub previews: crate::ios::preview::Cache,
    keys: Mutex<HashMap<TenantId, Arc<TenantKeys>>>,
}

/// The console's settings.
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    /// Cookies carry `Secure`: the HTTP listener speaks TLS.
    pub secure_cookies: bool,
    /// A session ends after this long without a request…
    pub idle: Duration,
    /// …and after this long whatever happens.
    pub absolute: Duration,
    /// How long a help-desk user's access to one device's content lasts.
    pub grant: Duration,
    /// A device without a successful backup for this long is stale.
    pub stale_after: Duration,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            secure_cookies: false,
            idle: Duration::from_secs(30 * 60),
            absolute: Duration::from_secs(12 * 3600),
            grant: Duration::from_secs(30 * 60),
            stale_after: Duration::from_secs(3 * 86400),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("getting a database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Tenant(#[from] TenantError),
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain maps in a consistent state.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl App {
    pub fn new(
        db: deadpool_postgres::Pool,
        storage: opendal::Operator,
        master: Arc<MasterKey>,
        signer: Signer,
        metrics: Arc<Metrics>,
        scratch: Scratch,
    ) -> Self {
        Self {
            db,
            storage,
            master,
            signer,
            metrics,
            scratch,
            backup_interval: DEFAULT_BACKUP_INTERVAL,
            console: ConsoleSettings::default(),
            previews: Default::default(),
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// The tenant's unwrapped keys, cached for the life of the process.
    pub async fn tenant_keys(&self, tenant: TenantId) -> Result<Arc<TenantKeys>, KeysError> {
        if let Some(k) = lock(&self.keys).get(&tenant) {
            return Ok(k.clone());
        }
        let client = self.db.get().await?;
        let keys = Arc::new(tenants::keys(&client, &self.master, tenant).await?);
        lock(&self.keys).insert(tenant, keys.clone());
        Ok(keys)
    }
}
