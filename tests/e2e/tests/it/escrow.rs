//! Escrowed iOS backup passwords: admins enter and reveal them through the API and the
//! operator CLI, nobody else can, every set and reveal lands in the audit log, and the
//! password is never stored or logged in the clear.

use std::io::Write as _;
use std::process::{Command, Stdio};

use lifeboat_agent::net::ClientError;
use lifeboat_e2e::{ServerProcess, bin, embedded_db, have_postgres, http_get, http_json, server_cli, tempdir};
use lifeboat_server::users::{self, Role};
use lifeboat_shared::Secret;
use lifeboat_shared::ids::Udid;
use lifeboat_shared::wire::{ErrorCode, Request, Response};
use serde_json::Value;

use crate::ingest::{device, open_run, start_server};

const UDID: &str = "00008101-000A1B2C3D4E5F61";
const PASSWORD: &str = "Tr0ub4dor & 3 — ünïcode";

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test]
async fn backup_passwords_are_escrowed_and_revealed_to_admins_only_and_audited() {
    let Some(fx) = start_server().await else { return };
    let (a, b) = (fx.tenant("acme").await, fx.tenant("globex").await);
    let db = fx.db.client().await;
    let (admin_id, admin) = users::create(&db, a, "it-admin", Role::Admin, None).await.unwrap();
    let (_, helpdesk) = users::create(&db, a, "desk", Role::Helpdesk, None).await.unwrap();
    let (_, other) = users::create(&db, b, "globex-admin", Role::Admin, None).await.unwrap();
    let (client, _) = fx.enrolled_agent(a).await;
    open_run(&client, &device(UDID)).await;

    let addr = fx.server.http_addr;
    let path = format!("/api/v1/devices/{UDID}/backup-password");
    let put = |cred: &str, body: String| {
        let (path, cred) = (path.clone(), cred.to_string());
        async move { http_json(addr, "PUT", &path, Some(&cred), &body).await.unwrap() }
    };
    let body = serde_json::json!({ "password": PASSWORD }).to_string();

    // Nothing escrowed yet.
    let (status, text) = http_get(addr, &path, Some(&admin)).await.unwrap();
    assert_eq!(
        (status, json(&text)["error"].as_str()),
        (404, Some(&*format!("no backup password is escrowed for device {UDID}")))
    );

    // Only an admin of the device's tenant may enter one; bad input is refused.
    assert_eq!(put(&helpdesk, body.clone()).await.0, 403);
    assert_eq!(put(&other, body.clone()).await.0, 404, "another tenant's device does not exist for it");
    for (bad, why) in [
        (r#"{"password": ""}"#.to_string(), "backup password refused: it is empty"),
        (
            r#"{"password": "two\nlines"}"#.to_string(),
            "backup password refused: it contains a control character (a pasted newline?)",
        ),
        (
            serde_json::json!({ "password": "x".repeat(257) }).to_string(),
            "backup password refused: it is longer than 256 characters",
        ),
    ] {
        let (status, text) = put(&admin, bad).await;
        assert_eq!((status, json(&text)["error"].as_str()), (400, Some(why)));
    }
    let (status, text) = put(&admin, r#"{"pasword": "typo"}"#.into()).await;
    assert_eq!(status, 400, "{text}");
    let (status, text) =
        http_json(addr, "PUT", "/api/v1/devices/00008101-FFFFFFFFFFFFFFFF/backup-password", Some(&admin), &body)
            .await
            .unwrap();
    assert_eq!((status, json(&text)["error"].as_str()), (404, Some("no device 00008101-FFFFFFFFFFFFFFFF")));
    assert_eq!(fx.count("SELECT count(*) FROM device_backup_passwords").await, 0, "nothing stored");

    let (status, text) = put(&admin, body.clone()).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["source"], "admin");

    // Stored sealed, bound to its tenant and device.
    let sealed: Vec<u8> = db.query_one("SELECT sealed FROM device_backup_passwords", &[]).await.unwrap().get(0);
    assert_eq!(sealed.len(), 12 + PASSWORD.len() + 16);
    assert!(!sealed.windows(8).any(|w| PASSWORD.as_bytes().windows(8).any(|p| p == w)));

    // The reveal: admins of the tenant only.
    assert_eq!(http_get(addr, &path, Some(&helpdesk)).await.unwrap().0, 403);
    assert_eq!(http_get(addr, &path, Some(&other)).await.unwrap().0, 404);
    let (status, text) = http_get(addr, &path, Some(&admin)).await.unwrap();
    assert_eq!(status, 200, "{text}");
    let revealed = json(&text);
    assert_eq!(revealed["password"], PASSWORD);
    assert_eq!(revealed["source"], "admin");

    // The audit log has exactly the set and the reveal, newest first; only admins read it.
    assert_eq!(http_get(addr, "/api/v1/audit", Some(&helpdesk)).await.unwrap().0, 403);
    let (_, text) = http_get(addr, "/api/v1/audit", Some(&admin)).await.unwrap();
    let events = json(&text)["events"].as_array().unwrap().clone();
    let seen: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["actor"].as_str().unwrap(), e["udid"].as_str().unwrap()))
        .collect();
    let actor = format!("user {admin_id}");
    assert_eq!(seen, [("backup-password.reveal", &*actor, UDID), ("backup-password.set", &*actor, UDID)]);
    assert!(!text.contains(PASSWORD));
    let (_, text) = http_get(addr, "/api/v1/audit", Some(&other)).await.unwrap();
    assert_eq!(json(&text)["events"].as_array().unwrap().len(), 0, "tenants see only their own log");
    let before = events[0]["id"].as_i64().unwrap();
    let (_, text) = http_get(addr, &format!("/api/v1/audit?before={before}&limit=5"), Some(&admin)).await.unwrap();
    assert_eq!(json(&text)["events"].as_array().unwrap().len(), 1, "paged by id");

    // The agent side (protocol version 3): an agent escrows what it generated and reads
    // it back; another tenant's agent cannot, and a bad password is refused.
    let code = |r: Result<Response, ClientError>| r.err().and_then(|e| e.code());
    let udid: Udid = UDID.parse().unwrap();
    let generated = Secret::new("8fK2-mQ9x-Lp4W-zR7c-agent".to_string());
    let put = Request::PutBackupPassword { udid: udid.clone(), password: generated.clone() };
    assert_eq!(client.request(&put).await.unwrap(), Response::Ok);
    let get = Request::GetBackupPassword { udid: udid.clone() };
    assert_eq!(client.request(&get).await.unwrap(), Response::BackupPassword { password: Some(generated.clone()) });
    let bad = Request::PutBackupPassword { udid: udid.clone(), password: Secret::new(String::new()) };
    assert_eq!(code(client.request(&bad).await), Some(ErrorCode::Malformed));
    let unknown = Request::GetBackupPassword { udid: "00008101-FFFFFFFFFFFFFFFF".parse().unwrap() };
    assert_eq!(code(client.request(&unknown).await), Some(ErrorCode::NotFound));
    let (globex_agent, _) = fx.enrolled_agent(b).await;
    assert_eq!(code(globex_agent.request(&get).await), Some(ErrorCode::NotFound), "another tenant's device");
    assert_eq!(code(globex_agent.request(&put).await), Some(ErrorCode::NotFound));
    let (_, text) = http_get(addr, &path, Some(&admin)).await.unwrap();
    let revealed = json(&text);
    assert_eq!(
        (revealed["password"].as_str(), revealed["source"].as_str()),
        (Some(generated.expose().as_str()), Some("agent"))
    );
    let (_, text) = http_get(addr, "/api/v1/audit?limit=1&before=1000000", Some(&admin)).await.unwrap();
    let (_, all) = http_get(addr, "/api/v1/audit", Some(&admin)).await.unwrap();
    assert_eq!(json(&text)["events"].as_array().unwrap().len(), 1);
    let actions: Vec<(String, String)> = json(&all)["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap().to_string(), e["actor"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(client.accepted.version, 6, "this build negotiates version 6");
    let agent_actor = format!("agent {}", client.accepted.agent);
    assert_eq!(
        actions[..2],
        [("backup-password.reveal".to_string(), actor.clone()), ("backup-password.set".to_string(), agent_actor)],
        "the agent's read is not a reveal; its set is audited"
    );
    assert_eq!(actions.len(), 4);
    fx.server.stop().await.unwrap();
}

