//! For admins: the tenant's users, and the audit log — read, filtered and exported as CSV
//! or JSON (reading it is itself audited), never changed.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ConsoleError, Frame, Viewer, html};
use crate::app::App;
use crate::store;
use crate::store::audit::EventRow;
use crate::users::Role;

#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    udid: Option<String>,
    action: Option<String>,
    before: Option<i64>,
    format: Option<String>,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    frame: Frame,
    events: Vec<EventRow>,
    udid: String,
    action: String,
    older: Option<i64>,
}

fn csv_field(s: &str) -> String {
    // A leading = + - @ would be a formula in a spreadsheet: quote it as text.
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{s}") } else { s.to_owned() };
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s }
}

/// The audit events as CSV, one per line, a header first.
pub fn audit_csv(events: &[EventRow]) -> String {
    let mut out =
        String::from("id,seq,at,actor,role,action,device,snapshot,dataset,object,reason,ip,user_agent,hash\r\n");
    for e in events {
        let fields = [
            e.id.to_string(),
            e.seq.to_string(),
            e.at.clone(),
            e.actor.clone(),
            e.role.clone().unwrap_or_default(),
            e.action.clone(),
            e.device.clone().unwrap_or_default(),
            e.snapshot.map(|s| s.to_string()).unwrap_or_default(),
            e.dataset.clone().unwrap_or_default(),
            e.object.clone().unwrap_or_default(),
            e.reason.clone().unwrap_or_default(),
            e.ip.clone().unwrap_or_default(),
            e.user_agent.clone().unwrap_or_default(),
            e.hash.clone(),
        ];
        out.push_str(&fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
        out.push_str("\r\n");
    }
    out
}

/// `/admin/audit`: newest first, 200 a page, filtered by device and action;
/// `?format=csv|json` downloads what the filters select (up to 10,000 events).
pub async fn audit(
    State(app): State<Arc<App>>,
    v: Viewer,
    Query(q): Query<AuditQuery>,
) -> Result<Response, ConsoleError> {
    v.require(Role::Admin)?;
    let client = app.db.get().await.map_err(|e| ConsoleError::internal("getting a database connection", e))?;
    let udid = q.udid.filter(|u| !u.is_empty());
    let action = q.action.filter(|a| !a.is_empty());
    let filter =
        store::audit::Filter { before: q.before, udid: udid.as_deref(), action: action.as_deref(), actor_user: None };
    let export = q.format.as_deref();
    let limit = if export.is_some() { 10_000 } else { 200 };
    let events = store::audit::list(&**client, v.caller.tenant, limit, &filter)
        .await
        .map_err(|e| ConsoleError::internal("reading the audit log", e))?;
    let actor = v.actor();
    let what = export.unwrap_or("page");
    let event = store::audit::Event { object: Some(what), dataset: Some("audit"), ..v.event(&actor, "audit.view") };
    store::audit::record(&**client, &event).await.map_err(|e| ConsoleError::internal("writing the audit log", e))?;
    match export {
        Some("csv") => Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (header::CONTENT_DISPOSITION, "attachment; filename=\"audit.csv\""),
            ],
            audit_csv(&events),
        )
            .into_response()),
        Some("json") => Ok((
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CONTENT_DISPOSITION, "attachment; filename=\"audit.json\""),
            ],
            serde_json::json!({ "events": events }).to_string(),
        )
            .into_response()),
        Some(other) => Err(ConsoleError::status(
            axum::http::StatusCode::BAD_REQUEST,
            format!("unknown format {other:?}: csv or json"),
        )
        .framed(&v)),
        None => {
            let older = (events.len() as i64 == limit).then(|| events.last().map(|e| e.id)).flatten();
            html(&AuditPage {
                frame: Frame::of(&v),
                events,
                udid: udid.unwrap_or_default(),
                action: action.unwrap_or_default(),
                older,
            })
        }
    }
}

#[derive(Template)]
#[template(path = "users.html")]
struct UsersPage {
    frame: Frame,
    users: Vec<store::users::UserRow>,
}

/// `/admin/users`: who can sign in or call the API, with their roles.
pub async fn users(State(app): State<Arc<App>>, v: Viewer) -> Result<Response, ConsoleError> {
    v.require(Role::Admin)?;
    let client = app.db.get().await.map_err(|e| ConsoleError::internal("getting a database connection", e))?;
    let users =
        store::users::list(&client, v.caller.tenant).await.map_err(|e| ConsoleError::internal("listing users", e))?;
    html(&UsersPage { frame: Frame::of(&v), users })
}

#[cfg(test)]
mod tests {
    #[test]
    fn csv_quotes_what_it_must_and_defuses_formulas() {
        assert_eq!(super::csv_field("plain"), "plain");
        assert_eq!(super::csv_field("a,b"), "\"a,b\"");
        assert_eq!(super::csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(super::csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
    }
}
