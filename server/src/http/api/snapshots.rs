//! `/api/v1/snapshots/{id}`: a snapshot with its file listing by iOS domain and path,
//! read from its Manifest.db through the restore read path.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use lifeboat_shared::ids::SnapshotId;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ApiResult, db};
use crate::app::App;
use crate::http::caller::require;
use crate::http::error::{internal, not_found};
use crate::users::{Caller, Role};
use crate::{ios, restore, store};

#[derive(Debug, Deserialize)]
pub struct ListQuery {
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

pub async fn get(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    require(&caller, Role::Helpdesk)?;
    let id: SnapshotId = id.parse().map_err(|_| not_found(format!("no snapshot {id}")))?;
    let client = db(&app).await?;
    let row = store::snapshots::get(&client, caller.tenant, id)
        .await
        .map_err(|e| internal("finding a snapshot", e))?
        .ok_or_else(|| not_found(format!("no snapshot {id}")))?;
    let keys = app.tenant_keys(caller.tenant).await.map_err(|e| internal("loading tenant keys", e))?;
    let manifest = restore::read::manifest(&app.storage, &keys, id, &row.manifest_key)
        .await
        .map_err(|e| internal("opening a manifest", e))?;

    let mut files = match manifest.files.iter().find(|f| f.path == "Manifest.db") {
        Some(db_file) => {
            let bytes = restore::read::file(&client, &app.storage, &keys, db_file)
                .await
                .map_err(|e| internal("reading Manifest.db", e))?;
            let sizes: std::collections::HashMap<&str, u64> =
                manifest.files.iter().map(|f| (f.path.as_str(), f.size)).collect();
            let scratch = app.scratch.clone();
            let listed = tokio::task::spawn_blocking(move || scratch.with_sqlite(&bytes, ios::manifest_db_files))
                .await
                .map_err(|e| internal("reading Manifest.db", e))?
                .map_err(|e| internal("reading Manifest.db", e))?;
            listed
                .into_iter()
                .map(|f| ListedFile {
                    size: sizes.get(ios::backup_path(&f.file_id).as_str()).copied().unwrap_or(0),
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
        "udid": row.udid,
        "committed_at": row.committed_at,
        "file_count": row.file_count,
        "logical_bytes": row.logical_bytes,
        "ios_version": row.ios_version,
        "product_type": row.product_type,
        "files_total": total,
        "offset": offset,
        "files": page,
    })))
}
