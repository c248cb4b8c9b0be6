//! `/api/v1/runs`, `/api/v1/agents`, `/api/v1/restore-tests`: how the fleet's backups,
//! workstations and restore tests are doing.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use lifeboat_shared::ids::SnapshotId;
use serde::Deserialize;
use serde_json::json;

use super::{ApiResult, db};
use crate::app::App;
use crate::http::caller::require;
use crate::http::error::{internal, not_found};
use crate::store;
use crate::users::{Caller, Role};

#[derive(Debug, Deserialize)]
pub struct RunsQuery {
    status: Option<String>,
    udid: Option<String>,
    limit: Option<i64>,
}

/// Backup runs, newest first, with their failure reasons.
pub async fn runs(State(app): State<Arc<App>>, caller: Caller, Query(q): Query<RunsQuery>) -> ApiResult {
    require(&caller, Role::Viewer)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let runs = store::runs::list(&*db(&app).await?, caller.tenant, q.status.as_deref(), q.udid.as_deref(), limit)
        .await
        .map_err(|e| internal("listing runs", e))?;
    Ok(Json(json!({ "runs": runs })))
}

pub async fn agents(State(app): State<Arc<App>>, caller: Caller) -> ApiResult {
    require(&caller, Role::Viewer)?;
    let agents =
        store::agents::list(&*db(&app).await?, caller.tenant).await.map_err(|e| internal("listing agents", e))?;
    Ok(Json(json!({ "agents": agents })))
}

#[derive(Debug, Deserialize)]
pub struct RestoreTestsQuery {
    passed: Option<bool>,
    udid: Option<String>,
    snapshot: Option<String>,
    limit: Option<i64>,
}

/// Restore-test results, newest first, with what the backup held beside the previous
/// snapshot's test of the same device.
pub async fn restore_tests(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(q): Query<RestoreTestsQuery>,
) -> ApiResult {
    require(&caller, Role::Viewer)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let snapshot = match &q.snapshot {
        Some(s) => Some(s.parse::<SnapshotId>().map_err(|_| not_found(format!("no snapshot {s}")))?),
        None => None,
    };
    let list =
        store::restore_tests::list(&*db(&app).await?, caller.tenant, q.passed, q.udid.as_deref(), snapshot, limit)
            .await
            .map_err(|e| internal("listing restore tests", e))?;
    Ok(Json(json!({ "restore_tests": list })))
}

#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    limit: Option<i64>,
    /// Events older than this event id (the last `id` of the previous page).
    before: Option<i64>,
    /// Only this device's events (an owner's access history, on request).
    udid: Option<String>,
    action: Option<String>,
}

/// The audit log, newest first: who revealed a backup password, who looked at what.
/// Admins only.
pub async fn audit(State(app): State<Arc<App>>, caller: Caller, Query(q): Query<AuditQuery>) -> ApiResult {
    require(&caller, Role::Admin)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let filter = store::audit::Filter {
        before: q.before,
        udid: q.udid.as_deref(),
        action: q.action.as_deref(),
        ..Default::default()
    };
    let events = store::audit::list(&**db(&app).await?, caller.tenant, limit, &filter)
        .await
        .map_err(|e| internal("listing the audit log", e))?;
    Ok(Json(json!({ "events": events })))
}
