//! `users`: API credentials (only their SHA-256 is stored) with a role, of one tenant.

use lifeboat_shared::ids::TenantId;
use tokio_postgres::{Client, Error};

pub async fn insert(
    client: &Client,
    tenant: TenantId,
    name: &str,
    role: &str,
    credential_hash: &[u8],
) -> Result<uuid::Uuid, Error> {
    Ok(client
        .query_one(
            "INSERT INTO users (tenant_id, name, role, credential_hash) VALUES ($1, $2, $3, $4) RETURNING id",
            &[&tenant.0, &name, &role, &credential_hash],
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
