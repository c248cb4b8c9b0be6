//! `tenants` and `tenant_keys`: tenants, created with fresh keys wrapped by the master key.

use lifeboat_shared::ids::TenantId;
use serde::Serialize;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::is;
use crate::keys::{KeyError, MasterKey, TenantKeys};

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error(
        "tenant name {0:?} is not valid: use 1 to 63 lowercase letters, digits, '.', '_' or '-', \
         starting with a letter or digit"
    )]
    BadName(String),
    #[error("tenant {0:?} already exists")]
    Exists(String),
    #[error("no tenant named {0:?}")]
    NotFound(String),
    #[error("tenant {0} has no keys")]
    NoKeys(TenantId),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=63).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'))
}

#[derive(Debug, Clone, Serialize)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub created_at_unix: i64,
}

/// Creates tenant `name` with new keys, wrapped by `master`, in one transaction, under the
/// default backup encryption policy (`required`).
pub async fn create(client: &mut Client, master: &MasterKey, name: &str) -> Result<Tenant, TenantError> {
    create_with_policy(client, master, name, true).await
}

/// [`create`] with the backup encryption policy given, in the same transaction (a tenant
/// is never seen with another policy than the one asked for).
pub async fn create_with_policy(
    client: &mut Client,
    master: &MasterKey,
    name: &str,
    encryption_required: bool,
) -> Result<Tenant, TenantError> {
    if !valid_name(name) {
        return Err(TenantError::BadName(name.to_string()));
    }
    let tx = client.transaction().await?;
    let row = match tx
        .query_one(
            "INSERT INTO tenants (name, backup_encryption) VALUES ($1, $2) \
             RETURNING id, extract(epoch FROM created_at)::bigint",
            &[&name, &if encryption_required { "required" } else { "off" }],
        )
        .await
    {
        Ok(row) => row,
        Err(e) if is(&e, &SqlState::UNIQUE_VIOLATION) => return Err(TenantError::Exists(name.to_string())),
        Err(e) => return Err(e.into()),
    };
    let id = TenantId(row.get(0));
    let (_, id_w, data_w) = TenantKeys::generate(master, id)?;
    tx.execute(
        "INSERT INTO tenant_keys (tenant_id, master_key_id, id_key_wrapped, data_key_wrapped) VALUES ($1, $2, $3, $4)",
        &[&id.0, &master.id(), &id_w, &data_w],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(tenant.id = %id, tenant.name = name, "created tenant");
    Ok(Tenant { id, name: name.to_string(), created_at_unix: row.get(1) })
}

/// Whether tenant `tenant`'s phones must back up encrypted (`backup_encryption`).
pub async fn encryption_required(client: &Client, tenant: TenantId) -> Result<bool, TenantError> {
    let row = client
        .query_opt("SELECT backup_encryption = 'required' FROM tenants WHERE id = $1", &[&tenant.0])
        .await?
        .ok_or_else(|| TenantError::NotFound(tenant.to_string()))?;
    Ok(row.get(0))
}

/// Sets tenant `name`'s backup encryption policy: required, or off.
pub async fn set_encryption(client: &Client, name: &str, required: bool) -> Result<(), TenantError> {
    let policy = if required { "required" } else { "off" };
    let n = client.execute("UPDATE tenants SET backup_encryption = $2 WHERE name = $1", &[&name, &policy]).await?;
    if n == 0 {
        return Err(TenantError::NotFound(name.to_string()));
    }
    tracing::info!(tenant.name = name, backup_encryption = policy, "set the tenant's backup encryption policy");
    Ok(())
}

pub async fn list(client: &Client) -> Result<Vec<Tenant>, TenantError> {
    let rows =
        client.query("SELECT id, name, extract(epoch FROM created_at)::bigint FROM tenants ORDER BY name", &[]).await?;
    Ok(rows.iter().map(|r| Tenant { id: TenantId(r.get(0)), name: r.get(1), created_at_unix: r.get(2) }).collect())
}

pub async fn by_name(client: &Client, name: &str) -> Result<Tenant, TenantError> {
    let row = client
        .query_opt("SELECT id, name, extract(epoch FROM created_at)::bigint FROM tenants WHERE name = $1", &[&name])
        .await?
        .ok_or_else(|| TenantError::NotFound(name.to_string()))?;
    Ok(Tenant { id: TenantId(row.get(0)), name: row.get(1), created_at_unix: row.get(2) })
}

/// The tenant's unwrapped keys.
pub async fn keys(client: &Client, master: &MasterKey, tenant: TenantId) -> Result<TenantKeys, TenantError> {
    let row = client
        .query_opt(
            "SELECT master_key_id, id_key_wrapped, data_key_wrapped FROM tenant_keys WHERE tenant_id = $1",
            &[&tenant.0],
        )
        .await?
        .ok_or(TenantError::NoKeys(tenant))?;
    let mk: String = row.get(0);
    let id_w: Vec<u8> = row.get(1);
    let data_w: Vec<u8> = row.get(2);
    Ok(TenantKeys::unwrap(master, tenant, &mk, &id_w, &data_w)?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn tenant_names_follow_the_schema_rule() {
        for ok in ["acme", "a", "acme-corp.eu_1", "9lives"] {
            assert!(super::valid_name(ok), "{ok}");
        }
        for bad in ["", "Acme", "-acme", "acme corp", "ä", &"a".repeat(64)] {
            assert!(!super::valid_name(bad), "{bad}");
        }
    }
}
