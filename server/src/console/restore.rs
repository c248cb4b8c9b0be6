//! Restoring a snapshot onto a phone from the console: pick the target among the phones
//! workstations see now, read the pre-flight (what will happen, what iOS refuses), queue
//! the job (the agent where the phone is attached carries it out), and watch it end.

use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use lifeboat_shared::ids::SnapshotId;
use serde::Deserialize;

use super::pages::parse_snapshot;
use super::{ConsoleError, Frame, Viewer, html};
use crate::app::App;
use crate::store;
use crate::store::devices::DeviceRow;
use crate::store::snapshots::SnapshotRow;
use crate::users::Role;

/// A phone a workstation reported within this many seconds counts as attached.
const ATTACHED_SECS: f64 = 15.0 * 60.0;

/// `17.5.1` → `[17, 5, 1]`, for comparing iOS versions.
fn version(v: &str) -> Vec<u32> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

struct Target {
    d: DeviceRow,
    warnings: Vec<String>,
}

/// What restoring `s` onto `d` will meet.
fn preflight(s: &SnapshotRow, d: &DeviceRow) -> Vec<String> {
    let mut w = Vec::new();
    if let (Some(from), Some(to)) = (&s.ios_version, &d.ios_version)
        && version(to) < version(from)
    {
        w.push(format!(
            "This phone runs iOS {to}, older than the iOS {from} that made the backup: iOS refuses it. Update the \
             phone first."
        ));
    }
    if d.state == "backing-up" {
        w.push("A backup of this phone is running: the restore starts when it ends.".into());
    }
    if d.udid == s.udid {
        w.push("This is the phone the backup was made on: it goes back to how it was then.".into());
    }
    w
}

#[derive(Template)]
#[template(path = "restore.html")]
struct RestorePage {
    frame: Frame,
    s: SnapshotRow,
    device_name: String,
    targets: Vec<Target>,
}

async fn snapshot_with_grant(
    app: &App,
    v: &Viewer,
    id: SnapshotId,
) -> Result<Option<(SnapshotRow, String)>, ConsoleError> {
    v.require(Role::Helpdesk)?;
    let client = app.db.get().await.map_err(|e| ConsoleError::internal("getting a database connection", e))?;
    let s = store::snapshots::get(&client, v.caller.tenant, id)
        .await
        .map_err(|e| ConsoleError::internal("finding a snapshot", e))?
        .ok_or_else(|| ConsoleError::not_found(format!("no snapshot {id}")).framed(v))?;
    let grant = store::console::live_grant(&client, v.caller.tenant, v.caller.user, &s.udid)
        .await
        .map_err(|e| ConsoleError::internal("checking access", e))?;
    Ok(grant.map(|g| (s, g.reason)))
}

/// `/snapshots/{id}/restore`: the phones it can go onto now, each with its pre-flight.
pub async fn page(State(app): State<Arc<App>>, v: Viewer, Path(id): Path<String>) -> Result<Response, ConsoleError> {
    let id = parse_snapshot(&id, &v)?;
    let Some((s, _)) = snapshot_with_grant(&app, &v, id).await? else {
        return Ok(Redirect::to(&format!("/snapshots/{id}/contacts")).into_response());
    };
    let client = app.db.get().await.map_err(|e| ConsoleError::internal("getting a database connection", e))?;
    let devices = store::devices::list(&client, v.caller.tenant)
        .await
        .map_err(|e| ConsoleError::internal("listing devices", e))?;
    let device_name =
        devices.iter().find(|d| d.udid == s.udid).and_then(|d| d.name.clone()).unwrap_or_else(|| s.udid.clone());
    let targets = devices
        .into_iter()
        .filter(|d| d.seen_secs_ago <= ATTACHED_SECS)
        .map(|d| Target { warnings: preflight(&s, &d), d })
        .collect();
    html(&RestorePage { frame: Frame::of(&v), s, device_name, targets })
}

#[derive(Debug, Deserialize)]
pub struct RestoreForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    target: String,
}

