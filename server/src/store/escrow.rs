//! `device_backup_passwords`: one sealed iOS backup password per device. The store sees
//! only sealed bytes; sealing and opening are `escrow`'s.

use lifeboat_shared::ids::TenantId;
use tokio_postgres::{Error, GenericClient};

use super::ts;

/// An escrowed password, still sealed.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub sealed: Vec<u8>,
    pub source: String,
    pub set_at: String,
    pub set_by_user: Option<uuid::Uuid>,
    pub set_by_agent: Option<uuid::Uuid>,
}

/// Stores (or replaces) the device's sealed password.
pub async fn put(
    client: &impl GenericClient,
    tenant: TenantId,
    udid: &str,
    sealed: &[u8],
    source: &str,
    user: Option<uuid::Uuid>,
    agent: Option<uuid::Uuid>,
) -> Result<String, Error> {
    let row = client
        .query_one(
            concat!(
                "INSERT INTO device_backup_passwords (tenant_id, udid, sealed, source, set_by_user, set_by_agent) ",
                "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, udid) DO UPDATE SET sealed = EXCLUDED.sealed, ",
                "source = EXCLUDED.source, set_by_user = EXCLUDED.set_by_user, set_by_agent = EXCLUDED.set_by_agent, ",
                "set_at = now() RETURNING ",
                ts!("set_at")
            ),
            &[&tenant.0, &udid, &sealed, &source, &user, &agent],
        )
        .await?;
    Ok(row.get(0))
}

pub async fn get(client: &impl GenericClient, tenant: TenantId, udid: &str) -> Result<Option<Sealed>, Error> {
    let row = client
        .query_opt(
            concat!(
                "SELECT sealed, source, ",
                ts!("set_at"),
                ", set_by_user, set_by_agent FROM device_backup_passwords WHERE tenant_id = $1 AND udid = $2"
            ),
            &[&tenant.0, &udid],
        )
        .await?;
    Ok(row.map(|r| Sealed {
        sealed: r.get(0),
        source: r.get(1),
        set_at: r.get(2),
        set_by_user: r.get(3),
        set_by_agent: r.get(4),
    }))
}
