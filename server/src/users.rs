//! People and scripts using the HTTP API: credentials with a role, scoped to one tenant.
//!
//! A credential (`lbu1_…`) is 32 random bytes; only its SHA-256 is stored.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use lifeboat_shared::ids::TenantId;
use serde::Serialize;

use crate::auth::secret_hash;
use crate::keys::{KeyError, random_32};
use crate::store;

const PREFIX: &str = "lbu1_";

/// What a role may do. Each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read-only fleet status: devices, snapshots, runs, agents.
    Viewer,
    /// Also a snapshot's contents (file listings); later preview, export and restore.
    Helpdesk,
    /// Also tenant configuration.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Helpdesk => "helpdesk",
            Self::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Self::Viewer),
            "helpdesk" => Some(Self::Helpdesk),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// An authenticated API caller.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub tenant: TenantId,
    pub user: uuid::Uuid,
    pub role: Role,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user name must be 1 to 100 characters")]
    BadName,
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// Creates a user and returns its id and credential (shown once, never stored).
pub async fn create(
    client: &tokio_postgres::Client,
    tenant: TenantId,
    name: &str,
    role: Role,
) -> Result<(uuid::Uuid, String), UserError> {
    if name.is_empty() || name.len() > 100 {
        return Err(UserError::BadName);
    }
    let secret = random_32()?;
    let id = store::users::insert(client, tenant, name, role.as_str(), &secret_hash(&secret)).await?;
    Ok((id, format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(secret))))
}

/// The caller a credential stands for, or `None` if it is unknown, malformed or revoked.
pub async fn authenticate(client: &tokio_postgres::Client, credential: &str) -> Result<Option<Caller>, UserError> {
    let Some(secret) = credential.strip_prefix(PREFIX).and_then(|b| URL_SAFE_NO_PAD.decode(b).ok()) else {
        return Ok(None);
    };
    let row = store::users::by_credential(client, &secret_hash(&secret)).await?;
    Ok(row.and_then(|(tenant, user, role)| Some(Caller { tenant, user, role: Role::parse(&role)? })))
}
