//! The help-desk console: server-rendered HTML (askama templates under
//! `server/templates/`, escaped by default) on the HTTP listener, at `/` and below.
//!
//! - Sign-in (`/login`) with a console user's name and password; a session is a cookie
//!   (`HttpOnly`, `SameSite=Strict`, `Secure` behind TLS) whose secret's SHA-256 is the
//!   session row; it ends after [`crate::app::ConsoleSettings::idle`] without a request,
//!   after `absolute` whatever happens, at sign-out, or when the user is revoked.
//! - Every state-changing request is a POST carrying the session's CSRF token (and, when
//!   the browser sends one, an `Origin` of this host); sign-in failures are limited per
//!   name and per address, across replicas.
//! - Roles as the API's: viewer sees fleet status and metadata; helpdesk opens a device's
//!   content only after giving a reason, for that device, for a limited time
//!   (`content`); admin also reads the audit log and the users (`admin`).
//! - Every view of content, export and download is written to the audit log before the
//!   content is sent; if the audit write fails, nothing is shown.
//!
//! Pages: `pages` (fleet, device, snapshot), `content` (access and previews), `restore`
//! (pick a phone, pre-flight, progress), `admin`.

mod admin;
mod content;
mod export;
mod pages;
mod restore;
mod session;

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::app::App;
pub use export::zip_response;
pub use session::Viewer;

pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(pages::fleet))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/devices/{udid}", get(pages::device))
        .route("/devices/{udid}/access", post(content::grant))
        .route("/snapshots/{id}", get(pages::snapshot))
        .route("/snapshots/{id}/contacts", get(content::contacts))
        .route("/snapshots/{id}/contacts.vcf", get(content::contacts_vcard))
        .route("/snapshots/{id}/messages", get(content::conversations))
        .route("/snapshots/{id}/messages/{chat}", get(content::thread))
        .route("/snapshots/{id}/calls", get(content::calls))
        .route("/snapshots/{id}/photos", get(content::photos))
        .route("/snapshots/{id}/photos.zip", get(export::photos))
        .route("/snapshots/{id}/backup.zip", get(export::backup))
        .route("/snapshots/{id}/search", get(content::search))
        .route("/snapshots/{id}/file", get(content::download))
        .route("/snapshots/{id}/restore", get(restore::page).post(restore::start))
        .route("/restores/{id}", get(restore::job))
        .route("/admin/audit", get(admin::audit))
        .route("/admin/users", get(admin::users))
        .route("/static/console.css", get(stylesheet))
        .layer(axum::middleware::map_response(security_headers))
}

/// Headers on every console answer: nothing inline runs (a message body that escaped
/// escaping still could not script), nothing is framed, sniffed or cached.
async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; script-src 'self'; form-action 'self'; \
             base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    resp
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "max-age=3600")],
        include_str!("../../templates/console.css"),
    )
        .into_response()
}

/// What every page's frame shows: who is signed in, and the token its forms carry.
#[derive(Debug, Clone)]
pub struct Frame {
    pub name: String,
    pub role: &'static str,
    pub admin: bool,
    pub csrf: String,
}

impl Frame {
    pub fn of(v: &Viewer) -> Self {
        Self {
            name: v.name.clone(),
            role: v.caller.role.as_str(),
            admin: v.caller.role >= crate::users::Role::Admin,
            csrf: v.csrf.clone(),
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    frame: Option<Frame>,
    status: u16,
    title: String,
    message: String,
}

/// A page that could not be shown: a status and a sentence for people.
#[derive(Debug)]
pub enum ConsoleError {
    /// Not signed in (or the session ended): to the sign-in page, then back.
    SignIn {
        next: String,
    },
    Page {
        status: StatusCode,
        message: String,
        frame: Option<Frame>,
    },
}

impl ConsoleError {
    pub fn status(status: StatusCode, message: impl Into<String>) -> Self {
        Self::Page { status, message: message.into(), frame: None }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::status(StatusCode::NOT_FOUND, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::status(StatusCode::FORBIDDEN, message)
    }
    /// A server-side failure: logged with its cause, shown without it.
    pub fn internal(what: &str, e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "{what}");
        Self::status(StatusCode::INTERNAL_SERVER_ERROR, format!("{what} failed; see the server log"))
    }
    /// The same error shown inside the signed-in frame.
    pub fn framed(self, v: &Viewer) -> Self {
        match self {
            Self::Page { status, message, .. } => Self::Page { status, message, frame: Some(Frame::of(v)) },
            other => other,
        }
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        match self {
            Self::SignIn { next } => {
                let to = format!("/login?next={}", urlencode(&next));
                Redirect::to(&to).into_response()
            }
            Self::Page { status, message, frame } => {
                let title = status.canonical_reason().unwrap_or("Error").to_owned();
                let page = ErrorPage { frame, status: status.as_u16(), title, message };
                match page.render() {
                    Ok(html) => (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
                    Err(_) => (status, "error").into_response(),
                }
            }
        }
    }
}

/// Renders a template as a 200 HTML page.
pub fn html(t: &impl Template) -> Result<Response, ConsoleError> {
    let body = t.render().map_err(|e| ConsoleError::internal("rendering a page", e))?;
    Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response())
}

/// Percent-encodes a query value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `1234567` → `1.2 MB`.
pub fn human_bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 { format!("{n} B") } else { format!("{v:.1} {}", units[i]) }
}

/// Unix seconds as `2025-03-04 15:06 UTC`.
pub fn utc(unix: f64) -> String {
    let [y, m, d, h, mi, _] = crate::restore::export::civil(unix.floor() as i64);
    format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02} UTC")
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_and_sizes_read_as_people_write_them() {
        assert_eq!(super::utc(0.0), "1970-01-01 00:00 UTC");
        assert_eq!(super::utc(1_735_689_600.0 + 59.0 * 86_400.0 + 3_723.0), "2025-03-01 01:02 UTC");
        assert_eq!(super::human_bytes(999), "999 B");
        assert_eq!(super::human_bytes(1_234_567), "1.2 MB");
        assert_eq!(super::urlencode("/a b?c=d&e"), "/a%20b%3Fc%3Dd%26e");
    }
}