/// `POST /snapshots/{id}/restore`: queues the restore and shows its progress.
pub async fn start(
    State(app): State<Arc<App>>,
    v: Viewer,
    Path(id): Path<String>,
    Form(form): Form<RestoreForm>,
) -> Result<Response, ConsoleError> {
    v.check_csrf(&form.csrf)?;
    let id = parse_snapshot(&id, &v)?;
    let Some((s, reason)) = snapshot_with_grant(&app, &v, id).await? else {
        return Err(ConsoleError::forbidden("give a reason for this phone's content first").framed(&v));
    };
    let mut client = app.db.get().await.map_err(|e| ConsoleError::internal("getting a database connection", e))?;
    let target = store::devices::get(&client, v.caller.tenant, &form.target)
        .await
        .map_err(|e| ConsoleError::internal("finding a device", e))?
        .ok_or_else(|| ConsoleError::not_found(format!("no device {}", form.target)).framed(&v))?;
    // The page's checks, again: the form may be old or made by hand.
    let conflict = |m: String| ConsoleError::status(axum::http::StatusCode::CONFLICT, m).framed(&v);
    if target.seen_secs_ago > ATTACHED_SECS {
        return Err(conflict(format!("{} is not attached to a workstation now", form.target)));
    }
    if let Some(refused) = preflight(&s, &target).into_iter().find(|w| w.contains("iOS refuses")) {
        return Err(conflict(refused));
    }
    // Audited before the job exists: a restore nobody can account for never runs.
    let actor = v.actor();
    let event = store::audit::Event {
        udid: Some(&s.udid),
        snapshot: Some(s.id),
        dataset: Some("snapshot"),
        object: Some(&form.target),
        reason: Some(&reason),
        detail: serde_json::json!({ "target": form.target }),
        ..v.event(&actor, "restore.create")
    };
    store::audit::record(&**client, &event).await.map_err(|e| ConsoleError::internal("writing the audit log", e))?;
    let job = match store::restore_jobs::create(&mut client, v.caller.tenant, id, &form.target, v.caller.user)
        .await
        .map_err(|e| ConsoleError::internal("queuing the restore", e))?
    {
        store::restore_jobs::Queued::Job(job) => job,
        store::restore_jobs::Queued::Busy => {
            return Err(ConsoleError::status(
                axum::http::StatusCode::CONFLICT,
                format!("{} already has a restore queued or running", form.target),
            )
            .framed(&v));
        }
    };
    tracing::info!(user.id = %v.caller.user, restore.id = %job, snapshot.id = %id, device.udid = %form.target, "restore queued from the console");
    Ok(Redirect::to(&format!("/restores/{job}")).into_response())
}

#[derive(Template)]
#[template(path = "job.html")]
struct JobPage {
    frame: Frame,
    j: store::restore_jobs::JobRow,
    done: bool,
}

/// `/restores/{id}`: a restore's state, refreshing itself until it ends.
pub async fn job(State(app): State<Arc<App>>, v: Viewer, Path(id): Path<String>) -> Result<Response, ConsoleError> {
    v.require(Role::Viewer)?;
    let none = || ConsoleError::not_found(format!("no restore {id}")).framed(&v);
    let job_id: uuid::Uuid = id.parse().map_err(|_| none())?;
    let client = app.db.get().await.map_err(|e| ConsoleError::internal("getting a database connection", e))?;
    let j = store::restore_jobs::get(&client, v.caller.tenant, job_id)
        .await
        .map_err(|e| ConsoleError::internal("reading a restore", e))?
        .ok_or_else(none)?;
    let done = matches!(j.status.as_str(), "succeeded" | "failed");
    html(&JobPage { frame: Frame::of(&v), j, done })
}

#[cfg(test)]
mod tests {
    #[test]
    fn ios_versions_compare_as_numbers() {
        assert!(super::version("17.10") > super::version("17.9.1"));
        assert!(super::version("16.7.8") < super::version("17.0"));
    }
}
