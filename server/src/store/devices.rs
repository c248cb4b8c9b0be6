//! `devices`: the iPhones agents have registered, their state and who saw them last.

use lifeboat_shared::ids::{AgentId, TenantId, Udid};
use lifeboat_shared::manifest::DeviceInfo;
use tokio_postgres::{Client, Error};

use super::ts;

/// Registers a device or updates what is known of it.
pub async fn register(
    client: &Client,
    tenant: TenantId,
    agent: AgentId,
    d: &DeviceInfo,
    serial: Option<&str>,
) -> Result<(), Error> {
    client
        .execute(
            "INSERT INTO devices (tenant_id, udid, name, product_type, ios_version, serial_number, last_agent_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (tenant_id, udid) DO UPDATE SET name = EXCLUDED.name, product_type = EXCLUDED.product_type, \
             ios_version = EXCLUDED.ios_version, serial_number = COALESCE(EXCLUDED.serial_number, devices.serial_number), \
             last_agent_id = EXCLUDED.last_agent_id, last_seen_at = now()",
            &[&tenant.0, &d.udid.as_str(), &d.name, &d.product_type, &d.ios_version, &serial, &agent.0],
        )
        .await?;
    Ok(())
}

/// Sets a device's state (its change time moves only when the state changes); false if
/// the device is not registered. Entering a state that waits for a person starts
/// `needs_action_since` unless it runs already; only `idle` (backed up) ends it, so the
/// retries in between do not reset it.
pub async fn set_state(
    client: &Client,
    tenant: TenantId,
    agent: AgentId,
    udid: &Udid,
    state: &str,
) -> Result<bool, Error> {
    let n = client
        .execute(
            "UPDATE devices SET state_changed_at = CASE WHEN state <> $3 THEN now() ELSE state_changed_at END, \
             needs_action_since = CASE \
               WHEN $3 IN ('needs-trust', 'needs-passcode', 'needs-backup-password') THEN coalesce(needs_action_since, now()) \
               WHEN $3 = 'idle' THEN NULL ELSE needs_action_since END, \
             state = $3, last_seen_at = now(), last_agent_id = $4 WHERE tenant_id = $1 AND udid = $2",
            &[&tenant.0, &udid.as_str(), &state, &agent.0],
        )
        .await?;
    Ok(n == 1)
}

/// Ends the device's wait for a person (`needs_action_since`): a snapshot of it was
/// committed.
pub async fn end_waiting(
    client: &impl tokio_postgres::GenericClient,
    tenant: TenantId,
    udid: &str,
) -> Result<(), Error> {
    client
        .execute(
            "UPDATE devices SET needs_action_since = NULL WHERE tenant_id = $1 AND udid = $2 AND needs_action_since IS NOT NULL",
            &[&tenant.0, &udid],
        )
        .await?;
    Ok(())
}

pub async fn exists(client: &impl tokio_postgres::GenericClient, tenant: TenantId, udid: &str) -> Result<bool, Error> {
    Ok(client
        .query_opt("SELECT 1 FROM devices WHERE tenant_id = $1 AND udid = $2", &[&tenant.0, &udid])
        .await?
        .is_some())
}

/// A device as the API lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceRow {
    pub udid: String,
    pub name: Option<String>,
    pub product_type: Option<String>,
    pub ios_version: Option<String>,
    pub serial_number: Option<String>,
    pub state: String,
    pub state_changed_at: String,
    pub last_seen_at: String,
    /// The workstation (agent hostname) that saw it last.
    pub last_seen_by: Option<String>,
    pub last_successful_backup_at: Option<String>,
    pub last_snapshot_id: Option<uuid::Uuid>,
    /// Seconds since its last successful backup, or since it was first seen if it has none.
    #[serde(skip)]
    pub unprotected_secs: f64,
    /// Seconds since a workstation last reported it.
    #[serde(skip)]
    pub seen_secs_ago: f64,
}

const DEVICE_ROWS: &str = concat!(
    "SELECT d.udid, d.name, d.product_type, d.ios_version, d.serial_number, d.state, ",
    ts!("d.state_changed_at"),
    ", ",
    ts!("d.last_seen_at"),
    ", a.hostname, ",
    ts!("s.committed_at"),
    ", s.id, extract(epoch FROM now() - coalesce(s.committed_at, d.first_seen_at))::float8, ",
    "extract(epoch FROM now() - d.last_seen_at)::float8 ",
    "FROM devices d LEFT JOIN LATERAL (SELECT id, committed_at FROM snapshots ",
    "WHERE tenant_id = d.tenant_id AND udid = d.udid ORDER BY committed_at DESC LIMIT 1) s ON true ",
    "LEFT JOIN agents a ON a.tenant_id = d.tenant_id AND a.id = d.last_agent_id ",
    "WHERE d.tenant_id = $1 AND ($2::text IS NULL OR d.udid = $2) ORDER BY d.udid"
);

fn device_row(r: &tokio_postgres::Row) -> DeviceRow {
    DeviceRow {
        udid: r.get(0),
        name: r.get(1),
        product_type: r.get(2),
        ios_version: r.get(3),
        serial_number: r.get(4),
        state: r.get(5),
        state_changed_at: r.get(6),
        last_seen_at: r.get(7),
        last_seen_by: r.get(8),
        last_successful_backup_at: r.get(9),
        last_snapshot_id: r.get(10),
        unprotected_secs: r.get(11),
        seen_secs_ago: r.get(12),
    }
}

/// The tenant's devices with their last successful backup, by UDID.
pub async fn list(client: &Client, tenant: TenantId) -> Result<Vec<DeviceRow>, Error> {
    Ok(client.query(DEVICE_ROWS, &[&tenant.0, &None::<String>]).await?.iter().map(device_row).collect())
}

/// One device of the tenant.
pub async fn get(client: &Client, tenant: TenantId, udid: &str) -> Result<Option<DeviceRow>, Error> {
    Ok(client.query_opt(DEVICE_ROWS, &[&tenant.0, &udid]).await?.as_ref().map(device_row))
}
