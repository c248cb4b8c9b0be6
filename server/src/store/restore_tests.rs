//! `restore_tests`: the results of rebuilding a snapshot from storage and checking it.

use std::time::{Duration, SystemTime};

use lifeboat_shared::ids::{SnapshotId, TenantId};
use tokio_postgres::{Client, Error};

use super::ts;

/// A result to record.
#[derive(Debug, Clone)]
pub struct NewResult<'a> {
    pub snapshot: SnapshotId,
    pub started: SystemTime,
    pub passed: bool,
    pub files_checked: u64,
    pub bytes_checked: u64,
    pub problems: &'a [String],
    pub messages: Option<i64>,
    pub contacts: Option<i64>,
    pub photos: Option<i64>,
    pub encrypted: bool,
    pub keychain: Option<bool>,
}

/// Records a result; returns its id.
pub async fn record(client: &Client, tenant: TenantId, r: &NewResult<'_>) -> Result<uuid::Uuid, Error> {
    let started_unix = r.started.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let row = client
        .query_one(
            "INSERT INTO restore_tests (tenant_id, snapshot_id, started_at, passed, files_checked, bytes_checked, \
             problems, messages, contacts, photos, encrypted, keychain) \
             VALUES ($1, $2, to_timestamp($3), $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id",
            &[
                &tenant.0,
                &r.snapshot.0,
                &started_unix,
                &r.passed,
                &(r.files_checked as i64),
                &(r.bytes_checked as i64),
                &r.problems,
                &r.messages,
                &r.contacts,
                &r.photos,
                &r.encrypted,
                &r.keychain,
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// A snapshot the runner may test.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub tenant: TenantId,
    pub snapshot: SnapshotId,
    pub never_tested: bool,
    /// Committed longer ago than the window.
    pub older_than_window: bool,
}

/// Snapshots never tested, and snapshots whose last test is older than `window` — every
/// snapshot, not only the newest, so old ones stay proven restorable — newest first, at
/// most `limit`. Across tenants: the runner serves them all.
pub async fn candidates(client: &Client, window: Duration, limit: i64) -> Result<Vec<Candidate>, Error> {
    let rows = client
        .query(
            "SELECT s.tenant_id, s.id, r.last IS NULL, s.committed_at < now() - make_interval(secs => $1) \
             FROM snapshots s \
             LEFT JOIN LATERAL (SELECT max(finished_at) AS last FROM restore_tests r \
               WHERE r.tenant_id = s.tenant_id AND r.snapshot_id = s.id) r ON true \
             WHERE r.last IS NULL OR r.last < now() - make_interval(secs => $1) \
             ORDER BY s.committed_at DESC LIMIT $2",
            &[&window.as_secs_f64(), &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Candidate {
            tenant: TenantId(r.get(0)),
            snapshot: SnapshotId(r.get(1)),
            never_tested: r.get(2),
            older_than_window: r.get(3),
        })
        .collect())
}

/// Counts of what a backup held.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Counts {
    pub messages: Option<i64>,
    pub contacts: Option<i64>,
    pub photos: Option<i64>,
}

/// A result as the API shows it, beside the previous snapshot's counts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResultRow {
    pub id: uuid::Uuid,
    pub snapshot_id: uuid::Uuid,
    pub udid: String,
    pub finished_at: String,
    pub passed: bool,
    pub files_checked: i64,
    pub bytes_checked: i64,
    pub problems: Vec<String>,
    pub counts: Counts,
    pub previous_counts: Counts,
    /// The phone encrypted the backup (its keys were checked against the escrowed password).
    pub encrypted: bool,
    /// The backup carries the keychain; `null` when Manifest.db could not be read.
    pub keychain: Option<bool>,
}

/// The tenant's results, newest first, filtered.
pub async fn list(
    client: &Client,
    tenant: TenantId,
    passed: Option<bool>,
    udid: Option<&str>,
    snapshot: Option<SnapshotId>,
    limit: i64,
) -> Result<Vec<ResultRow>, Error> {
    let rows = client
        .query(
            concat!(
                "SELECT r.id, r.snapshot_id, s.udid, ",
                ts!("r.finished_at"),
                ", r.passed, r.files_checked, r.bytes_checked, r.problems, r.messages, r.contacts, r.photos, ",
                "p.messages, p.contacts, p.photos, r.encrypted, r.keychain ",
                "FROM restore_tests r JOIN snapshots s ON s.tenant_id = r.tenant_id AND s.id = r.snapshot_id ",
                "LEFT JOIN LATERAL (SELECT pr.messages, pr.contacts, pr.photos FROM snapshots ps ",
                "  JOIN restore_tests pr ON pr.tenant_id = ps.tenant_id AND pr.snapshot_id = ps.id ",
                "  WHERE ps.tenant_id = s.tenant_id AND ps.udid = s.udid AND ps.committed_at < s.committed_at ",
                "  ORDER BY ps.committed_at DESC, pr.finished_at DESC LIMIT 1) p ON true ",
                "WHERE r.tenant_id = $1 AND ($2::bool IS NULL OR r.passed = $2) AND ($3::text IS NULL OR s.udid = $3) ",
                "AND ($4::uuid IS NULL OR r.snapshot_id = $4) ORDER BY r.finished_at DESC LIMIT $5"
            ),
            &[&tenant.0, &passed, &udid, &snapshot.map(|s| s.0), &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ResultRow {
            id: r.get(0),
            snapshot_id: r.get(1),
            udid: r.get(2),
            finished_at: r.get(3),
            passed: r.get(4),
            files_checked: r.get(5),
            bytes_checked: r.get(6),
            problems: r.get(7),
            counts: Counts { messages: r.get(8), contacts: r.get(9), photos: r.get(10) },
            previous_counts: Counts { messages: r.get(11), contacts: r.get(12), photos: r.get(13) },
            encrypted: r.get(14),
            keychain: r.get(15),
        })
        .collect())
}
