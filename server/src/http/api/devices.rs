//! `/api/v1/devices`: the tenant's iPhones, and each one's snapshots.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde_json::json;

use super::{ApiResult, db};
use crate::app::App;
use crate::http::caller::require;
use crate::http::error::{internal, not_found};
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
    if !store::devices::exists(&client, caller.tenant, &udid).await.map_err(|e| internal("finding a device", e))? {
        return Err(not_found(format!("no device {udid}")));
    }
    let list = store::snapshots::of_device(&client, caller.tenant, &udid)
        .await
        .map_err(|e| internal("listing snapshots", e))?;
    Ok(Json(json!({ "udid": udid, "snapshots": list })))
}
