//! The pages every role sees: the fleet, one device, one snapshot — status and metadata,
//! never content.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use lifeboat_shared::ids::SnapshotId;
use serde::Deserialize;

use super::{ConsoleError, Frame, Viewer, html, human_bytes};
use crate::app::App;
use crate::store;
use crate::store::devices::DeviceRow;
use crate::users::Role;

/// Where a device stands, as the fleet page counts it: waiting for a person, failing,
/// stale (no successful backup within `stale_after_secs`, or none at all yet), or
/// protected.
pub fn standing(d: &DeviceRow, stale_after_secs: f64) -> &'static str {
    match d.state.as_str() {
        "needs-trust" | "needs-passcode" | "needs-backup-password" => "needs-action",
        "failing" => "failing",
        _ if d.last_snapshot_id.is_none() || d.unprotected_secs > stale_after_secs => "stale",
        _ => "protected",
    }
}

/// What a person should do about a device in this state.
pub fn advice(state: &str) -> &'static str {
    match state {
        "needs-trust" => "Unlock the phone and tap Trust on its \"Trust this computer?\" prompt.",
        "needs-passcode" => "Unlock the phone and enter its passcode: iOS asks for it before an encrypted backup.",
        "needs-backup-password" => {
            "The phone encrypts its backups with a password Lifeboat does not know. An admin can set the known \
             password (PUT /api/v1/devices/{udid}/backup-password), or reset it on the phone (Settings → General \
             → Transfer or Reset → Reset All Settings)."
        }
        "failing" => "Backups keep failing: open the last runs below for their reasons (docs/operations.md, playbook).",
        "backing-up" => "A backup is running now.",
        _ => "Nothing to do: backups run on schedule while the phone is connected to a workstation.",
    }
}

#[derive(Debug, Deserialize)]
pub struct FleetQuery {
    state: Option<String>,
    q: Option<String>,
    page: Option<usize>,
}

struct FleetRow {
    d: DeviceRow,
    standing: &'static str,
}

#[derive(Template)]
#[template(path = "fleet.html")]
struct FleetPage {
    frame: Frame,
    counts: [(&'static str, &'static str, usize); 4],
    total: usize,
    rows: Vec<FleetRow>,
    state: String,
    q: String,
    page: usize,
    pages: usize,
    shown: usize,
}

const PAGE: usize = 100;

/// `/`: counts by standing, and the devices filtered by standing and searched by name,
/// serial number or UDID.
pub async fn fleet(
    State(app): State<Arc<App>>,
    v: Viewer,
    Query(q): Query<FleetQuery>,
) -> Result<Response, ConsoleError> {
    v.require(Role::Viewer)?;
    let client = app.db.get().await.map_err(|e| ConsoleError::internal("getting a database connection", e))?;
    let devices = store::devices::list(&client, v.caller.tenant)
        .await
        .map_err(|e| ConsoleError::internal("listing devices", e))?;
    let stale = app.console.stale_after.as_secs_f64();
    let mut counts = [
        ("protected", "Protected", 0),
        ("stale", "Stale", 0),
        ("needs-action", "Needs action", 0),
        ("failing", "Failing", 0),
    ];
    let state = q.state.unwrap_or_default();
    let needle = q.q.unwrap_or_default();
    let lower = needle.trim().to_lowercase();
    let total = devices.len();
    let mut rows = Vec::new();
    for d in devices {
        let standing = standing(&d, stale);
        if let Some(c) = counts.iter_mut().find(|c| c.0 == standing) {
            c.2 += 1;
        }
        let matches = lower.is_empty()
            || [d.name.as_deref(), d.serial_number.as_deref(), Some(d.udid.as_str())]
                .into_iter()
                .flatten()
                .any(|f| f.to_lowercase().contains(&lower));
        if (state.is_empty() || state == standing) && matches {
            rows.push(FleetRow { d, standing });
        }
    }
    rows.sort_by(|a, b| a.d.name.cmp(&b.d.name).then_with(|| a.d.udid.cmp(&b.d.udid)));
    let shown = rows.len();
    let pages = shown.div_ceil(PAGE).max(1);
    let page = q.page.unwrap_or(1).clamp(1, pages);
    let rows: Vec<FleetRow> = rows.into_iter().skip((page - 1) * PAGE).take(PAGE).collect();
    html(&FleetPage { frame: Frame::of(&v), counts, total, rows, state, q: needle, page, pages, shown })
}

