//! `/api/v1/devices`: the tenant's iPhones, each one's snapshots, and its escrowed backup
//! password (admins only; every reveal audited).

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use lifeboat_shared::Secret;
use serde::Deserialize;
use serde_json::json;

use super::{ApiResult, db};
use crate::app::App;
use crate::escrow::{self, Actor, EscrowError};
use crate::http::caller::require;
use crate::http::error::{ApiError, bad_request, internal, not_found};
use crate::store;
use crate::users::{Caller, Role};

/// Devices with their state and last successful backup.
pub async fn list(State(app): State<Arc<App>>, caller: Caller) -> ApiResult {
    require(&caller, Role::Viewer)?;
    let devices =
        store::devices::list(&*db(&app).await?, caller.tenant).await.map_err(|e| internal("listing devices", e))?;
    Ok(Json(json!({ "devices": devices })))
}

pub async fn snapshots(State(app): State<Arc<App>>, caller: Caller, Path(udid): Path<String>) -> ApiResult {
    require(&caller, Role::Viewer)?;
    let client = db(&app).await?;
    if !store::devices::exists(&**client, caller.tenant, &udid).await.map_err(|e| internal("finding a device", e))? {
        return Err(not_found(format!("no device {udid}")));
    }
    let list = store::snapshots::of_device(&client, caller.tenant, &udid)
        .await
        .map_err(|e| internal("listing snapshots", e))?;
    Ok(Json(json!({ "udid": udid, "snapshots": list })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPassword {
    password: Secret<String>,
}

fn escrow_error(e: EscrowError) -> ApiError {
    match e {
        EscrowError::BadPassword(_) => bad_request(e.to_string()),
        EscrowError::NoDevice(_) | EscrowError::NotEscrowed(_) => not_found(e.to_string()),
        EscrowError::WrongPassword { .. } => ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        e => internal("the backup password escrow", e),
    }
}

/// `PUT /api/v1/devices/{udid}/backup-password`: an admin enters the password a phone
/// already has (`{"password": "…"}`); the agent uses it from the next backup on. It is
/// checked first against the keybag of the phone's last backup an agent could not open:
/// a wrong one is refused (422) and nothing is stored; `verified` says whether there was
/// a keybag to check it against.
pub async fn set_backup_password(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(udid): Path<String>,
    body: Result<Json<NewPassword>, JsonRejection>,
) -> ApiResult {
    require(&caller, Role::Admin)?;
    let Json(req) = body.map_err(|e| bad_request(e.body_text()))?;
    let keys = app.tenant_keys(caller.tenant).await.map_err(|e| internal("opening the tenant's keys", e))?;
    let mut client = db(&app).await?;
    let checked = escrow::check(&client, &keys, &udid, &req.password).await.map_err(escrow_error)?;
    let set_at =
        escrow::set(&mut client, &keys, &udid, &req.password, Actor::User(caller.user)).await.map_err(escrow_error)?;
    let verified = matches!(checked, escrow::Checked::Verified { .. });
    Ok(Json(json!({ "udid": udid, "source": "admin", "set_at": set_at, "verified": verified })))
}

/// `GET /api/v1/devices/{udid}/backup-password`: reveals the escrowed password to an
/// admin, audited before it is sent; never cached.
pub async fn reveal_backup_password(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(udid): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    require(&caller, Role::Admin)?;
    let keys = app.tenant_keys(caller.tenant).await.map_err(|e| internal("opening the tenant's keys", e))?;
    let mut client = db(&app).await?;
    let e = escrow::reveal(&mut client, &keys, &udid, Actor::User(caller.user)).await.map_err(escrow_error)?;
    let body = json!({ "udid": udid, "password": e.password.expose(), "source": e.source, "set_at": e.set_at });
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)))
}
