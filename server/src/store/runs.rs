//! `backup_runs`: one row per backup attempt, with the lease that makes an agent the only
//! one backing up a device (a partial unique index allows one `running` row per device).

use std::time::Duration;

use lifeboat_shared::ids::{AgentId, RunId, SnapshotId, TenantId, Udid};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Error};

use super::{constraint, is, ts};

/// What opening a run found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// A new running run; `replaced` is the run it ended (its lease had expired, or this
    /// agent opened it before) and the reason given.
    Run { run: RunId, snapshot: SnapshotId, replaced: Option<(RunId, &'static str)> },
    /// Another agent holds a live lease on the device (`None`: it opened its run at the
    /// same moment as this one, and won).
    Held(Option<RunId>),
    /// The device is not registered.
    NoDevice,
}

/// Opens a run for the device under a lease of `lease`, replacing a run whose lease
/// expired or that this same agent holds. One short transaction: nothing in it waits on
/// storage; the caller flushes the replaced run's buffer afterwards.
pub async fn open(
    client: &mut Client,
    tenant: TenantId,
    agent: AgentId,
    udid: &Udid,
    lease: Duration,
) -> Result<Opened, Error> {
    let tx = client.transaction().await?;
    let current = tx
        .query_opt(
            "SELECT id, agent_id, lease_expires_at < now() FROM backup_runs \
             WHERE tenant_id = $1 AND udid = $2 AND status = 'running' FOR UPDATE",
            &[&tenant.0, &udid.as_str()],
        )
        .await?;
    let mut replaced = None;
    if let Some(row) = current {
        let (old, holder, expired): (uuid::Uuid, uuid::Uuid, bool) = (row.get(0), row.get(1), row.get(2));
        let reason = if expired {
            "lease-expired"
        } else if holder == agent.0 {
            "superseded"
        } else {
            return Ok(Opened::Held(Some(RunId(old))));
        };
        tx.execute(
            "UPDATE backup_runs SET status = 'failed', reason = $3, message = 'a new run replaced it', \
             finished_at = now() WHERE tenant_id = $1 AND id = $2",
            &[&tenant.0, &old, &reason],
        )
        .await?;
        replaced = Some((RunId(old), reason));
    }
    let inserted = tx
        .query_one(
            "INSERT INTO backup_runs (tenant_id, udid, agent_id, lease_expires_at) \
             VALUES ($1, $2, $3, now() + make_interval(secs => $4)) RETURNING id, snapshot_id",
            &[&tenant.0, &udid.as_str(), &agent.0, &lease.as_secs_f64()],
        )
        .await;
    let row = match inserted {
        Ok(row) => row,
        Err(e) if is(&e, &SqlState::FOREIGN_KEY_VIOLATION) => return Ok(Opened::NoDevice),
        // Another OpenRun for the device committed its row between our look and our insert.
        Err(e) if is(&e, &SqlState::UNIQUE_VIOLATION) && constraint(&e) == Some("backup_runs_one_running") => {
            return Ok(Opened::Held(None));
        }
        Err(e) => return Err(e),
    };
    tx.commit().await?;
    Ok(Opened::Run { run: RunId(row.get(0)), snapshot: SnapshotId(row.get(1)), replaced })
}

/// A run as its lease holder sees it.
#[derive(Debug, Clone)]
pub struct Lease {
    pub agent: AgentId,
    pub status: String,
    pub udid: String,
    pub snapshot: SnapshotId,
}

/// Renews the run's lease (never shortening it) if `agent` holds it, and returns the run;
/// `None` if the tenant has no such run. Another agent naming the run learns whose it is
/// but does not keep it alive.
pub async fn renew(
    client: &Client,
    tenant: TenantId,
    agent: AgentId,
    run: RunId,
    lease: Duration,
) -> Result<Option<Lease>, Error> {
    let row = client
        .query_opt(
            "UPDATE backup_runs SET lease_expires_at = CASE WHEN agent_id = $4 \
               THEN greatest(lease_expires_at, now() + make_interval(secs => $3)) ELSE lease_expires_at END \
             WHERE tenant_id = $1 AND id = $2 RETURNING agent_id, status, udid, snapshot_id",
            &[&tenant.0, &run.0, &lease.as_secs_f64(), &agent.0],
        )
        .await?;
    Ok(row.map(|r| Lease {
        agent: AgentId(r.get(0)),
        status: r.get(1),
        udid: r.get(2),
        snapshot: SnapshotId(r.get(3)),
    }))
}

/// Ends a running run of this agent as failed or cancelled.
pub async fn end(
    client: &Client,
    tenant: TenantId,
    agent: AgentId,
    run: RunId,
    status: &str,
    reason: &str,
    message: &str,
) -> Result<bool, Error> {
    let n = client
        .execute(
            "UPDATE backup_runs SET status = $4, reason = $5, message = nullif($6, ''), finished_at = now() \
             WHERE tenant_id = $1 AND id = $2 AND agent_id = $3 AND status = 'running'",
            &[&tenant.0, &run.0, &agent.0, &status, &reason, &message],
        )
        .await?;
    Ok(n == 1)
}

/// A snapshot about to become visible.
#[derive(Debug, Clone)]
pub struct NewSnapshot<'a> {
    pub id: SnapshotId,
    pub udid: &'a str,
    pub manifest_key: &'a str,
    pub ios_version: &'a str,
    pub product_type: &'a str,
    pub files: i64,
    pub logical_bytes: i64,
    /// The phone encrypted the backup (the manifest has its key records).
    pub ios_encrypted: bool,
}

