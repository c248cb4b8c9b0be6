//! `snapshots`: committed snapshots (inserted only by `runs::commit`, with their run).

use lifeboat_shared::ids::{SnapshotId, TenantId};
use tokio_postgres::{Client, Error};

use super::ts;

/// The newest snapshot of a device, as the protocol's `LatestSnapshot` answers it.
#[derive(Debug, Clone)]
pub struct Latest {
    pub id: SnapshotId,
    pub name: String,
    pub product_type: String,
    pub ios_version: String,
    pub committed_unix_ms: i64,
}

pub async fn latest(client: &Client, tenant: TenantId, udid: &str) -> Result<Option<Latest>, Error> {
    let row = client
        .query_opt(
            "SELECT s.id, coalesce(d.name, ''), coalesce(s.product_type, ''), coalesce(s.ios_version, ''), \
             (extract(epoch FROM s.committed_at) * 1000)::bigint \
             FROM snapshots s JOIN devices d ON d.tenant_id = s.tenant_id AND d.udid = s.udid \
             WHERE s.tenant_id = $1 AND s.udid = $2 ORDER BY s.committed_at DESC LIMIT 1",
            &[&tenant.0, &udid],
        )
        .await?;
    Ok(row.map(|r| Latest {
        id: SnapshotId(r.get(0)),
        name: r.get(1),
        product_type: r.get(2),
        ios_version: r.get(3),
        committed_unix_ms: r.get(4),
    }))
}

/// The storage path of a snapshot's manifest.
pub async fn manifest_key(client: &Client, tenant: TenantId, id: SnapshotId) -> Result<Option<String>, Error> {
    Ok(client
        .query_opt("SELECT manifest_key FROM snapshots WHERE tenant_id = $1 AND id = $2", &[&tenant.0, &id.0])
        .await?
        .map(|r| r.get(0)))
}

/// The id of the newest snapshot of a device.
pub async fn newest_of(client: &Client, tenant: TenantId, udid: &str) -> Result<Option<SnapshotId>, Error> {
    Ok(client
        .query_opt(
            "SELECT id FROM snapshots WHERE tenant_id = $1 AND udid = $2 ORDER BY committed_at DESC LIMIT 1",
            &[&tenant.0, &udid],
        )
        .await?
        .map(|r| SnapshotId(r.get(0))))
}

/// A snapshot as the API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotRow {
    pub id: uuid::Uuid,
    pub udid: String,
    #[serde(skip)]
    pub manifest_key: String,
    pub committed_at: String,
    pub file_count: i64,
    pub logical_bytes: i64,
    pub ios_version: Option<String>,
    pub product_type: Option<String>,
    /// The phone encrypted this backup: restoring it needs the escrowed password.
    pub encrypted: bool,
}

const COLUMNS: &str = concat!(
    "SELECT id, udid, manifest_key, ",
    ts!("committed_at"),
    ", file_count, logical_bytes, ios_version, product_type, ios_encrypted FROM snapshots "
);

fn row(r: &tokio_postgres::Row) -> SnapshotRow {
    SnapshotRow {
        id: r.get(0),
        udid: r.get(1),
        manifest_key: r.get(2),
        committed_at: r.get(3),
        file_count: r.get(4),
        logical_bytes: r.get(5),
        ios_version: r.get(6),
        product_type: r.get(7),
        encrypted: r.get(8),
    }
}

pub async fn get(client: &Client, tenant: TenantId, id: SnapshotId) -> Result<Option<SnapshotRow>, Error> {
    let r = client.query_opt(&format!("{COLUMNS} WHERE tenant_id = $1 AND id = $2"), &[&tenant.0, &id.0]).await?;
    Ok(r.as_ref().map(row))
}

/// A device's snapshots, newest first.
pub async fn of_device(client: &Client, tenant: TenantId, udid: &str) -> Result<Vec<SnapshotRow>, Error> {
    let rows = client
        .query(&format!("{COLUMNS} WHERE tenant_id = $1 AND udid = $2 ORDER BY committed_at DESC"), &[&tenant.0, &udid])
        .await?;
    Ok(rows.iter().map(row).collect())
}

/// The newest matching snapshot of each device (the operator's `verify`), across tenants
/// unless one is named: (tenant, snapshot, logical bytes).
pub async fn newest_matching(
    client: &Client,
    tenant: Option<TenantId>,
    snapshot: Option<SnapshotId>,
    udid: Option<&str>,
) -> Result<Vec<(TenantId, SnapshotId, i64)>, Error> {
    let rows = client
        .query(
            "SELECT DISTINCT ON (tenant_id, udid) tenant_id, id, logical_bytes FROM snapshots \
             WHERE ($1::uuid IS NULL OR tenant_id = $1) AND ($2::uuid IS NULL OR id = $2) \
             AND ($3::text IS NULL OR udid = $3) ORDER BY tenant_id, udid, committed_at DESC",
            &[&tenant.map(|t| t.0), &snapshot.map(|s| s.0), &udid],
        )
        .await?;
    Ok(rows.iter().map(|r| (TenantId(r.get(0)), SnapshotId(r.get(1)), r.get(2))).collect())
}
