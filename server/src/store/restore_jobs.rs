//! `restore_jobs`: restores the help desk queued, claimed by the agent where the target
//! iPhone is attached, under a lease.
//!
//! A claimed job holds a lease of [`RESTORE_LEASE`]. A job whose lease expired (its agent
//! was killed, or could not report the end) is shown as `stuck`, is claimed again by the
//! next `NextRestore` for its iPhone, and is ended (`failed`, `lease-expired`) when a new
//! restore of that iPhone is queued.

use std::time::Duration;

use lifeboat_shared::ids::{AgentId, RestoreJobId, SnapshotId, TenantId};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Error};

use super::{constraint, is, ts};

/// How long a claimed restore job is the claiming agent's.
pub const RESTORE_LEASE: Duration = Duration::from_secs(3600);

/// Claims the oldest open job for the iPhone for this agent: a queued one, one this agent
/// claimed before (a restarted agent; asking again renews the lease), or one whose lease
/// expired.
pub async fn claim_next(
    client: &Client,
    tenant: TenantId,
    agent: AgentId,
    udid: &str,
) -> Result<Option<(RestoreJobId, SnapshotId)>, Error> {
    let row = client
        .query_opt(
            "UPDATE restore_jobs SET \
             started_at = CASE WHEN status = 'running' AND agent_id = $3 THEN started_at ELSE now() END, \
             status = 'running', agent_id = $3, \
             lease_expires_at = now() + make_interval(secs => $4) \
             WHERE tenant_id = $1 AND id = (SELECT id FROM restore_jobs WHERE tenant_id = $1 AND target_udid = $2 \
             AND (status = 'queued' OR (status = 'running' AND (agent_id = $3 OR lease_expires_at < now()))) \
             ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id, snapshot_id",
            &[&tenant.0, &udid, &agent.0, &RESTORE_LEASE.as_secs_f64()],
        )
        .await?;
    Ok(row.map(|r| (RestoreJobId(r.get(0)), SnapshotId(r.get(1)))))
}

/// Ends this agent's running job; false if it is not running for this agent.
pub async fn end(
    client: &Client,
    tenant: TenantId,
    agent: AgentId,
    job: RestoreJobId,
    status: &str,
    reason: Option<&str>,
    message: Option<&str>,
) -> Result<bool, Error> {
    let n = client
        .execute(
            "UPDATE restore_jobs SET status = $4, reason = $5, message = $6, finished_at = now(), lease_expires_at = NULL \
             WHERE tenant_id = $1 AND id = $2 AND agent_id = $3 AND status = 'running'",
            &[&tenant.0, &job.0, &agent.0, &status, &reason, &message],
        )
        .await?;
    Ok(n == 1)
}

/// A restore job as the API shows it. `status` is `stuck` for a running job whose lease
/// expired.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobRow {
    pub id: uuid::Uuid,
    pub snapshot_id: uuid::Uuid,
    pub source_udid: String,
    /// `restore` (onto `target_udid`) or `export` (no target).
    pub kind: String,
    pub target_udid: Option<String>,
    pub status: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub agent_id: Option<uuid::Uuid>,
    /// The help-desk user who created it (none for jobs of schema 3 and before).
    pub requested_by: Option<uuid::Uuid>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub lease_expires_at: Option<String>,
}

const COLUMNS: &str = concat!(
    "SELECT j.id, j.snapshot_id, s.udid, j.target_udid, ",
    "CASE WHEN j.status = 'running' AND j.lease_expires_at < now() THEN 'stuck' ELSE j.status END, ",
    "j.reason, j.message, j.agent_id, j.kind, j.requested_by, ",
    ts!("j.created_at"),
    ", ",
    ts!("j.started_at"),
    ", ",
    ts!("j.finished_at"),
    ", ",
    ts!("j.lease_expires_at"),
    " FROM restore_jobs j JOIN snapshots s ON s.tenant_id = j.tenant_id AND s.id = j.snapshot_id ",
);

fn row(r: &tokio_postgres::Row) -> JobRow {
    JobRow {
        id: r.get(0),
        snapshot_id: r.get(1),
        source_udid: r.get(2),
        target_udid: r.get(3),
        status: r.get(4),
        reason: r.get(5),
        message: r.get(6),
        agent_id: r.get(7),
        kind: r.get(8),
        requested_by: r.get(9),
        created_at: r.get(10),
        started_at: r.get(11),
        finished_at: r.get(12),
        lease_expires_at: r.get(13),
    }
}

pub async fn get(client: &Client, tenant: TenantId, id: uuid::Uuid) -> Result<Option<JobRow>, Error> {
    let r = client.query_opt(&format!("{COLUMNS} WHERE j.tenant_id = $1 AND j.id = $2"), &[&tenant.0, &id]).await?;
    Ok(r.as_ref().map(row))
}

/// The tenant's jobs, newest first.
pub async fn list(client: &Client, tenant: TenantId, limit: i64) -> Result<Vec<JobRow>, Error> {
    let rows = client
        .query(&format!("{COLUMNS} WHERE j.tenant_id = $1 ORDER BY j.created_at DESC LIMIT $2"), &[&tenant.0, &limit])
        .await?;
    Ok(rows.iter().map(row).collect())
}

/// What queuing a restore found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queued {
    Job(uuid::Uuid),
    /// The iPhone already has a job queued, or running under a live lease.
    Busy,
}

