//! `device_backup_passwords`: one sealed iOS backup password per device. The store sees
//! only sealed bytes; sealing and opening are `escrow`'s.

use lifeboat_shared::ids::TenantId;
use tokio_postgres::{Client, Error, GenericClient};

use super::{audit, devices, ts};

/// An escrowed password, still sealed.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub sealed: Vec<u8>,
    pub source: String,
    pub set_at: String,
    pub set_by_user: Option<uuid::Uuid>,
    pub set_by_agent: Option<uuid::Uuid>,
}

/// A sealed password to store, and who set it.
#[derive(Debug, Clone, Copy)]
pub struct NewSealed<'a> {
    pub udid: &'a str,
    pub sealed: &'a [u8],
    /// `agent` or `admin`.
    pub source: &'a str,
    pub user: Option<uuid::Uuid>,
    pub agent: Option<uuid::Uuid>,
}

/// Stores (or replaces) the device's sealed password.
pub async fn put(client: &impl GenericClient, tenant: TenantId, n: &NewSealed<'_>) -> Result<String, Error> {
    let row = client
        .query_one(
            concat!(
                "INSERT INTO device_backup_passwords (tenant_id, udid, sealed, source, set_by_user, set_by_agent) ",
                "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, udid) DO UPDATE SET sealed = EXCLUDED.sealed, ",
                "source = EXCLUDED.source, set_by_user = EXCLUDED.set_by_user, set_by_agent = EXCLUDED.set_by_agent, ",
                "set_at = now() RETURNING ",
                ts!("set_at")
            ),
            &[&tenant.0, &n.udid, &n.sealed, &n.source, &n.user, &n.agent],
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

/// Stores the sealed password and its audit event in one transaction; `None` (and nothing
/// written) when the tenant has no such device. Returns when it was set.
pub async fn put_audited(
    client: &mut Client,
    tenant: TenantId,
    n: &NewSealed<'_>,
    event: &audit::Event<'_>,
) -> Result<Option<String>, Error> {
    let tx = client.transaction().await?;
    if !devices::exists(&tx, tenant, n.udid).await? {
        return Ok(None);
    }
    let set_at = put(&tx, tenant, n).await?;
    audit::record(&tx, event).await?;
    tx.commit().await?;
    Ok(Some(set_at))
}

/// What a reveal found.
#[derive(Debug)]
pub enum Found {
    NoDevice,
    NotEscrowed,
    /// The sealed password; its audit event is committed.
    Sealed(Sealed),
}

/// Reads the sealed password and commits its audit event before returning it.
pub async fn get_audited(
    client: &mut Client,
    tenant: TenantId,
    udid: &str,
    event: &audit::Event<'_>,
) -> Result<Found, Error> {
    let tx = client.transaction().await?;
    if !devices::exists(&tx, tenant, udid).await? {
        return Ok(Found::NoDevice);
    }
    let Some(sealed) = get(&tx, tenant, udid).await? else { return Ok(Found::NotEscrowed) };
    audit::record(&tx, event).await?;
    tx.commit().await?;
    Ok(Found::Sealed(sealed))
}

/// A phone's backup keybag as an agent reported it, still sealed.
#[derive(Debug, Clone)]
pub struct SealedKeybag {
    pub sealed: Vec<u8>,
    pub reported_at: String,
}

/// Stores (or replaces) the device's sealed backup keybag; `false` (nothing written) when
/// the tenant has no such device.
pub async fn put_keybag(
    client: &impl GenericClient,
    tenant: TenantId,
    udid: &str,
    sealed: &[u8],
    agent: uuid::Uuid,
) -> Result<bool, Error> {
    let n = client
        .execute(
            concat!(
                "INSERT INTO device_backup_keybags (tenant_id, udid, sealed, reported_by_agent) ",
                "SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM devices WHERE tenant_id = $1 AND udid = $2) ",
                "ON CONFLICT (tenant_id, udid) DO UPDATE SET sealed = EXCLUDED.sealed, ",
                "reported_by_agent = EXCLUDED.reported_by_agent, reported_at = now()"
            ),
            &[&tenant.0, &udid, &sealed, &agent],
        )
        .await?;
    Ok(n == 1)
}

/// The device's sealed keybag, unless a snapshot of it was committed since it was reported
/// (the escrowed password opened a later backup, so the keybag no longer says anything).
pub async fn get_keybag(
    client: &impl GenericClient,
    tenant: TenantId,
    udid: &str,
) -> Result<Option<SealedKeybag>, Error> {
    let row = client
        .query_opt(
            concat!(
                "SELECT k.sealed, ",
                ts!("k.reported_at"),
                " FROM device_backup_keybags k WHERE k.tenant_id = $1 AND k.udid = $2 AND NOT EXISTS ",
                "(SELECT 1 FROM snapshots s WHERE s.tenant_id = k.tenant_id AND s.udid = k.udid ",
                "AND s.committed_at > k.reported_at)"
            ),
            &[&tenant.0, &udid],
        )
        .await?;
    Ok(row.map(|r| SealedKeybag { sealed: r.get(0), reported_at: r.get(1) }))
}
