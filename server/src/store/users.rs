//! `users`: API credentials (only their SHA-256 is stored) with a role, of one tenant.

use lifeboat_shared::ids::TenantId;
use tokio_postgres::{Client, Error};

pub async fn insert(
    client: &Client,
    tenant: TenantId,
    name: &str,
    role: &str,
    credential_hash: &[u8],
    password_hash: Option<&str>,
) -> Result<uuid::Uuid, Error> {
    Ok(client
        .query_one(
            "INSERT INTO users (tenant_id, name, role, credential_hash, password_hash) VALUES ($1, $2, $3, $4, $5) \
             RETURNING id",
            &[&tenant.0, &name, &role, &credential_hash, &password_hash],
        )
        .await?
        .get(0))
}

/// The (tenant, user, role) of an unrevoked credential.
pub async fn by_credential(
    client: &Client,
    credential_hash: &[u8],
) -> Result<Option<(TenantId, uuid::Uuid, String)>, Error> {
    let row = client
        .query_opt(
            "SELECT tenant_id, id, role FROM users WHERE credential_hash = $1 AND revoked_at IS NULL",
            &[&credential_hash],
        )
        .await?;
    Ok(row.map(|r| (TenantId(r.get(0)), r.get(1), r.get(2))))
}

/// An unrevoked console user by name (names of console users are unique across
/// tenants, case-insensitively): tenant, id, role, password hash.
pub async fn by_console_name(
    client: &Client,
    name: &str,
) -> Result<Option<(TenantId, uuid::Uuid, String, String)>, Error> {
    let row = client
        .query_opt(
            "SELECT tenant_id, id, role, password_hash FROM users \
             WHERE lower(name) = lower($1) AND password_hash IS NOT NULL AND revoked_at IS NULL",
            &[&name],
        )
        .await?;
    Ok(row.map(|r| (TenantId(r.get(0)), r.get(1), r.get(2), r.get(3))))
}

/// An unrevoked user's name and role.
pub async fn get(client: &Client, tenant: TenantId, user: uuid::Uuid) -> Result<Option<(String, String)>, Error> {
    let row = client
        .query_opt(
            "SELECT name, role FROM users WHERE tenant_id = $1 AND id = $2 AND revoked_at IS NULL",
            &[&tenant.0, &user],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// A user as `user list` shows it (never its credential, which is not stored).
#[derive(Debug, Clone, serde::Serialize)]
pub struct UserRow {
    pub id: uuid::Uuid,
    pub name: String,
    pub role: String,
    /// It can sign in to the console.
    pub console: bool,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

/// The tenant's users, by name.
pub async fn list(client: &Client, tenant: TenantId) -> Result<Vec<UserRow>, Error> {
    let rows = client
        .query(
            concat!(
                "SELECT id, name, role, password_hash IS NOT NULL, ",
                super::ts!("created_at"),
                ", ",
                super::ts!("revoked_at"),
                " FROM users WHERE tenant_id = $1 ORDER BY name, created_at, id"
            ),
            &[&tenant.0],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| UserRow {
            id: r.get(0),
            name: r.get(1),
            role: r.get(2),
            console: r.get(3),
            created_at: r.get(4),
            revoked_at: r.get(5),
        })
        .collect())
}

/// Revokes a user (of `tenant`, if given): its credential is refused from the next
/// request on. Its tenant, or `None` if there is no such user or it was already revoked.
pub async fn revoke(client: &Client, tenant: Option<TenantId>, user: uuid::Uuid) -> Result<Option<TenantId>, Error> {
    super::revoke_row(client, super::Credentials::Users, tenant, user).await
}