/// Queues a restore of `snapshot` onto `target`, first ending (failed, `lease-expired`) a
/// stuck job of that iPhone, in one transaction.
pub async fn create(
    client: &mut Client,
    tenant: TenantId,
    snapshot: SnapshotId,
    target: &str,
    requested_by: uuid::Uuid,
) -> Result<Queued, Error> {
    let tx = client.transaction().await?;
    end_stuck(&tx, tenant, target).await?;
    let sql = "INSERT INTO restore_jobs (tenant_id, snapshot_id, target_udid, requested_by) VALUES ($1, $2, $3, $4) \
               RETURNING id";
    commit_insert(tx, sql, &[&tenant.0, &snapshot.0, &target, &requested_by]).await
}

/// Inserts a job (`sql` ends in `RETURNING id`) and commits `tx`; `Busy` when its target
/// already has an open job (and then nothing of `tx` is kept).
async fn commit_insert(
    tx: tokio_postgres::Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Queued, Error> {
    match tx.query_one(sql, params).await {
        Ok(r) => {
            tx.commit().await?;
            Ok(Queued::Job(r.get(0)))
        }
        Err(e) if is(&e, &SqlState::UNIQUE_VIOLATION) && constraint(&e) == Some("restore_jobs_one_open_per_target") => {
            Ok(Queued::Busy)
        }
        Err(e) => Err(e),
    }
}

/// Ends (failed, `lease-expired`) a running job of `target` whose lease expired.
async fn end_stuck(tx: &tokio_postgres::Transaction<'_>, tenant: TenantId, target: &str) -> Result<(), Error> {
    let ended = tx
        .execute(
            "UPDATE restore_jobs SET status = 'failed', reason = 'lease-expired', \
             message = 'its agent stopped reporting; a new restore replaced it', finished_at = now(), \
             lease_expires_at = NULL \
             WHERE tenant_id = $1 AND target_udid = $2 AND status = 'running' AND lease_expires_at < now()",
            &[&tenant.0, &target],
        )
        .await?;
    if ended > 0 {
        tracing::info!(tenant.id = %tenant, device.udid = target, "ended a stuck restore job");
    }
    Ok(())
}

/// What a job started at a workstation reads: onto which phone, if a restore.
#[derive(Debug, Clone, Copy)]
pub enum Kind<'a> {
    Restore { target: &'a str },
    Export,
}

/// Creates a job already claimed by `agent` (running, under its lease): a restore or
/// export a help-desk user started at that agent's workstation. A restore first ends a
/// stuck job of its target, as [`create`] does.
pub async fn start(
    client: &mut Client,
    tenant: TenantId,
    agent: AgentId,
    snapshot: SnapshotId,
    kind: Kind<'_>,
    requested_by: uuid::Uuid,
) -> Result<Queued, Error> {
    let tx = client.transaction().await?;
    let (kind, target) = match kind {
        Kind::Restore { target } => ("restore", Some(target)),
        Kind::Export => ("export", None),
    };
    if let Some(target) = target {
        end_stuck(&tx, tenant, target).await?;
    }
    let sql = "INSERT INTO restore_jobs (tenant_id, snapshot_id, kind, target_udid, requested_by, status, agent_id, \
               started_at, lease_expires_at) \
               VALUES ($1, $2, $3, $4, $5, 'running', $6, now(), now() + make_interval(secs => $7)) RETURNING id";
    let lease = RESTORE_LEASE.as_secs_f64();
    commit_insert(tx, sql, &[&tenant.0, &snapshot.0, &kind, &target, &requested_by, &agent.0, &lease]).await
}

/// The snapshots `agent` may read now: those of its running jobs under a live lease,
/// while the agent is not revoked. Everything else is refused as if it did not exist.
pub async fn readable_snapshots(client: &Client, tenant: TenantId, agent: AgentId) -> Result<Vec<SnapshotId>, Error> {
    let rows = client
        .query(
            "SELECT DISTINCT j.snapshot_id FROM restore_jobs j JOIN agents a ON a.tenant_id = j.tenant_id AND a.id = j.agent_id \
             WHERE j.tenant_id = $1 AND j.agent_id = $2 AND j.status = 'running' AND j.lease_expires_at > now() \
             AND a.revoked_at IS NULL",
            &[&tenant.0, &agent.0],
        )
        .await?;
    Ok(rows.iter().map(|r| SnapshotId(r.get(0))).collect())
}

/// Whether `agent` (not revoked) holds the device now: a live backup lease on it, or a
/// running job on one of its snapshots. Only then does it get the device's backup password.
pub async fn holds_device(client: &Client, tenant: TenantId, agent: AgentId, udid: &str) -> Result<bool, Error> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM agents WHERE tenant_id = $1 AND id = $2 AND revoked_at IS NULL) AND ( \
               EXISTS (SELECT 1 FROM backup_runs WHERE tenant_id = $1 AND udid = $3 AND agent_id = $2 \
                       AND status = 'running' AND lease_expires_at > now()) \
               OR EXISTS (SELECT 1 FROM restore_jobs j JOIN snapshots s ON s.tenant_id = j.tenant_id AND s.id = j.snapshot_id \
                       WHERE j.tenant_id = $1 AND j.agent_id = $2 AND j.status = 'running' \
                       AND j.lease_expires_at > now() AND s.udid = $3))",
            &[&tenant.0, &agent.0, &udid],
        )
        .await?;
    Ok(row.get(0))
}