struct SnapshotLine {
    s: store::snapshots::SnapshotRow,
    size: String,
}

#[derive(Template)]
#[template(path = "device.html")]
struct DevicePage {
    frame: Frame,
    d: DeviceRow,
    standing: &'static str,
    advice: String,
    snapshots: Vec<SnapshotLine>,
    runs: Vec<store::runs::RunRow>,
    tests: Vec<store::restore_tests::ResultRow>,
    grant: Option<store::console::Grant>,
    can_open: bool,
}

/// `/devices/{udid}`: its state and what to do, its snapshots, runs and restore tests.
pub async fn device(
    State(app): State<Arc<App>>,
    v: Viewer,
    Path(udid): Path<String>,
) -> Result<Response, ConsoleError> {
    v.require(Role::Viewer)?;
    let client = app.db.get().await.map_err(|e| ConsoleError::internal("getting a database connection", e))?;
    let t = v.caller.tenant;
    let d = store::devices::get(&client, t, &udid)
        .await
        .map_err(|e| ConsoleError::internal("finding a device", e))?
        .ok_or_else(|| ConsoleError::not_found(format!("no device {udid}")).framed(&v))?;
    let snapshots = store::snapshots::of_device(&client, t, &udid)
        .await
        .map_err(|e| ConsoleError::internal("listing snapshots", e))?
        .into_iter()
        .rev()
        .map(|s| SnapshotLine { size: human_bytes(s.logical_bytes), s })
        .collect();
    let runs = store::runs::list(&client, t, None, Some(&udid), 20)
        .await
        .map_err(|e| ConsoleError::internal("listing runs", e))?;
    let tests = store::restore_tests::list(&client, t, None, Some(&udid), None, 10)
        .await
        .map_err(|e| ConsoleError::internal("listing restore tests", e))?;
    let grant = store::console::live_grant(&client, t, v.caller.user, &udid)
        .await
        .map_err(|e| ConsoleError::internal("checking access", e))?;
    let standing = standing(&d, app.console.stale_after.as_secs_f64());
    let advice = advice(&d.state).replace("{udid}", &d.udid);
    html(&DevicePage {
        frame: Frame::of(&v),
        standing,
        advice,
        d,
        snapshots,
        runs,
        tests,
        grant,
        can_open: v.caller.role >= Role::Helpdesk,
    })
}

#[derive(Template)]
#[template(path = "snapshot.html")]
struct SnapshotPage {
    frame: Frame,
    s: store::snapshots::SnapshotRow,
    device_name: String,
    size: String,
    test: Option<store::restore_tests::ResultRow>,
    grant: Option<store::console::Grant>,
    can_open: bool,
}

pub fn parse_snapshot(id: &str, v: &Viewer) -> Result<SnapshotId, ConsoleError> {
    id.parse().map_err(|_| ConsoleError::not_found(format!("no snapshot {id}")).framed(v))
}

/// `/snapshots/{id}`: when, how big, whether it restores; the way into its content.
pub async fn snapshot(
    State(app): State<Arc<App>>,
    v: Viewer,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    v.require(Role::Viewer)?;
    let id = parse_snapshot(&id, &v)?;
    let client = app.db.get().await.map_err(|e| ConsoleError::internal("getting a database connection", e))?;
    let t = v.caller.tenant;
    let s = store::snapshots::get(&client, t, id)
        .await
        .map_err(|e| ConsoleError::internal("finding a snapshot", e))?
        .ok_or_else(|| ConsoleError::not_found(format!("no snapshot {id}")).framed(&v))?;
    let d =
        store::devices::get(&client, t, &s.udid).await.map_err(|e| ConsoleError::internal("finding a device", e))?;
    let test = store::restore_tests::list(&client, t, None, None, Some(id), 1)
        .await
        .map_err(|e| ConsoleError::internal("listing restore tests", e))?
        .into_iter()
        .next();
    let grant = store::console::live_grant(&client, t, v.caller.user, &s.udid)
        .await
        .map_err(|e| ConsoleError::internal("checking access", e))?;
    html(&SnapshotPage {
        frame: Frame::of(&v),
        device_name: d.and_then(|d| d.name).unwrap_or_else(|| s.udid.clone()),
        size: human_bytes(s.logical_bytes),
        s,
        test,
        grant,
        can_open: v.caller.role >= Role::Helpdesk,
    })
}
