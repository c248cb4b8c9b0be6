//! People and scripts using the HTTP API: credentials with a role, scoped to one tenant.
//!
//! A credential (`lbu1_…`) is 32 random bytes; only its SHA-256 is stored. A console
//! user also has a password, kept as an argon2id hash (PHC string), checked on the
//! blocking pool (tens of milliseconds each).

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

    pub fn parse(s: &str) -> Option<Self> {
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
    #[error("a console password must be {MIN_PASSWORD} to 1024 characters")]
    BadPassword,
    #[error(
        "a console user named {0:?} already exists (console users sign in by name alone, so names are unique \
         across tenants)"
    )]
    NameTaken(String),
    #[error("hashing a password: {0}")]
    Hash(String),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// The shortest console password accepted.
pub const MIN_PASSWORD: usize = 12;

/// Creates a user and returns its id and credential (shown once, never stored); with a
/// password, a console user too.
pub async fn create(
    client: &tokio_postgres::Client,
    tenant: TenantId,
    name: &str,
    role: Role,
    password: Option<&str>,
) -> Result<(uuid::Uuid, String), UserError> {
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(UserError::BadName);
    }
    let password_hash = match password {
        Some(p) => Some(hash_password(p.to_owned()).await?),
        None => None,
    };
    let secret = random_32()?;
    let id = store::users::insert(client, tenant, name, role.as_str(), &secret_hash(&secret), password_hash.as_deref())
        .await
        .map_err(|e| match e.code() {
            Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => UserError::NameTaken(name.to_owned()),
            _ => e.into(),
        })?;
    Ok((id, format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(secret))))
}

fn argon2() -> argon2::Argon2<'static> {
    // argon2id, 19 MiB, 2 passes, 1 lane: OWASP's first recommended setting.
    argon2::Argon2::default()
}

/// An argon2id PHC string of `password` with a fresh salt.
pub async fn hash_password(password: String) -> Result<String, UserError> {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    let len = password.chars().count();
    if !(MIN_PASSWORD..=1024).contains(&len) {
        return Err(UserError::BadPassword);
    }
    let salt = random_32()?;
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::encode_b64(&salt[..16]).map_err(|e| UserError::Hash(e.to_string()))?;
        argon2()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| UserError::Hash(e.to_string()))
    })
    .await
    .map_err(|e| UserError::Hash(e.to_string()))?
}

/// Whether `password` matches the PHC string `hash` (false for a malformed hash).
pub async fn password_matches(password: String, hash: String) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier as _};
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash).is_ok_and(|h| argon2().verify_password(password.as_bytes(), &h).is_ok())
    })
    .await
    .unwrap_or(false)
}

/// A console user signing in: who they are, or `None` for an unknown name, a revoked
/// user or a wrong password — indistinguishable, and as slow as each other (an unknown
/// name is checked against a hash of its own).
pub async fn sign_in(client: &tokio_postgres::Client, name: &str, password: &str) -> Result<Option<Caller>, UserError> {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let row = store::users::by_console_name(client, name).await?;
    let hash = match &row {
        Some((_, _, _, h)) => h.clone(),
        None => match DECOY.get() {
            Some(h) => h.clone(),
            None => {
                let h = hash_password("not a password of anyone".into()).await?;
                DECOY.get_or_init(|| h).clone()
            }
        },
    };
    let matches = password_matches(password.to_owned(), hash).await;
    Ok(row
        .filter(|_| matches)
        .and_then(|(tenant, user, role, _)| Some(Caller { tenant, user, role: Role::parse(&role)? })))
}

/// The caller a credential stands for, or `None` if it is unknown, malformed or revoked.
pub async fn authenticate(client: &tokio_postgres::Client, credential: &str) -> Result<Option<Caller>, UserError> {
    let Some(secret) = credential.strip_prefix(PREFIX).and_then(|b| URL_SAFE_NO_PAD.decode(b).ok()) else {
        return Ok(None);
    };
    let row = store::users::by_credential(client, &secret_hash(&secret)).await?;
    Ok(row.and_then(|(tenant, user, role)| Some(Caller { tenant, user, role: Role::parse(&role)? })))
}
