//! A device's content through the API, as the console shows it: access given with a
//! reason (`POST /api/v1/devices/{udid}/access`), then a snapshot's contacts (JSON or
//! vCard), conversations, one thread, calls and single files. Help desk and up; each view
//! is in the audit log, with the reason, before the content is sent.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use lifeboat_shared::ids::SnapshotId;
use serde::Deserialize;
use serde_json::json;

use super::{ApiResult, db};
use crate::app::App;
use crate::http::caller::require;
use crate::http::error::{ApiError, bad_request, internal, not_found};
use crate::ios::preview::Datasets;
use crate::restore::export;
use crate::restore::preview::{self, PreviewError};
use crate::store;
use crate::store::console::Grant;
use crate::store::snapshots::SnapshotRow;
use crate::users::{Caller, Role};

#[derive(Debug, Deserialize)]
pub struct AccessRequest {
    reason: String,
}

/// `POST /api/v1/devices/{udid}/access` `{"reason"}`: 201 and the grant.
pub async fn grant(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(udid): Path<String>,
    body: Result<Json<AccessRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Helpdesk)?;
    let Json(req) = body.map_err(|e| bad_request(format!("expected {{\"reason\"}}: {e}")))?;
    let reason = req.reason.trim();
    if !(3..=200).contains(&reason.chars().count()) || reason.chars().any(char::is_control) {
        return Err(bad_request("give a reason of 3 to 200 characters, such as a ticket reference"));
    }
    let mut client = db(&app).await?;
    if !store::devices::exists(&**client, caller.tenant, &udid).await.map_err(|e| internal("finding a device", e))? {
        return Err(not_found(format!("no device {udid}")));
    }
    let minutes = (app.console.grant.as_secs() / 60).max(1) as i32;
    let id = uuid::Uuid::new_v4();
    let actor = format!("user {}", caller.user);
    let event = store::audit::Event {
        actor_user: Some(caller.user),
        role: Some(caller.role.as_str()),
        udid: Some(&udid),
        reason: Some(reason),
        detail: json!({ "grant": id, "minutes": minutes }),
        ..store::audit::Event::new(caller.tenant, &actor, "access.grant")
    };
    let g = store::console::grant(&mut client, id, caller.tenant, caller.user, &udid, reason, minutes, &event)
        .await
        .map_err(|e| internal("giving access", e))?;
    Ok((StatusCode::CREATED, Json(json!(g))).into_response())
}

/// The snapshot, if the caller holds a live grant for its device (403 otherwise, 404 for
/// a snapshot the tenant does not have); the view is audited first.
async fn open(
    app: &App,
    caller: &Caller,
    id: &str,
    action: &str,
    dataset: &str,
    object: Option<&str>,
) -> Result<(SnapshotRow, Grant), ApiError> {
    require(caller, Role::Helpdesk)?;
    let id: SnapshotId = id.parse().map_err(|_| not_found(format!("no snapshot {id}")))?;
    let client = db(app).await?;
    let s = store::snapshots::get(&client, caller.tenant, id)
        .await
        .map_err(|e| internal("finding a snapshot", e))?
        .ok_or_else(|| not_found(format!("no snapshot {id}")))?;
    let g = store::console::live_grant(&client, caller.tenant, caller.user, &s.udid)
        .await
        .map_err(|e| internal("checking access", e))?
        .ok_or_else(|| {
            ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "no access to this device's content: POST /api/v1/devices/{}/access with a reason first",
                    s.udid
                ),
            )
        })?;
    let actor = format!("user {}", caller.user);
    let event = store::audit::Event {
        actor_user: Some(caller.user),
        role: Some(caller.role.as_str()),
        udid: Some(&s.udid),
        snapshot: Some(s.id),
        dataset: Some(dataset),
        object,
        reason: Some(&g.reason),
        detail: json!({ "grant": g.id }),
        ..store::audit::Event::new(caller.tenant, &actor, action)
    };
    store::audit::record(&**client, &event).await.map_err(|e| internal("writing the audit log", e))?;
    Ok((s, g))
}

fn preview_error(e: PreviewError) -> ApiError {
    match e {
        PreviewError::NotFound(_) | PreviewError::NoFile(_) => not_found(e.to_string()),
        PreviewError::Read(m) => internal("reading the snapshot", m),
    }
}

