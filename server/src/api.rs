//! The HTTP API for admins, the help desk and scripts: `/api/v1/…`, JSON, authorised by
//! `Authorization: Bearer <credential>` (see `users`), every answer scoped to the
//! caller's tenant. Unknown or revoked credentials get 401; a role without the right
//! gets 403; another tenant's objects are 404, exactly like objects that do not exist.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use lifeboat_shared::ids::SnapshotId;
use lifeboat_shared::manifest::Manifest;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::ingest::Hub;
use crate::users::{self, Caller, Role};
use crate::{backup, chunkstore};

/// RFC 3339 UTC rendering of a timestamptz column, done by PostgreSQL.
macro_rules! ts {
    ($col:literal) => {
        concat!("to_char(", $col, " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
    };
}

pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{udid}/snapshots", get(device_snapshots))
        .route("/api/v1/snapshots/{id}", get(snapshot))
        .route("/api/v1/runs", get(runs))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/restore-tests", get(restore_tests))
        .route("/api/v1/restores", get(restores).post(create_restore))
        .route("/api/v1/restores/{id}", get(restore_job))
        .with_state(hub)
}

/// An API error: status and a message for people.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "{what}");
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{what} failed; see the server log"))
}

fn not_found(what: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, what.into())
}

impl FromRequestParts<Arc<Hub>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, hub: &Arc<Hub>) -> Result<Self, ApiError> {
        let unauthorized = |m: &str| ApiError(StatusCode::UNAUTHORIZED, m.to_string());
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("an Authorization: Bearer credential is required"))?;
        let credential = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <credential>`"))?;
        let client = hub.db.get().await.map_err(|e| internal("getting a database connection", e))?;
        users::authenticate(&client, credential.trim())
            .await
            .map_err(|e| internal("checking a credential", e))?
            .ok_or_else(|| unauthorized("unknown or revoked credential"))
    }
}

fn require(caller: &Caller, role: Role) -> Result<(), ApiError> {
    if caller.role >= role {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("this needs the {} role; you have {}", role.as_str(), caller.role.as_str()),
        ))
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

async fn db(hub: &Hub) -> Result<deadpool_postgres::Object, ApiError> {
    hub.db.get().await.map_err(|e| internal("getting a database connection", e))
}

/// Devices with their state and last successful backup.
async fn devices(State(hub): State<Arc<Hub>>, caller: Caller) -> ApiResult {
    require(&caller, Role::Viewer)?;
    let rows = db(&hub)
        .await?
        .query(
            concat!(
                "SELECT d.udid, d.name, d.product_type, d.ios_version, d.state, ",
                ts!("d.state_changed_at"),
                ", ",
                ts!("d.last_seen_at"),
                ", ",
                ts!("s.committed_at"),
                ", s.id FROM devices d LEFT JOIN LATERAL (SELECT id, committed_at FROM snapshots ",
                "WHERE tenant_id = d.tenant_id AND udid = d.udid ORDER BY committed_at DESC LIMIT 1) s ON true ",
                "WHERE d.tenant_id = $1 ORDER BY d.udid"
            ),
            &[&caller.tenant.0],
        )
        .await
        .map_err(|e| internal("listing devices", e))?;
    let list: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "udid": r.get::<_, String>(0),
                "name": r.get::<_, Option<String>>(1),
                "product_type": r.get::<_, Option<String>>(2),
                "ios_version": r.get::<_, Option<String>>(3),
                "state": r.get::<_, String>(4),
                "state_changed_at": r.get::<_, String>(5),
                "last_seen_at": r.get::<_, String>(6),
                "last_successful_backup_at": r.get::<_, Option<String>>(7),
                "last_snapshot_id": r.get::<_, Option<uuid::Uuid>>(8),
            })
        })
        .collect();
    Ok(Json(json!({ "devices": list })))
}

async fn device_snapshots(State(hub): State<Arc<Hub>>, caller: Caller, Path(udid): Path<String>) -> ApiResult {
    require(&caller, Role::Viewer)?;
    let client = db(&hub).await?;
    let exists = client
        .query_opt("SELECT 1 FROM devices WHERE tenant_id = $1 AND udid = $2", &[&caller.tenant.0, &udid])
        .await
        .map_err(|e| internal("finding a device", e))?;
    if exists.is_none() {
        return Err(not_found(format!("no device {udid}")));
    }
    let rows = client
        .query(
            concat!(
                "SELECT id, ",
                ts!("committed_at"),
                ", file_count, logical_bytes, ios_version, product_type FROM snapshots ",
                "WHERE tenant_id = $1 AND udid = $2 ORDER BY committed_at DESC"
            ),
            &[&caller.tenant.0, &udid],
        )
        .await
        .map_err(|e| internal("listing snapshots", e))?;
    let list: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.get::<_, uuid::Uuid>(0),
                "committed_at": r.get::<_, String>(1),
                "file_count": r.get::<_, i64>(2),
                "logical_bytes": r.get::<_, i64>(3),
                "ios_version": r.get::<_, Option<String>>(4),
                "product_type": r.get::<_, Option<String>>(5),
            })
        })
        .collect();
    Ok(Json(json!({ "udid": udid, "snapshots": list })))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    domain: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

/// One file of a snapshot, as the phone names it.
#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
struct ListedFile {
    domain: Option<String>,
    path: String,
    size: u64,
}

/// A snapshot with its file listing by iOS domain and path (from its Manifest.db).
async fn snapshot(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    require(&caller, Role::Helpdesk)?;
    let id: SnapshotId = id.parse().map_err(|_| not_found(format!("no snapshot {id}")))?;
    let client = db(&hub).await?;
    let row = client
        .query_opt(
            concat!(
                "SELECT udid, manifest_key, ",
                ts!("committed_at"),
                ", file_count, logical_bytes, ios_version, product_type FROM snapshots WHERE tenant_id = $1 AND id = $2"
            ),
            &[&caller.tenant.0, &id.0],
        )
        .await
        .map_err(|e| internal("finding a snapshot", e))?
        .ok_or_else(|| not_found(format!("no snapshot {id}")))?;
    let keys = hub.tenant_keys(caller.tenant).await.map_err(|r| internal("loading tenant keys", r.message))?;
    let key: String = row.get(1);
    let sealed = hub.storage.read(&key).await.map_err(|e| internal("reading a manifest", e))?.to_vec();
    let manifest = Manifest::open(&keys.data, &id, &sealed).map_err(|e| internal("opening a manifest", e))?;

    let mut files = match manifest.files.iter().find(|f| f.path == "Manifest.db") {
        Some(db_file) => {
            let ids: Vec<_> = db_file.chunks.iter().map(|c| c.id).collect();
            let plain = chunkstore::read_plain(&client, &hub.storage, &keys, &ids)
                .await
                .map_err(|e| internal("reading Manifest.db", e))?;
            let mut bytes = Vec::with_capacity(db_file.size as usize);
            for c in &db_file.chunks {
                bytes.extend_from_slice(
                    plain.get(&c.id).ok_or_else(|| internal("reading Manifest.db", "chunk missing"))?,
                );
            }
            let sizes: std::collections::HashMap<&str, u64> =
                manifest.files.iter().map(|f| (f.path.as_str(), f.size)).collect();
            let listed = tokio::task::spawn_blocking(move || backup::with_sqlite(&bytes, backup::manifest_db_files))
                .await
                .map_err(|e| internal("reading Manifest.db", e))?
                .map_err(|e| internal("reading Manifest.db", e))?;
            listed
                .into_iter()
                .map(|f| ListedFile {
                    size: sizes.get(backup::backup_path(&f.file_id).as_str()).copied().unwrap_or(0),
                    domain: Some(f.domain),
                    path: f.path,
                })
                .collect::<Vec<_>>()
        }
        // Not an iPhone backup directory: list the stored paths as they are.
        None => {
            manifest.files.iter().map(|f| ListedFile { domain: None, path: f.path.clone(), size: f.size }).collect()
        }
    };
    if let Some(d) = &q.domain {
        files.retain(|f| f.domain.as_deref() == Some(d));
    }
    files.sort();
    let total = files.len();
    let offset = q.offset.unwrap_or(0).min(total);
    let limit = q.limit.unwrap_or(1000).min(10_000);
    let page: Vec<&ListedFile> = files[offset..].iter().take(limit).collect();
    Ok(Json(json!({
        "id": id,
        "udid": row.get::<_, String>(0),
        "committed_at": row.get::<_, String>(2),
        "file_count": row.get::<_, i64>(3),
        "logical_bytes": row.get::<_, i64>(4),
        "ios_version": row.get::<_, Option<String>>(5),
        "product_type": row.get::<_, Option<String>>(6),
        "files_total": total,
        "offset": offset,
        "files": page,
    })))
}

#[derive(Debug, Deserialize)]
struct RunsQuery {
    status: Option<String>,
    udid: Option<String>,
    limit: Option<i64>,
}

/// Backup runs, newest first, with their failure reasons.
async fn runs(State(hub): State<Arc<Hub>>, caller: Caller, Query(q): Query<RunsQuery>) -> ApiResult {
    require(&caller, Role::Viewer)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let rows = db(&hub)
        .await?
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
            &[&caller.tenant.0, &q.status, &q.udid, &limit],
        )
        .await
        .map_err(|e| internal("listing runs", e))?;
    let list: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.get::<_, uuid::Uuid>(0),
                "udid": r.get::<_, String>(1),
                "agent_id": r.get::<_, uuid::Uuid>(2),
                "status": r.get::<_, String>(3),
                "reason": r.get::<_, Option<String>>(4),
                "message": r.get::<_, Option<String>>(5),
                "started_at": r.get::<_, String>(6),
                "finished_at": r.get::<_, Option<String>>(7),
                "files": r.get::<_, i64>(8),
                "bytes": r.get::<_, i64>(9),
            })
        })
        .collect();
    Ok(Json(json!({ "runs": list })))
}

async fn agents(State(hub): State<Arc<Hub>>, caller: Caller) -> ApiResult {
    require(&caller, Role::Viewer)?;
    let rows = db(&hub)
        .await?
        .query(
            concat!(
                "SELECT id, hostname, version, ",
                ts!("enrolled_at"),
                ", ",
                ts!("last_seen_at"),
                ", revoked_at IS NOT NULL FROM agents WHERE tenant_id = $1 ORDER BY hostname, id"
            ),
            &[&caller.tenant.0],
        )
        .await
        .map_err(|e| internal("listing agents", e))?;
    let list: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.get::<_, uuid::Uuid>(0),
                "hostname": r.get::<_, String>(1),
                "version": r.get::<_, Option<String>>(2),
                "enrolled_at": r.get::<_, String>(3),
                "last_seen_at": r.get::<_, Option<String>>(4),
                "revoked": r.get::<_, bool>(5),
            })
        })
        .collect();
    Ok(Json(json!({ "agents": list })))
}

#[derive(Debug, Deserialize)]
struct RestoreTestsQuery {
    passed: Option<bool>,
    udid: Option<String>,
    snapshot: Option<String>,
    limit: Option<i64>,
}

/// Restore-test results, newest first, with what the backup held beside the previous
/// snapshot's test of the same device.
async fn restore_tests(State(hub): State<Arc<Hub>>, caller: Caller, Query(q): Query<RestoreTestsQuery>) -> ApiResult {
    require(&caller, Role::Viewer)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let snapshot = match &q.snapshot {
        Some(s) => Some(s.parse::<SnapshotId>().map_err(|_| not_found(format!("no snapshot {s}")))?.0),
        None => None,
    };
    let rows = db(&hub)
        .await?
        .query(
            concat!(
                "SELECT r.id, r.snapshot_id, s.udid, ",
                ts!("r.finished_at"),
                ", r.passed, r.files_checked, r.bytes_checked, r.problems, r.messages, r.contacts, r.photos, ",
                "p.messages, p.contacts, p.photos ",
                "FROM restore_tests r JOIN snapshots s ON s.tenant_id = r.tenant_id AND s.id = r.snapshot_id ",
                "LEFT JOIN LATERAL (SELECT pr.messages, pr.contacts, pr.photos FROM snapshots ps ",
                "  JOIN restore_tests pr ON pr.tenant_id = ps.tenant_id AND pr.snapshot_id = ps.id ",
                "  WHERE ps.tenant_id = s.tenant_id AND ps.udid = s.udid AND ps.committed_at < s.committed_at ",
                "  ORDER BY ps.committed_at DESC, pr.finished_at DESC LIMIT 1) p ON true ",
                "WHERE r.tenant_id = $1 AND ($2::bool IS NULL OR r.passed = $2) AND ($3::text IS NULL OR s.udid = $3) ",
                "AND ($4::uuid IS NULL OR r.snapshot_id = $4) ORDER BY r.finished_at DESC LIMIT $5"
            ),
            &[&caller.tenant.0, &q.passed, &q.udid, &snapshot, &limit],
        )
        .await
        .map_err(|e| internal("listing restore tests", e))?;
    let list: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.get::<_, uuid::Uuid>(0),
                "snapshot_id": r.get::<_, uuid::Uuid>(1),
                "udid": r.get::<_, String>(2),
                "finished_at": r.get::<_, String>(3),
                "passed": r.get::<_, bool>(4),
                "files_checked": r.get::<_, i64>(5),
                "bytes_checked": r.get::<_, i64>(6),
                "problems": r.get::<_, Vec<String>>(7),
                "counts": {
                    "messages": r.get::<_, Option<i64>>(8),
                    "contacts": r.get::<_, Option<i64>>(9),
                    "photos": r.get::<_, Option<i64>>(10),
                },
                "previous_counts": {
                    "messages": r.get::<_, Option<i64>>(11),
                    "contacts": r.get::<_, Option<i64>>(12),
                    "photos": r.get::<_, Option<i64>>(13),
                },
            })
        })
        .collect();
    Ok(Json(json!({ "restore_tests": list })))
}

/// A restore job as the API shows it.
const RESTORE_COLUMNS: &str = concat!(
    "SELECT j.id, j.snapshot_id, s.udid, j.target_udid, j.status, j.reason, j.message, j.agent_id, ",
    ts!("j.created_at"),
    ", ",
    ts!("j.started_at"),
    ", ",
    ts!("j.finished_at"),
    " FROM restore_jobs j JOIN snapshots s ON s.tenant_id = j.tenant_id AND s.id = j.snapshot_id ",
);

fn restore_json(r: &tokio_postgres::Row) -> Value {
    json!({
        "id": r.get::<_, uuid::Uuid>(0),
        "snapshot_id": r.get::<_, uuid::Uuid>(1),
        "source_udid": r.get::<_, String>(2),
        "target_udid": r.get::<_, String>(3),
        "status": r.get::<_, String>(4),
        "reason": r.get::<_, Option<String>>(5),
        "message": r.get::<_, Option<String>>(6),
        "agent_id": r.get::<_, Option<uuid::Uuid>>(7),
        "created_at": r.get::<_, String>(8),
        "started_at": r.get::<_, Option<String>>(9),
        "finished_at": r.get::<_, Option<String>>(10),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRestore {
    /// The iPhone to restore onto (attached to some enrolled workstation).
    target_udid: String,
    /// The snapshot to restore…
    snapshot_id: Option<uuid::Uuid>,
    /// …or the latest snapshot of this device.
    from_device: Option<String>,
}

/// Asks for a snapshot to be restored onto an iPhone: the agent of the workstation where
/// it is attached picks the job up, restores, and reports. Help desk and admins.
async fn create_restore(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    body: Result<Json<NewRestore>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require(&caller, Role::Helpdesk)?;
    let Json(req) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let target: lifeboat_shared::ids::Udid =
        req.target_udid.parse().map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("target_udid: {e}")))?;
    let client = db(&hub).await?;
    let snapshot = match (req.snapshot_id, req.from_device) {
        (Some(id), None) => client
            .query_opt("SELECT id FROM snapshots WHERE tenant_id = $1 AND id = $2", &[&caller.tenant.0, &id])
            .await
            .map_err(|e| internal("finding the snapshot", e))?
            .map(|r| r.get::<_, uuid::Uuid>(0))
            .ok_or_else(|| not_found(format!("no snapshot {id}")))?,
        (None, Some(udid)) => client
            .query_opt(
                "SELECT id FROM snapshots WHERE tenant_id = $1 AND udid = $2 ORDER BY committed_at DESC LIMIT 1",
                &[&caller.tenant.0, &udid],
            )
            .await
            .map_err(|e| internal("finding the snapshot", e))?
            .map(|r| r.get::<_, uuid::Uuid>(0))
            .ok_or_else(|| not_found(format!("no snapshot of device {udid}")))?,
        _ => {
            return Err(ApiError(StatusCode::BAD_REQUEST, "give exactly one of snapshot_id and from_device".into()));
        }
    };
    let inserted = client
        .query_one(
            "INSERT INTO restore_jobs (tenant_id, snapshot_id, target_udid, requested_by) VALUES ($1, $2, $3, $4) RETURNING id",
            &[&caller.tenant.0, &snapshot, &target.as_str(), &caller.user],
        )
        .await;
    let id: uuid::Uuid = match inserted {
        Ok(row) => row.get(0),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("device {target} already has a restore job queued or running"),
            ));
        }
        Err(e) => return Err(internal("creating the restore job", e)),
    };
    tracing::info!(user.id = %caller.user, restore.id = %id, snapshot.id = %snapshot, device.udid = %target, "restore job queued");
    let row = client
        .query_one(&format!("{RESTORE_COLUMNS} WHERE j.tenant_id = $1 AND j.id = $2"), &[&caller.tenant.0, &id])
        .await
        .map_err(|e| internal("reading the restore job", e))?;
    Ok((StatusCode::CREATED, Json(restore_json(&row))))
}

/// Restore jobs, newest first.
async fn restores(State(hub): State<Arc<Hub>>, caller: Caller) -> ApiResult {
    require(&caller, Role::Viewer)?;
    let rows = db(&hub)
        .await?
        .query(
            &format!("{RESTORE_COLUMNS} WHERE j.tenant_id = $1 ORDER BY j.created_at DESC LIMIT 1000"),
            &[&caller.tenant.0],
        )
        .await
        .map_err(|e| internal("listing restore jobs", e))?;
    Ok(Json(json!({ "restores": rows.iter().map(restore_json).collect::<Vec<_>>() })))
}

async fn restore_job(State(hub): State<Arc<Hub>>, caller: Caller, Path(id): Path<String>) -> ApiResult {
    require(&caller, Role::Viewer)?;
    let id: uuid::Uuid = id.parse().map_err(|_| not_found(format!("no restore job {id}")))?;
    let row = db(&hub)
        .await?
        .query_opt(&format!("{RESTORE_COLUMNS} WHERE j.tenant_id = $1 AND j.id = $2"), &[&caller.tenant.0, &id])
        .await
        .map_err(|e| internal("reading the restore job", e))?
        .ok_or_else(|| not_found(format!("no restore job {id}")))?;
    Ok(Json(restore_json(&row)))
}