/// Marks the run succeeded and inserts its snapshot, in one transaction: false (and
/// nothing written) if the run is no longer this agent's running run.
pub async fn commit(
    client: &mut Client,
    tenant: TenantId,
    agent: AgentId,
    run: RunId,
    s: &NewSnapshot<'_>,
) -> Result<bool, Error> {
    let tx = client.transaction().await?;
    let updated = tx
        .execute(
            "UPDATE backup_runs SET status = 'succeeded', finished_at = now(), files_total = $4, bytes_total = $5 \
             WHERE tenant_id = $1 AND id = $2 AND agent_id = $3 AND status = 'running'",
            &[&tenant.0, &run.0, &agent.0, &s.files, &s.logical_bytes],
        )
        .await?;
    if updated != 1 {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO snapshots (tenant_id, id, udid, run_id, manifest_key, ios_version, product_type, file_count, \
         logical_bytes, ios_encrypted) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &[
            &tenant.0,
            &s.id.0,
            &s.udid,
            &run.0,
            &s.manifest_key,
            &s.ios_version,
            &s.product_type,
            &s.files,
            &s.logical_bytes,
            &s.ios_encrypted,
        ],
    )
    .await?;
    // Backed up: whatever it waited for is over, even if its agent never says idle.
    super::devices::end_waiting(&tx, tenant, s.udid).await?;
    tx.commit().await?;
    Ok(true)
}

/// Of `runs` (ids are unique across tenants), those that ended or whose lease expired.
pub async fn ended_or_expired(client: &Client, runs: &[uuid::Uuid]) -> Result<Vec<RunId>, Error> {
    let rows = client
        .query(
            "SELECT id FROM backup_runs WHERE id = ANY($1) AND (status <> 'running' OR lease_expires_at < now())",
            &[&runs],
        )
        .await?;
    Ok(rows.iter().map(|r| RunId(r.get(0))).collect())
}

/// A run as the API lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRow {
    pub id: uuid::Uuid,
    pub udid: String,
    pub agent_id: uuid::Uuid,
    pub status: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub files: i64,
    pub bytes: i64,
}

/// The tenant's runs, newest first, optionally of one status or device.
pub async fn list(
    client: &Client,
    tenant: TenantId,
    status: Option<&str>,
    udid: Option<&str>,
    limit: i64,
) -> Result<Vec<RunRow>, Error> {
    let rows = client
        .query(
            concat!(
                "SELECT id, udid, agent_id, status, reason, message, ",
                ts!("started_at"),
                ", ",
                ts!("finished_at"),
                ", files_total, bytes_total FROM backup_runs WHERE tenant_id = $1 ",
                "AND ($2::text IS NULL OR status = $2) AND ($3::text IS NULL OR udid = $3) ",
                "ORDER BY started_at DESC LIMIT $4"
            ),
            &[&tenant.0, &status, &udid, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| RunRow {
            id: r.get(0),
            udid: r.get(1),
            agent_id: r.get(2),
            status: r.get(3),
            reason: r.get(4),
            message: r.get(5),
            started_at: r.get(6),
            finished_at: r.get(7),
            files: r.get(8),
            bytes: r.get(9),
        })
        .collect())
}
