//! A device's content, for the help desk: access given with a reason, then the
//! snapshot's contacts (and their vCard export), conversations and threads, call history,
//! the camera roll, and single files. Each view is in the audit log — who, role, reason, snapshot,
//! dataset, object — before its content is sent.

use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use lifeboat_shared::ids::SnapshotId;
use serde::Deserialize;

use super::pages::parse_snapshot;
use super::{ConsoleError, Frame, Viewer, html, urlencode, utc};
use crate::app::App;
use crate::ios::preview::{Attachment, Call, Contact, Conversation, Datasets, Message, Photo};
use crate::restore::preview::{self, PreviewError};
use crate::store;
use crate::store::console::Grant;
use crate::store::snapshots::SnapshotRow;
use crate::users::Role;

#[derive(Template)]
#[template(path = "access.html")]
struct AccessPage {
    frame: Frame,
    udid: String,
    device_name: String,
    next: String,
    minutes: u64,
}

/// The snapshot, if the viewer may open its content now; else the page that asks why.
pub(super) enum Access {
    Open(SnapshotRow, Grant),
    Ask(Response),
}

pub(super) async fn access(app: &App, v: &Viewer, id: SnapshotId, next: &str) -> Result<Access, ConsoleError> {
    v.require(Role::Helpdesk)?;
    let client = app.db.get().await.map_err(|e| ConsoleError::internal("getting a database connection", e))?;
    let s = store::snapshots::get(&client, v.caller.tenant, id)
        .await
        .map_err(|e| ConsoleError::internal("finding a snapshot", e))?
        .ok_or_else(|| ConsoleError::not_found(format!("no snapshot {id}")).framed(v))?;
    let grant = store::console::live_grant(&client, v.caller.tenant, v.caller.user, &s.udid)
        .await
        .map_err(|e| ConsoleError::internal("checking access", e))?;
    match grant {
        Some(g) => Ok(Access::Open(s, g)),
        None => {
            let d = store::devices::get(&client, v.caller.tenant, &s.udid)
                .await
                .map_err(|e| ConsoleError::internal("finding a device", e))?;
            let page = AccessPage {
                frame: Frame::of(v),
                device_name: d.and_then(|d| d.name).unwrap_or_else(|| s.udid.clone()),
                udid: s.udid,
                next: next.to_owned(),
                minutes: app.console.grant.as_secs() / 60,
            };
            Ok(Access::Ask(html(&page)?))
        }
    }
}

/// Records that `v` looked at `dataset` (`object`, if one item) of the snapshot.
pub(super) async fn audit(
    app: &App,
    v: &Viewer,
    s: &SnapshotRow,
    g: &Grant,
    action: &str,
    dataset: &str,
    object: Option<&str>,
) -> Result<(), ConsoleError> {
    let client = app.db.get().await.map_err(|e| ConsoleError::internal("getting a database connection", e))?;
    let actor = v.actor();
    let event = store::audit::Event {
        udid: Some(&s.udid),
        snapshot: Some(s.id),
        dataset: Some(dataset),
        object,
        reason: Some(&g.reason),
        detail: serde_json::json!({ "grant": g.id }),
        ..v.event(&actor, action)
    };
    store::audit::record(&**client, &event).await.map_err(|e| ConsoleError::internal("writing the audit log", e))?;
    Ok(())
}

pub(super) async fn datasets(app: &App, v: &Viewer, s: &SnapshotRow) -> Result<Arc<Datasets>, ConsoleError> {
    preview::datasets(app, v.caller.tenant, SnapshotId(s.id)).await.map_err(|e| preview_error(e, v))
}

pub(super) fn preview_error(e: PreviewError, v: &Viewer) -> ConsoleError {
    match e {
        PreviewError::NotFound(_) | PreviewError::NoFile(_) => ConsoleError::not_found(e.to_string()).framed(v),
        PreviewError::Read(m) => ConsoleError::internal("reading the snapshot", m).framed(v),
    }
}

#[derive(Debug, Deserialize)]
pub struct GrantForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
    next: Option<String>,
}

