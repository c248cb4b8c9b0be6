//! The help-desk HTTP API and the ingest metrics, after real uploads over QUIC.

use lifeboat_agent::pipeline::transfer;
use lifeboat_e2e::{http_get, make_tree};
use lifeboat_server::users::{self, Role};
use lifeboat_shared::wire::{Request, RunEnd};
use serde_json::Value;

use crate::ingest::{device, open_run, start_server};

const UDID: &str = "00008101-000A1B2C3D4E5F60";

/// A Manifest.db like a phone's, naming some of the tree's files by domain and path.
fn write_manifest_db(tree: &std::path::Path) -> Vec<(String, String, String)> {
    let files = transfer::list_files(tree).unwrap();
    let named: Vec<(String, String, String)> = files
        .iter()
        .take(4)
        .enumerate()
        .map(|(i, p)| {
            let file_id = p.rsplit('/').next().unwrap().to_string();
            let (domain, path) = match i {
                0 => ("HomeDomain", "Library/SMS/sms.db"),
                1 => ("HomeDomain", "Library/AddressBook/AddressBook.sqlitedb"),
                2 => ("CameraRollDomain", "Media/DCIM/100APPLE/IMG_0001.HEIC"),
                _ => ("AppDomain-com.example.notes", "Documents/notes.sqlite"),
            };
            (file_id, domain.to_string(), path.to_string())
        })
        .collect();
    let db = rusqlite::Connection::open(tree.join("Manifest.db")).unwrap();
    db.execute_batch(
        "CREATE TABLE Files (fileID TEXT PRIMARY KEY, domain TEXT, relativePath TEXT, flags INTEGER, file BLOB);
         CREATE TABLE Properties (key TEXT PRIMARY KEY, value BLOB);",
    )
    .unwrap();
    for (id, domain, path) in &named {
        db.execute("INSERT INTO Files VALUES (?1, ?2, ?3, 1, NULL)", (id, domain, path)).unwrap();
    }
    db.execute("INSERT INTO Files VALUES ('dir0', 'HomeDomain', 'Library', 2, NULL)", ()).unwrap();
    named
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test]
async fn the_api_shows_devices_snapshots_runs_and_agents_by_role_and_tenant() {
    let Some(fx) = start_server().await else { return };
    let (a, b) = (fx.tenant("acme").await, fx.tenant("globex").await);
    let db = fx.db.client().await;
    let (_, viewer) = users::create(&db, a, "grafana", Role::Viewer, None).await.unwrap();
    let (_, helpdesk) = users::create(&db, a, "desk", Role::Helpdesk, None).await.unwrap();
    let (_, other) = users::create(&db, b, "globex-admin", Role::Admin, None).await.unwrap();

    let (client, keys) = fx.enrolled_agent(a).await;
    let tree = tempfile::tempdir().unwrap();
    make_tree(tree.path(), 30, 3 << 20, 5).unwrap();
    let named = write_manifest_db(tree.path());
    let dev = device(UDID);
    let (run, snapshot) = open_run(&client, &dev).await;
    let (report, _) = transfer::upload_dir(&client, &keys, run, snapshot, dev.clone(), tree.path(), 0).await.unwrap();
    let (failed, _) = open_run(&client, &dev).await;
    let end = RunEnd::Failed { reason: "device-disconnected".into(), message: "unplugged".into() };
    client.request(&Request::EndRun { run: failed, end }).await.unwrap();

    let addr = fx.server.http_addr;
    let get = |path: String, cred: Option<String>| async move { http_get(addr, &path, cred.as_deref()).await.unwrap() };

    // Authentication.
    let (status, body) = get("/api/v1/devices".into(), None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        get("/api/v1/devices".into(), Some("lbu1_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into())).await.0,
        401
    );
    assert_eq!(get("/api/v1/devices".into(), Some("not-even-a-credential".into())).await.0, 401);

    // Devices, with the last successful backup.
    let (status, body) = get("/api/v1/devices".into(), Some(viewer.clone())).await;
    assert_eq!(status, 200, "{body}");
    let devices = json(&body);
    assert_eq!(devices["devices"].as_array().unwrap().len(), 1);
    assert_eq!(devices["devices"][0]["udid"], UDID);
    assert_eq!(devices["devices"][0]["last_snapshot_id"], snapshot.to_string());
    assert!(devices["devices"][0]["last_successful_backup_at"].as_str().unwrap().ends_with('Z'));

    let (status, body) = get(format!("/api/v1/devices/{UDID}/snapshots"), Some(viewer.clone())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["snapshots"][0]["id"], snapshot.to_string());

    // A snapshot's contents need the help-desk role.
    let (status, body) = get(format!("/api/v1/snapshots/{snapshot}"), Some(viewer.clone())).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = get(format!("/api/v1/snapshots/{snapshot}"), Some(helpdesk.clone())).await;
    assert_eq!(status, 200, "{body}");
    let detail = json(&body);
    assert_eq!(detail["files_total"], 4);
    let listed: Vec<(String, String, u64)> = detail["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (f["domain"].as_str().unwrap().into(), f["path"].as_str().unwrap().into(), f["size"].as_u64().unwrap())
        })
        .collect();
    let mut expected: Vec<(String, String, u64)> = named
        .iter()
        .map(|(id, d, p)| {
            let size = std::fs::metadata(tree.path().join(&id[..2]).join(id)).unwrap().len();
            (d.clone(), p.clone(), size)
        })
        .collect();
    expected.sort();
    assert_eq!(listed, expected);
    let (_, body) = get(format!("/api/v1/snapshots/{snapshot}?domain=CameraRollDomain"), Some(helpdesk.clone())).await;
    assert_eq!(json(&body)["files"][0]["path"], "Media/DCIM/100APPLE/IMG_0001.HEIC");

    // Runs with failure reasons, and agents.
    let (_, body) = get("/api/v1/runs?status=failed".into(), Some(viewer.clone())).await;
    let runs = json(&body);
    assert_eq!(runs["runs"].as_array().unwrap().len(), 1);
    assert_eq!(runs["runs"][0]["reason"], "device-disconnected");
    assert_eq!(runs["runs"][0]["id"], failed.to_string());
    let (_, body) = get("/api/v1/agents".into(), Some(viewer.clone())).await;
    assert_eq!(json(&body)["agents"][0]["hostname"], "ws-1");

    // Another tenant sees none of it, not even that it exists.
    let (_, body) = get("/api/v1/devices".into(), Some(other.clone())).await;
    assert_eq!(json(&body)["devices"].as_array().unwrap().len(), 0);
    assert_eq!(get(format!("/api/v1/snapshots/{snapshot}"), Some(other.clone())).await.0, 404);
    assert_eq!(get(format!("/api/v1/devices/{UDID}/snapshots"), Some(other.clone())).await.0, 404);
    let (_, body) = get("/api/v1/runs".into(), Some(other)).await;
    assert_eq!(json(&body)["runs"].as_array().unwrap().len(), 0);

    // Metrics count what happened.
    let (_, metrics) = get("/metrics".into(), None).await;
    for line in [
        "lifeboat_backup_runs_total{reason=\"\",result=\"succeeded\"} 1",
        "lifeboat_backup_runs_total{reason=\"device-disconnected\",result=\"failed\"} 1",
        "lifeboat_quic_connections 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    let value =
        |name: &str| -> f64 { metrics.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0.0) };
    assert_eq!(value("lifeboat_ingest_received_bytes_total"), report.blob_bytes_sent as f64);
    assert!(value("lifeboat_ingest_stored_bytes_total") >= value("lifeboat_ingest_received_bytes_total"));
    fx.server.stop().await.unwrap();
}
