//! Exports from the console, streamed as ZIP archives: the camera roll's originals (or a
//! selection) under their original names and dates, and the whole snapshot as a Finder
//! backup folder. Each is audited before its first byte.

use std::collections::HashMap;
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
use crate::ios;
use crate::restore::{export, preview};

fn zip_response(stream: export::Stream, name: &str) -> Response {
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

/// A name from the phone made safe to extract: its last component, without control
/// characters or a leading dot, never empty.
fn plain_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let clean: String = base.chars().filter(|c| !c.is_control()).collect();
    let clean = clean.trim_start_matches('.').trim();
    if clean.is_empty() { "photo".to_owned() } else { clean.to_owned() }
}

/// `name` made safe, or `name (2).ext`, … when an earlier entry took it (case-insensitively,
/// as Finder and Windows compare), every name given out remembered.
fn unique(taken: &mut std::collections::HashSet<String>, name: &str) -> String {
    let name = plain_name(name);
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem.to_owned(), format!(".{ext}")),
        _ => (name.clone(), String::new()),
    };
    let mut candidate = name.clone();
    let mut n = 1;
    while !taken.insert(candidate.to_lowercase()) {
        n += 1;
        candidate = format!("{stem} ({n}){ext}");
    }
    candidate
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
    let manifest =
        preview::manifest(&app, v.caller.tenant, SnapshotId(s.id)).await.map_err(|e| preview_error(e, &v))?;
    let by_path: HashMap<&str, &lifeboat_shared::manifest::FileEntry> =
        manifest.files.iter().map(|f| (f.path.as_str(), f)).collect();
    let mut taken = std::collections::HashSet::new();
    let mut entries = Vec::new();
    for p in d.photos.iter().filter(|p| chosen.as_ref().is_none_or(|c| c.contains(&p.id))) {
        let stored = ios::backup_path(&ios::file_id(&p.domain, &p.path));
        let Some(f) = by_path.get(stored.as_str()) else { continue };
        entries.push(export::Entry {
            name: unique(&mut taken, &p.name),
            file: (*f).clone(),
            mtime: p.taken as i64,
            replace: None,
        });
    }
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
    let manifest = preview::manifest(&app, v.caller.tenant, id).await.map_err(|e| preview_error(e, &v))?;
    // Plaintext files under a Manifest.plist that says encrypted open nowhere: say what it is.
    let plist = if s.encrypted {
        let bytes = preview::file_of(&app, v.caller.tenant, &manifest, "Manifest.plist")
            .await
            .map_err(|e| preview_error(e, &v))?;
        Some(
            lifeboat_shared::ios_backup::plist_without_encryption(&bytes)
                .map_err(|e| ConsoleError::internal("reading Manifest.plist", e))?,
        )
    } else {
        None
    };
    audit(&app, &v, &s, &g, "snapshot.export", "snapshot", Some("finder backup zip")).await?;
    let entries = export::finder_backup(&manifest, plist);
    Ok(zip_response(export::zip(app.clone(), v.caller.tenant, entries), &format!("{}-{}.zip", s.udid, s.id)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_in_an_archive_are_unique_and_stay_in_their_folder() {
        let mut taken = std::collections::HashSet::new();
        assert_eq!(super::unique(&mut taken, "IMG_0001.JPG"), "IMG_0001.JPG");
        assert_eq!(super::unique(&mut taken, "img_0001.jpg"), "img_0001 (2).jpg");
        assert_eq!(super::unique(&mut taken, "IMG_0001 (3).JPG"), "IMG_0001 (3).JPG");
        assert_eq!(super::unique(&mut taken, "IMG_0001.JPG"), "IMG_0001 (4).JPG", "a name given out stays taken");
        assert_eq!(super::unique(&mut taken, "README"), "README");
        assert_eq!(super::unique(&mut taken, "../../etc/passwd"), "passwd");
        assert_eq!(super::unique(&mut taken, "C:\\x\\..\\a\nb.jpg"), "ab.jpg");
        assert_eq!(super::unique(&mut taken, ".."), "photo");
    }
}
