//! The HTTP API for admins, the help desk and scripts: `/api/v1/…`, JSON, authorised by
//! `Authorization: Bearer <credential>` (see `users`), every answer scoped to the
//! caller's tenant. Unknown or revoked credentials get 401; a role without the right
//! gets 403; another tenant's objects are 404, exactly like objects that do not exist.
//! One module per resource.

mod content;
mod devices;
mod fleet;
mod restores;
mod snapshots;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use serde_json::Value;

use super::error::{ApiError, internal};
use crate::app::App;

pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/api/v1/devices", get(devices::list))
        .route("/api/v1/devices/{udid}/snapshots", get(devices::snapshots))
        .route(
            "/api/v1/devices/{udid}/backup-password",
            get(devices::reveal_backup_password).put(devices::set_backup_password),
        )
        .route("/api/v1/devices/{udid}/access", axum::routing::post(content::grant))
        .route("/api/v1/snapshots/{id}/contacts", get(content::contacts))
        .route("/api/v1/snapshots/{id}/contacts.vcf", get(content::contacts_vcard))
        .route("/api/v1/snapshots/{id}/messages", get(content::conversations))
        .route("/api/v1/snapshots/{id}/messages/{chat}", get(content::thread))
        .route("/api/v1/snapshots/{id}/calls", get(content::calls))
        .route("/api/v1/snapshots/{id}/photos", get(content::photos))
        .route("/api/v1/snapshots/{id}/photos.zip", get(content::photos_zip))
        .route("/api/v1/snapshots/{id}/backup.zip", get(content::backup_zip))
        .route("/api/v1/snapshots/{id}/file", get(content::file))
        .route("/api/v1/audit", get(fleet::audit))
        .route("/api/v1/snapshots/{id}", get(snapshots::get))
        .route("/api/v1/runs", get(fleet::runs))
        .route("/api/v1/agents", get(fleet::agents))
        .route("/api/v1/restore-tests", get(fleet::restore_tests))
        .route("/api/v1/restores", get(restores::list).post(restores::create))
        .route("/api/v1/restores/{id}", get(restores::get))
}

type ApiResult = Result<axum::Json<Value>, ApiError>;

async fn db(app: &App) -> Result<deadpool_postgres::Object, ApiError> {
    app.db.get().await.map_err(|e| internal("getting a database connection", e))
}