#[test]
fn the_operator_cli_sets_and_reveals_a_backup_password_on_stdout_last_line() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    let data = dir.path().join("data");
    let (ok, _, err) = server_cli(&data, &["tenant", "create", "acme"]);
    assert!(ok, "{err}");
    let server = ServerProcess::start(&data, &[]).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let db = embedded_db(&data).await;
        db.execute("INSERT INTO devices (tenant_id, udid) SELECT id, $1 FROM tenants WHERE name = 'acme'", &[&UDID])
            .await
            .unwrap();
    });
    let args = ["device", "backup-password", "--tenant", "acme", "--udid", UDID];

    let (ok, _, err) = server_cli(&data, &args);
    assert!(!ok);
    assert!(err.contains(&format!("no backup password is escrowed for device {UDID}")), "{err}");
    let (ok, _, err) = server_cli(&data, &["device", "backup-password", "--tenant", "nope", "--udid", UDID]);
    assert!(!ok && err.contains("error: no tenant named \"nope\""), "{err}");

    let set = |input: &str| {
        let mut child = Command::new(bin("lifeboat-server"))
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .arg("--set")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = set("\n");
    assert!(!ok && err.contains("backup password refused: it is empty"), "{err}");
    let (ok, out, err) = set(&format!("{PASSWORD}\n"));
    assert!(ok, "{err}");
    assert!(out.is_empty() && !err.contains(PASSWORD), "the password is not echoed: {out} {err}");

    let (ok, out, err) = server_cli(&data, &args);
    assert!(ok, "{err}");
    assert_eq!(out.lines().last(), Some(PASSWORD));
    assert!(!err.contains(PASSWORD), "{err}");
    let (ok, out, _) = server_cli(&data, &[&args[..], &["--json"]].concat());
    assert!(ok);
    assert_eq!(json(&out)["password"], PASSWORD);

    // Two reveals and one set, by the operator.
    let events: Vec<(String, String)> = rt.block_on(async {
        let db = embedded_db(&data).await;
        db.query("SELECT action, actor FROM audit_events ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    });
    let op = "operator (CLI)".to_string();
    assert_eq!(
        events,
        [
            ("backup-password.set".to_string(), op.clone()),
            ("backup-password.reveal".to_string(), op.clone()),
            ("backup-password.reveal".to_string(), op)
        ]
    );
    drop(server);
}