/// `POST /devices/{udid}/access`: a help-desk user gives a reason and may open the
/// device's content for a while.
pub async fn grant(
    State(app): State<Arc<App>>,
    v: Viewer,
    Path(udid): Path<String>,
    Form(form): Form<GrantForm>,
) -> Result<Response, ConsoleError> {
    v.check_csrf(&form.csrf)?;
    v.require(Role::Helpdesk)?;
    let reason = form.reason.trim();
    if !(3..=200).contains(&reason.chars().count()) || reason.chars().any(char::is_control) {
        return Err(ConsoleError::status(
            axum::http::StatusCode::BAD_REQUEST,
            "give a reason of 3 to 200 characters, such as a ticket reference",
        )
        .framed(&v));
    }
    let mut client = app.db.get().await.map_err(|e| ConsoleError::internal("getting a database connection", e))?;
    if !store::devices::exists(&**client, v.caller.tenant, &udid)
        .await
        .map_err(|e| ConsoleError::internal("finding a device", e))?
    {
        return Err(ConsoleError::not_found(format!("no device {udid}")).framed(&v));
    }
    let minutes = (app.console.grant.as_secs() / 60).max(1) as i32;
    let id = uuid::Uuid::new_v4();
    let actor = v.actor();
    let event = store::audit::Event {
        udid: Some(&udid),
        reason: Some(reason),
        detail: serde_json::json!({ "grant": id, "minutes": minutes }),
        ..v.event(&actor, "access.grant")
    };
    store::console::grant(&mut client, id, v.caller.tenant, v.caller.user, &udid, reason, minutes, &event)
        .await
        .map_err(|e| ConsoleError::internal("giving access", e))?;
    Ok(Redirect::to(&super::session::safe_next(form.next.as_deref())).into_response())
}

#[derive(Template)]
#[template(path = "contacts.html")]
struct ContactsPage<'a> {
    frame: Frame,
    s: SnapshotRow,
    reason: String,
    contacts: &'a [Contact],
}

pub async fn contacts(
    State(app): State<Arc<App>>,
    v: Viewer,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    let id = parse_snapshot(&id, &v)?;
    let (s, g) = match access(&app, &v, id, &format!("/snapshots/{id}/contacts")).await? {
        Access::Open(s, g) => (s, g),
        Access::Ask(page) => return Ok(page),
    };
    let d = datasets(&app, &v, &s).await?;
    audit(&app, &v, &s, &g, "contacts.view", "contacts", None).await?;
    html(&ContactsPage { frame: Frame::of(&v), reason: g.reason, s, contacts: &d.contacts })
}

/// `contacts.vcf`: every contact as vCard 4.0 (RFC 6350).
pub async fn contacts_vcard(
    State(app): State<Arc<App>>,
    v: Viewer,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    let id = parse_snapshot(&id, &v)?;
    let (s, g) = match access(&app, &v, id, &format!("/snapshots/{id}/contacts")).await? {
        Access::Open(s, g) => (s, g),
        Access::Ask(page) => return Ok(page),
    };
    let d = datasets(&app, &v, &s).await?;
    audit(&app, &v, &s, &g, "contacts.export", "contacts", Some("vcard")).await?;
    let body = crate::ios::vcard::contacts(&d.contacts);
    Ok(as_file(body.into_bytes(), "text/vcard; charset=utf-8", &format!("contacts-{}.vcf", s.udid), false))
}

struct ConversationLine<'a> {
    c: &'a Conversation,
    last: String,
}

#[derive(Template)]
#[template(path = "conversations.html")]
struct ConversationsPage<'a> {
    frame: Frame,
    s: SnapshotRow,
    reason: String,
    conversations: Vec<ConversationLine<'a>>,
}

pub async fn conversations(
    State(app): State<Arc<App>>,
    v: Viewer,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    let id = parse_snapshot(&id, &v)?;
    let (s, g) = match access(&app, &v, id, &format!("/snapshots/{id}/messages")).await? {
        Access::Open(s, g) => (s, g),
        Access::Ask(page) => return Ok(page),
    };
    let d = datasets(&app, &v, &s).await?;
    audit(&app, &v, &s, &g, "messages.list", "messages", None).await?;
    let conversations =
        d.conversations.iter().map(|c| ConversationLine { c, last: c.last_at.map(utc).unwrap_or_default() }).collect();
    html(&ConversationsPage { frame: Frame::of(&v), reason: g.reason, s, conversations })
}

struct MessageLine<'a> {
    m: &'a Message,
    at: String,
    attachments: Vec<(&'a Attachment, String, bool)>,
}

#[derive(Template)]
#[template(path = "thread.html")]
struct ThreadPage<'a> {
    frame: Frame,
    s: SnapshotRow,
    reason: String,
    c: &'a Conversation,
    messages: Vec<MessageLine<'a>>,
}

fn file_link(snapshot: uuid::Uuid, domain: &str, path: &str, inline: bool) -> String {
    format!(
        "/snapshots/{snapshot}/file?domain={}&path={}{}",
        urlencode(domain),
        urlencode(path),
        if inline { "&inline=1" } else { "" }
    )
}

fn inline_image(mime: Option<&str>) -> bool {
    matches!(mime, Some("image/jpeg" | "image/png" | "image/gif"))
}

