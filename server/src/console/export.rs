//! Exports from the console, streamed as ZIP archives: the camera roll's originals (or a
//! selection) under their original names and dates, and the whole snapshot as a Finder
//! backup folder. Each is audited before its first byte.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use lifeboat_shared::ids::SnapshotId;
use serde::Deserialize;

use super::content::{Access, access, audit, datasets, preview_error};
use super::pages::parse_snapshot;
use super::{ConsoleError, Viewer};
use crate::app::App;
use crate::restore::export;

/// A streamed ZIP as a download named `name` (the console's exports and the API's).
pub fn zip_response(stream: export::Stream, name: &str) -> Response {
    let body = Body::from_stream(futures_util::stream::unfold(stream, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/zip"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}

#[derive(Debug, Deserialize)]
pub struct PhotosQuery {
    /// A selection: `ZASSET.Z_PK`s, comma-separated. All when absent.
    ids: Option<String>,
}

/// `/snapshots/{id}/photos.zip[?ids=1,2]`: originals, named as taken, dated when taken.
pub async fn photos(
    State(app): State<Arc<App>>,
    v: Viewer,
    Path(id): Path<String>,
    Query(q): Query<PhotosQuery>,
) -> Result<Response, ConsoleError> {
    let id = parse_snapshot(&id, &v)?;
    let (s, g) = match access(&app, &v, id, &format!("/snapshots/{id}/photos")).await? {
        Access::Open(s, g) => (s, g),
        Access::Ask(page) => return Ok(page),
    };
    let chosen: Option<Vec<i64>> = match &q.ids {
        Some(list) => Some(
            list.split(',')
                .filter(|x| !x.trim().is_empty())
                .map(|x| {
                    x.trim().parse().map_err(|_| {
                        ConsoleError::status(
                            axum::http::StatusCode::BAD_REQUEST,
                            format!("ids: {x:?} is not a photo id"),
                        )
                        .framed(&v)
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        None => None,
    };
    let d = datasets(&app, &v, &s).await?;
    let photos: Vec<_> = d.photos.iter().filter(|p| chosen.as_ref().is_none_or(|c| c.contains(&p.id))).collect();
    let entries = export::photo_entries(&app, v.caller.tenant, SnapshotId(s.id), &photos)
        .await
        .map_err(|e| preview_error(e, &v))?;
    let object = match &chosen {
        Some(ids) => {
            format!("zip of {} photos: {}", entries.len(), ids.iter().map(i64::to_string).collect::<Vec<_>>().join(","))
        }
        None => format!("zip of {} photos", entries.len()),
    };
    audit(&app, &v, &s, &g, "photos.export", "photos", Some(&object)).await?;
    Ok(zip_response(export::zip(app.clone(), v.caller.tenant, entries), &format!("photos-{}.zip", s.udid)))
}

/// `/snapshots/{id}/backup.zip`: the snapshot as a Finder backup folder, decrypted.
pub async fn backup(State(app): State<Arc<App>>, v: Viewer, Path(id): Path<String>) -> Result<Response, ConsoleError> {
    let id = parse_snapshot(&id, &v)?;
    let (s, g) = match access(&app, &v, id, &format!("/snapshots/{id}")).await? {
        Access::Open(s, g) => (s, g),
        Access::Ask(page) => return Ok(page),
    };
    let entries =
        export::finder_backup(&app, v.caller.tenant, id, s.encrypted).await.map_err(|e| preview_error(e, &v))?;
    audit(&app, &v, &s, &g, "snapshot.export", "snapshot", Some("finder backup zip")).await?;
    Ok(zip_response(export::zip(app.clone(), v.caller.tenant, entries), &format!("{}-{}.zip", s.udid, s.id)))
}