async fn datasets(app: &App, caller: &Caller, s: &SnapshotRow) -> Result<Arc<Datasets>, ApiError> {
    preview::datasets(app, caller.tenant, SnapshotId(s.id)).await.map_err(preview_error)
}

pub async fn contacts(State(app): State<Arc<App>>, caller: Caller, Path(id): Path<String>) -> ApiResult {
    let (s, _) = open(&app, &caller, &id, "contacts.view", "contacts", None).await?;
    let d = datasets(&app, &caller, &s).await?;
    Ok(Json(json!({ "snapshot": s.id, "contacts": d.contacts })))
}

pub async fn contacts_vcard(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (s, _) = open(&app, &caller, &id, "contacts.export", "contacts", Some("vcard")).await?;
    let d = datasets(&app, &caller, &s).await?;
    Ok(([(header::CONTENT_TYPE, "text/vcard; charset=utf-8")], crate::ios::vcard::contacts(&d.contacts))
        .into_response())
}

pub async fn conversations(State(app): State<Arc<App>>, caller: Caller, Path(id): Path<String>) -> ApiResult {
    let (s, _) = open(&app, &caller, &id, "messages.list", "messages", None).await?;
    let d = datasets(&app, &caller, &s).await?;
    Ok(Json(json!({ "snapshot": s.id, "conversations": d.conversations })))
}

pub async fn thread(State(app): State<Arc<App>>, caller: Caller, Path((id, chat)): Path<(String, i64)>) -> ApiResult {
    let object = format!("chat {chat}");
    let (s, _) = open(&app, &caller, &id, "messages.view", "messages", Some(&object)).await?;
    let d = datasets(&app, &caller, &s).await?;
    let c =
        d.conversations.iter().find(|c| c.id == chat).ok_or_else(|| not_found(format!("no conversation {chat}")))?;
    Ok(Json(
        json!({ "snapshot": s.id, "conversation": c, "messages": d.messages.get(&chat).cloned().unwrap_or_default() }),
    ))
}

pub async fn calls(State(app): State<Arc<App>>, caller: Caller, Path(id): Path<String>) -> ApiResult {
    let (s, _) = open(&app, &caller, &id, "calls.view", "calls", None).await?;
    let d = datasets(&app, &caller, &s).await?;
    Ok(Json(json!({ "snapshot": s.id, "encrypted": s.encrypted, "calls": d.calls })))
}

pub async fn photos(State(app): State<Arc<App>>, caller: Caller, Path(id): Path<String>) -> ApiResult {
    let (s, _) = open(&app, &caller, &id, "photos.view", "photos", None).await?;
    let d = datasets(&app, &caller, &s).await?;
    Ok(Json(json!({ "snapshot": s.id, "photos": d.photos })))
}

/// `GET /api/v1/snapshots/{id}/photos.zip`: every original, named and dated as taken.
pub async fn photos_zip(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (s, _) = open(&app, &caller, &id, "photos.export", "photos", Some("zip")).await?;
    let d = datasets(&app, &caller, &s).await?;
    let photos: Vec<_> = d.photos.iter().collect();
    let entries = export::photo_entries(&app, caller.tenant, SnapshotId(s.id), &photos).await.map_err(preview_error)?;
    let stream = export::zip(app.clone(), caller.tenant, entries);
    Ok(crate::console::zip_response(stream, &format!("photos-{}.zip", s.udid)))
}

/// `GET /api/v1/snapshots/{id}/backup.zip`: the snapshot as a Finder backup folder, decrypted.
pub async fn backup_zip(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (s, _) = open(&app, &caller, &id, "snapshot.export", "snapshot", Some("finder backup zip")).await?;
    let entries =
        export::finder_backup(&app, caller.tenant, SnapshotId(s.id), s.encrypted).await.map_err(preview_error)?;
    let stream = export::zip(app.clone(), caller.tenant, entries);
    Ok(crate::console::zip_response(stream, &format!("{}-{}.zip", s.udid, s.id)))
}

#[derive(Debug, Deserialize)]
pub struct FileQuery {
    domain: String,
    path: String,
}

pub async fn file(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let object = format!("{}/{}", q.domain, q.path);
    let (s, _) = open(&app, &caller, &id, "file.download", "files", Some(&object)).await?;
    let bytes =
        preview::file(&app, caller.tenant, SnapshotId(s.id), &q.domain, &q.path).await.map_err(preview_error)?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}