pub async fn thread(
    State(app): State<Arc<App>>,
    v: Viewer,
    Path((id, chat)): Path<(String, String)>,
) -> Result<Response, ConsoleError> {
    let id = parse_snapshot(&id, &v)?;
    let (s, g) = match access(&app, &v, id, &format!("/snapshots/{id}/messages/{chat}")).await? {
        Access::Open(s, g) => (s, g),
        Access::Ask(page) => return Ok(page),
    };
    let d = datasets(&app, &v, &s).await?;
    let no_chat = || ConsoleError::not_found(format!("no conversation {chat} in this snapshot")).framed(&v);
    let chat_id: i64 = chat.parse().map_err(|_| no_chat())?;
    let c = d.conversations.iter().find(|c| c.id == chat_id).ok_or_else(no_chat)?;
    audit(&app, &v, &s, &g, "messages.view", "messages", Some(&format!("chat {chat_id}"))).await?;
    let messages = d
        .messages
        .get(&chat_id)
        .map(|list| {
            list.iter()
                .map(|m| MessageLine {
                    m,
                    at: utc(m.at),
                    attachments: m
                        .attachments
                        .iter()
                        .map(|a| {
                            let image = inline_image(a.mime_type.as_deref());
                            (a, file_link(s.id, &a.domain, &a.path, image), image)
                        })
                        .collect(),
                })
                .collect()
        })
        .unwrap_or_default();
    html(&ThreadPage { frame: Frame::of(&v), reason: g.reason, s, c, messages })
}

struct CallLine<'a> {
    c: &'a Call,
    at: String,
    duration: String,
}

#[derive(Template)]
#[template(path = "calls.html")]
struct CallsPage<'a> {
    frame: Frame,
    s: SnapshotRow,
    reason: String,
    calls: Vec<CallLine<'a>>,
}

pub async fn calls(State(app): State<Arc<App>>, v: Viewer, Path(id): Path<String>) -> Result<Response, ConsoleError> {
    let id = parse_snapshot(&id, &v)?;
    let (s, g) = match access(&app, &v, id, &format!("/snapshots/{id}/calls")).await? {
        Access::Open(s, g) => (s, g),
        Access::Ask(page) => return Ok(page),
    };
    let d = datasets(&app, &v, &s).await?;
    audit(&app, &v, &s, &g, "calls.view", "calls", None).await?;
    let calls = d
        .calls
        .iter()
        .map(|c| {
            let secs = c.duration_secs.round() as u64;
            CallLine { c, at: utc(c.at), duration: format!("{}:{:02}", secs / 60, secs % 60) }
        })
        .collect();
    html(&CallsPage { frame: Frame::of(&v), reason: g.reason, s, calls })
}

struct PhotoTile<'a> {
    p: &'a Photo,
    original: String,
    /// Shown as it is (JPEG, PNG); HEIC and videos are listed with their download.
    inline: Option<String>,
    taken: String,
}

#[derive(Template)]
#[template(path = "photos.html")]
struct PhotosPage<'a> {
    frame: Frame,
    s: SnapshotRow,
    reason: String,
    tiles: Vec<PhotoTile<'a>>,
    total: usize,
    page: usize,
    pages: usize,
}

#[derive(Debug, Deserialize)]
pub struct PageQuery {
    page: Option<usize>,
}

const PHOTOS_PER_PAGE: usize = 60;

/// `/snapshots/{id}/photos`: the camera roll, newest first, a page at a time.
pub async fn photos(
    State(app): State<Arc<App>>,
    v: Viewer,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Result<Response, ConsoleError> {
    let id = parse_snapshot(&id, &v)?;
    let (s, g) = match access(&app, &v, id, &format!("/snapshots/{id}/photos")).await? {
        Access::Open(s, g) => (s, g),
        Access::Ask(page) => return Ok(page),
    };
    let d = datasets(&app, &v, &s).await?;
    let total = d.photos.len();
    let pages = total.div_ceil(PHOTOS_PER_PAGE).max(1);
    let page = q.page.unwrap_or(1).clamp(1, pages);
    audit(&app, &v, &s, &g, "photos.view", "photos", Some(&format!("page {page}"))).await?;
    let tiles = d
        .photos
        .iter()
        .skip((page - 1) * PHOTOS_PER_PAGE)
        .take(PHOTOS_PER_PAGE)
        .map(|p| PhotoTile {
            original: file_link(s.id, &p.domain, &p.path, false),
            inline: p.browser_image().then(|| file_link(s.id, &p.domain, &p.path, true)),
            taken: utc(p.taken),
            p,
        })
        .collect();
    html(&PhotosPage { frame: Frame::of(&v), reason: g.reason, s, tiles, total, page, pages })
}

#[derive(Debug, Deserialize)]
pub struct SearchQuery {
    #[serde(default)]
    q: String,
}

/// What a search of one snapshot found, by dataset.
struct Found<'a> {
    contacts: Vec<&'a Contact>,
    messages: Vec<(&'a Conversation, &'a Message, String)>,
    calls: Vec<(&'a Call, String)>,
    photos: Vec<(&'a Photo, String)>,
}

/// At most this many hits per dataset.
const SEARCH_HITS: usize = 200;

fn search_in<'a>(d: &'a Datasets, needle: &str) -> Found<'a> {
    let has = |s: &str| s.to_lowercase().contains(needle);
    let contacts = d
        .contacts
        .iter()
        .filter(|c| {
            has(&c.display_name())
                || c.organization.as_deref().is_some_and(has)
                || c.phones.iter().chain(&c.emails).chain(&c.addresses).any(|v| has(&v.value))
        })
        .take(SEARCH_HITS)
        .collect();
    let mut messages = Vec::new();
    for c in &d.conversations {
        for m in d.messages.get(&c.id).into_iter().flatten() {
            if messages.len() < SEARCH_HITS && (has(&m.text) || m.attachments.iter().any(|a| has(&a.name))) {
                messages.push((c, m, utc(m.at)));
            }
        }
    }
    let calls = d
        .calls
        .iter()
        .filter(|c| has(&c.address) || c.name.as_deref().is_some_and(has))
        .take(SEARCH_HITS)
        .map(|c| (c, utc(c.at)))
        .collect();
    let photos =
        d.photos.iter().filter(|p| has(&p.name) || has(&p.path)).take(SEARCH_HITS).map(|p| (p, utc(p.taken))).collect();
    Found { contacts, messages, calls, photos }
}

