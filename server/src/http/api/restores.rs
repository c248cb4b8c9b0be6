//! `/api/v1/restores`: restore jobs the help desk queues; the agent of the workstation
//! where the target iPhone is attached claims one under a lease and reports how it ended.
//! A job whose lease expired shows as `stuck`.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use lifeboat_shared::ids::{SnapshotId, Udid};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiResult, db};
use crate::app::App;
use crate::http::caller::require;
use crate::http::error::{ApiError, bad_request, internal, not_found};
use crate::store::{self, restore_jobs::Queued};
use crate::users::{Caller, Role};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRestore {
    /// The iPhone to restore onto (attached to some enrolled workstation).
    target_udid: String,
    /// The snapshot to restore…
    snapshot_id: Option<uuid::Uuid>,
    /// …or the latest snapshot of this device.
    from_device: Option<String>,
}

/// Asks for a snapshot to be restored onto an iPhone. Help desk and admins.
pub async fn create(
    State(app): State<Arc<App>>,
    caller: Caller,
    body: Result<Json<NewRestore>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require(&caller, Role::Helpdesk)?;
    let Json(req) = body.map_err(|e| bad_request(e.body_text()))?;
    let target: Udid = req.target_udid.parse().map_err(|e| bad_request(format!("target_udid: {e}")))?;
    let mut client = db(&app).await?;
    let snapshot = match (req.snapshot_id, req.from_device) {
        (Some(id), None) => store::snapshots::get(&client, caller.tenant, SnapshotId(id))
            .await
            .map_err(|e| internal("finding the snapshot", e))?
            .map(|s| SnapshotId(s.id))
            .ok_or_else(|| not_found(format!("no snapshot {id}")))?,
        (None, Some(udid)) => store::snapshots::newest_of(&client, caller.tenant, &udid)
            .await
            .map_err(|e| internal("finding the snapshot", e))?
            .ok_or_else(|| not_found(format!("no snapshot of device {udid}")))?,
        _ => return Err(bad_request("give exactly one of snapshot_id and from_device")),
    };
    let id = match store::restore_jobs::create(&mut client, caller.tenant, snapshot, target.as_str(), caller.user)
        .await
        .map_err(|e| internal("creating the restore job", e))?
    {
        Queued::Job(id) => id,
        Queued::Busy => {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("device {target} already has a restore job queued or running"),
            ));
        }
    };
    tracing::info!(user.id = %caller.user, restore.id = %id, snapshot.id = %snapshot, device.udid = %target, "restore job queued");
    let job = store::restore_jobs::get(&client, caller.tenant, id)
        .await
        .map_err(|e| internal("reading the restore job", e))?
        .ok_or_else(|| internal("reading the restore job", "it is gone"))?;
    // A restore puts an employee's data onto a phone: who asked for it is in the audit log.
    let actor = format!("user {}", caller.user);
    let event = store::audit::Event {
        actor_user: Some(caller.user),
        role: Some(caller.role.as_str()),
        udid: Some(&job.source_udid),
        snapshot: Some(snapshot.0),
        detail: json!({ "job": id, "snapshot": snapshot.0, "target": target.as_str() }),
        ..store::audit::Event::new(caller.tenant, &actor, "restore.create")
    };
    store::audit::record(&**client, &event).await.map_err(|e| internal("writing the audit log", e))?;
    Ok((StatusCode::CREATED, Json(json!(job))))
}

/// Restore jobs, newest first.
pub async fn list(State(app): State<Arc<App>>, caller: Caller) -> ApiResult {
    require(&caller, Role::Viewer)?;
    let jobs = store::restore_jobs::list(&*db(&app).await?, caller.tenant, 1000)
        .await
        .map_err(|e| internal("listing restore jobs", e))?;
    Ok(Json(json!({ "restores": jobs })))
}

pub async fn get(State(app): State<Arc<App>>, caller: Caller, Path(id): Path<String>) -> ApiResult {
    require(&caller, Role::Viewer)?;
    let id: uuid::Uuid = id.parse().map_err(|_| not_found(format!("no restore job {id}")))?;
    let job = store::restore_jobs::get(&*db(&app).await?, caller.tenant, id)
        .await
        .map_err(|e| internal("reading the restore job", e))?
        .ok_or_else(|| not_found(format!("no restore job {id}")))?;
    Ok(Json(json!(job)))
}