#[derive(Template)]
#[template(path = "search.html")]
struct SearchPage<'a> {
    frame: Frame,
    s: SnapshotRow,
    reason: String,
    q: String,
    found: Option<Found<'a>>,
}

/// `/snapshots/{id}/search?q=`: contacts, messages, calls and photos of one snapshot that
/// mention the words. The query is in the audit log; what it found is not.
pub async fn search(
    State(app): State<Arc<App>>,
    v: Viewer,
    Path(id): Path<String>,
    Query(q): Query<SearchQuery>,
) -> Result<Response, ConsoleError> {
    let id = parse_snapshot(&id, &v)?;
    let next = format!("/snapshots/{id}/search?q={}", urlencode(&q.q));
    let (s, g) = match access(&app, &v, id, &next).await? {
        Access::Open(s, g) => (s, g),
        Access::Ask(page) => return Ok(page),
    };
    let needle = q.q.trim().to_lowercase();
    if needle.chars().count() < 2 {
        return html(&SearchPage { frame: Frame::of(&v), reason: g.reason, s, q: q.q, found: None });
    }
    let d = datasets(&app, &v, &s).await?;
    audit(&app, &v, &s, &g, "snapshot.search", "all", Some(&format!("query {:?}", q.q.trim()))).await?;
    let found = search_in(&d, &needle);
    html(&SearchPage { frame: Frame::of(&v), reason: g.reason, s, q: q.q, found: Some(found) })
}

#[derive(Debug, Deserialize)]
pub struct FileQuery {
    domain: String,
    path: String,
    inline: Option<u8>,
}

/// Bytes as a download (or, for a plain image, shown in the page).
fn as_file(bytes: Vec<u8>, content_type: &str, name: &str, inline: bool) -> Response {
    let ascii: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    let disposition = format!(
        "{}; filename=\"{ascii}\"; filename*=UTF-8''{}",
        if inline { "inline" } else { "attachment" },
        urlencode(name)
    );
    let mut resp = bytes.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(d) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, d);
    }
    resp
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).as_deref() {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("heic") => "image/heic",
        Some("mov") => "video/quicktime",
        Some("mp4") => "video/mp4",
        _ => "application/octet-stream",
    }
}

/// `/snapshots/{id}/file?domain=D&path=P`: one file of the backup, as the phone named it.
pub async fn download_file(app: &App, v: &Viewer, id: SnapshotId, q: &FileQuery) -> Result<Response, ConsoleError> {
    let next = format!("/snapshots/{id}");
    let (s, g) = match access(app, v, id, &next).await? {
        Access::Open(s, g) => (s, g),
        Access::Ask(page) => return Ok(page),
    };
    let object = format!("{}/{}", q.domain, q.path);
    let ty = content_type(&q.path);
    let inline = q.inline == Some(1) && inline_image(Some(ty));
    audit(app, v, &s, &g, if inline { "file.view" } else { "file.download" }, "files", Some(&object)).await?;
    let bytes = preview::file(app, v.caller.tenant, id, &q.domain, &q.path).await.map_err(|e| preview_error(e, v))?;
    let name = q.path.rsplit('/').next().unwrap_or("file");
    Ok(as_file(bytes, ty, name, inline))
}

pub async fn download(
    State(app): State<Arc<App>>,
    v: Viewer,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response, ConsoleError> {
    let id = parse_snapshot(&id, &v)?;
    download_file(&app, &v, id, &q).await
}
