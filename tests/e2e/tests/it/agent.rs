//! The real `lifeboat-agent` binary against a real server process and a virtual iPhone:
//! enrol with a token, back the phone up, and find exactly the phone's content in the
//! committed snapshot; a second backup after a little use sends only what changed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use lifeboat_agent::net::Client;
use lifeboat_agent::state::AgentState;
use lifeboat_e2e::{
    ServerProcess, bin, embedded_db, have_postgres, iphone_backup_content, sealed_chunks, server_cli, tempdir,
    tenant_with_token,
};
use lifeboat_shared::ids::ChunkId;
use virtual_iphone::content::Profile;
use virtual_iphone::{Config, Registry, usbmuxd};

fn agent(state: &Path, usbmuxd: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(bin("lifeboat-agent"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env("USBMUXD_SOCKET_ADDRESS", usbmuxd)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The server's chunk index: each chunk's blob length and plaintext length, by id.
async fn chunk_index(db: &tokio_postgres::Client) -> HashMap<ChunkId, (u64, u64)> {
    let rows = db.query("SELECT id, length_bytes, plain_bytes FROM chunks", &[]).await.unwrap();
    rows.iter()
        .map(|r| {
            let id: Vec<u8> = r.get(0);
            (ChunkId(id.try_into().unwrap()), (r.get::<_, i32>(1) as u64, r.get::<_, i32>(2) as u64))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrols_and_backs_up_a_virtual_iphone_then_sends_only_changes() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    let data = dir.path().join("data");
    let server = ServerProcess::start(&data, &[]).unwrap();
    let token = tenant_with_token(&server, "acme").unwrap();

    // A virtual iPhone in this process.
    let phone_state = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mux = listener.local_addr().unwrap().to_string();
    let config = Config {
        seed: 3,
        devices: 2,
        profile: Profile::Tiny,
        state_dir: phone_state.path().to_path_buf(),
        kdf_rounds: 1000,
    };
    let registry = Arc::new(Registry::new(config).unwrap());
    tokio::spawn(usbmuxd::serve(listener, registry.clone()));
    let udid = registry.all()[0].udid.clone();
    let phone = registry.state_by_udid(&udid).unwrap();

    let state = dir.path().join("agent");
    let run = |args: Vec<String>| {
        let (state, mux) = (state.clone(), mux.clone());
        tokio::task::spawn_blocking(move || agent(&state, &mux, &args.iter().map(String::as_str).collect::<Vec<_>>()))
    };
    let (ok, out, err) = run(vec!["enroll".into(), token.clone()]).await.unwrap();
    assert!(ok, "{err}");
    assert!(out.starts_with("enrolled as agent "), "{out}");
    let (ok, _, err) = run(vec!["enroll".into(), token]).await.unwrap();
    assert!(!ok && err.contains("already enrolled"), "{err}");

    let status = |rows: &serde_json::Value| rows["devices"][0]["state"].as_str().unwrap().to_string();
    let (ok, out, err) = run(vec!["status".into(), "--json".into()]).await.unwrap();
    assert!(ok, "{err}");
    let before: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(before["server"]["reachable"], true, "{before}");
    assert_eq!(before["devices"][0]["udid"], udid.as_str());
    assert_eq!(
        (status(&before), &before["devices"][0]["last_backup_unix_ms"]),
        ("due".into(), &serde_json::Value::Null)
    );

    let (ok, out, err) = run(vec!["backup".into(), "--device".into(), udid.clone(), "--json".into()]).await.unwrap();
    assert!(ok, "{err}");
    let (ok, status_out, err) = run(vec!["status".into(), "--json".into()]).await.unwrap();
    assert!(ok, "{err}");
    let after: serde_json::Value = serde_json::from_str(&status_out).unwrap();
    assert_eq!(status(&after), "idle", "backed up just now: {after}");
    assert!(after["devices"][0]["last_backup_unix_ms"].is_i64());
    let first: serde_json::Value = serde_json::from_str(&out).unwrap();
    // Each file the phone sent was read while the phone went on, through the handle it was
    // written with; after the phone is done only the agent's own Info.plist is (1), plus
    // at most the files beyond the 256 that may wait with a handle, should the chunker fall
    // that far behind on a busy machine and the phone move them first. (Read from the
    // handle's end instead of its start, every file would be.)
    let (files, read_at_end) = (first["files"].as_u64().unwrap(), first["files_read_at_end"].as_u64().unwrap());
    assert!((1..=1 + files.saturating_sub(256)).contains(&read_at_end), "{first}");
    // The phone's moves out of Snapshot/ were done a directory at a time, all but those of
    // its two manifests (into the backup directory itself, not one this backup made).
    let (moved, by_swap) = (first["files_moved"].as_u64().unwrap(), first["files_moved_by_swap"].as_u64().unwrap());
    assert!(moved > 2 && by_swap == moved - 2, "{first}");
    let snapshot = first["snapshot"].as_str().unwrap().parse().unwrap();

    // The committed snapshot, downloaded with the agent's keys, holds exactly the phone.
    let agent_state = AgentState::load(&state).unwrap();
    let client =
        Client::connect(&agent_state.server, agent_state.fingerprint().unwrap(), agent_state.refresh_auth().unwrap())
            .await
            .unwrap();
    let restored = tempfile::tempdir().unwrap();
    let dest = restored.path().join("snap");
    let db = embedded_db(&data).await;
    lifeboat_e2e::download_as_export(&client, &db, &agent_state.keys().unwrap(), snapshot, &dest).await;
    client.close().await;
    assert_eq!(iphone_backup_content(&dest), phone.expect().unwrap());
    let info: plist::Dictionary = plist::from_file(dest.join("Info.plist")).unwrap();
    assert_eq!(info["Target Identifier"].as_string(), Some(udid.as_str()));

    // A little use, then an incremental backup: the phone sends only the changes, and the
    // agent sends exactly the chunks of the backup directory the server lacks, sealed.
    let indexed_before = chunk_index(&db).await;
    let used = phone.simulate_use(0.01, 5).unwrap();
    let (ok, out, err) = run(vec!["backup".into(), "--device".into(), udid.clone(), "--json".into()]).await.unwrap();
    assert!(ok, "{err}");
    let second: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(phone.stats().last_backup_files, used.added + used.changed, "the phone made an incremental backup");
    // Into directories that hold the last backup: one rename per file.
    assert_eq!(second["files_moved"].as_u64(), Some(used.added + used.changed + 2), "{second}");
    assert_eq!(second["files_moved_by_swap"].as_u64(), Some(0), "{second}");
    let new: HashMap<ChunkId, (u64, u64)> =
        chunk_index(&db).await.into_iter().filter(|(id, _)| !indexed_before.contains_key(id)).collect();
    let mirror = state.join("mirror").join(&udid);
    let (chunks, _) = sealed_chunks(&mirror, &agent_state.keys().unwrap());
    // Every chunk of the backup directory the server did not hold is indexed now, with the
    // length its sealed blob has.
    let fresh: Vec<&ChunkId> = chunks.keys().filter(|id| !indexed_before.contains_key(*id)).collect();
    assert!(!fresh.is_empty(), "the changed files brought no new chunk after {used:?}");
    for id in fresh {
        assert_eq!(new.get(id).map(|(length, _)| *length), Some(chunks[id]), "chunk {id} of the backup directory");
    }
    // The only others are Status.plists the phone wrote over during the backup (it writes
    // one at each stage, then the final one): no more than three, each of about its size.
    let status_bytes = std::fs::metadata(mirror.join("Status.plist")).unwrap().len();
    let others: Vec<u64> =
        new.iter().filter(|(id, _)| !chunks.contains_key(*id)).map(|(_, (_, plain))| *plain).collect();
    assert!(
        others.len() <= 3 && others.iter().all(|plain| plain.abs_diff(status_bytes) <= 2),
        "new chunks not in the backup directory, by plaintext bytes: {others:?} (Status.plist: {status_bytes})"
    );
    // What the agent says it sent is exactly those chunks.
    assert_eq!(second["chunks_sent"].as_u64(), Some(new.len() as u64), "{second}");
    let new_bytes: u64 = new.values().map(|(length, _)| length).sum();
    assert_eq!(second["blob_bytes_sent"].as_u64(), Some(new_bytes), "{second}");

    // The help desk restores that snapshot onto a replacement phone of another model; the
    // phone restarts, and then holds exactly the old phone's data.
    let replacement = registry.all()[1].clone();
    assert_ne!(replacement.product_type, registry.all()[0].product_type);
    let restore_args = |credential: Option<&Path>| {
        let mut args: Vec<String> =
            vec!["restore".into(), "--device".into(), replacement.udid.clone(), "--from-device".into(), udid.clone()];
        if let Some(file) = credential {
            args.extend(["--credential".into(), file.display().to_string()]);
        }
        args.push("--json".into());
        args
    };
    // Reading a snapshot needs a person: without a help-desk credential the agent refuses
    // and says what to do; a viewer's credential is refused by the server.
    let (ok, _, err) = run(restore_args(None)).await.unwrap();
    assert!(
        !ok && err.contains("a restore reads an employee's data, so it needs a help-desk user: pass --credential FILE"),
        "{err}"
    );
    let credential_file = |role: &str| {
        let (ok, out, err) = server_cli(&data, &["user", "create", "--tenant", "acme", "--role", role, "--json"]);
        assert!(ok, "{err}");
        let user: serde_json::Value = serde_json::from_str(&out).unwrap();
        let file = dir.path().join(format!("{role}.credential"));
        std::fs::write(&file, format!("{}\n", user["credential"].as_str().unwrap())).unwrap();
        (user["id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap(), file)
    };
    let (_, viewer_file) = credential_file("viewer");
    let (ok, _, err) = run(restore_args(Some(&viewer_file))).await.unwrap();
    assert!(!ok && err.contains("restores and exports need the helpdesk or admin role"), "{err}");
    let (helpdesk, helpdesk_file) = credential_file("helpdesk");
    let (ok, out, err) = run(restore_args(Some(&helpdesk_file))).await.unwrap();
    assert!(ok, "{err}");
    let restored: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The job records who asked, and is over: the agent reads nothing more of it.
    let job: uuid::Uuid = restored["job"].as_str().unwrap().parse().unwrap();
    let row = db
        .query_one("SELECT requested_by, kind, status, target_udid FROM restore_jobs WHERE id = $1", &[&job])
        .await
        .unwrap();
    let recorded: (uuid::Uuid, String, String, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(recorded, (helpdesk, "restore".into(), "succeeded".into(), replacement.udid.clone()));
    let audited: i64 = db
        .query_one("SELECT count(*) FROM audit_events WHERE action = 'restore.start' AND actor_user = $1", &[&helpdesk])
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 1);
    assert_eq!(restored["source"], udid.as_str());
    assert_eq!(restored["snapshot"], second["snapshot"]);
    let new_phone = registry.state_by_udid(&replacement.udid).unwrap();
    assert_eq!(new_phone.expect().unwrap(), phone.expect().unwrap(), "the replacement holds the old phone's data");
    assert_eq!(new_phone.stats().restores, 1);
    assert!(new_phone.is_plugged(), "back after its restart");
    let (ok, _, err) = run(vec!["restore".into(), "--device".into(), replacement.udid.clone()]).await.unwrap();
    assert!(!ok && err.contains("--from-device"), "a restore needs a snapshot: {err}");

    // A phone that wants its passcode: the agent says so in `status` and to the server
    // (the API shows needs-passcode), and goes on once it is entered.
    let (ok, out, err) = server_cli(&data, &["user", "create", "--tenant", "acme", "--role", "viewer"]);
    assert!(ok, "{err}");
    let credential = out.split_whitespace().find(|w| w.starts_with("lbu1_")).unwrap().to_string();
    phone.require_passcode(std::time::Duration::from_secs(60));
    let backup = run(vec!["backup".into(), "--device".into(), udid.clone(), "--json".into()]);
    let mut seen_status = false;
    for _ in 0..150 {
        let (ok, out, _) = run(vec!["status".into(), "--json".into()]).await.unwrap();
        if ok && serde_json::from_str::<serde_json::Value>(&out).unwrap()["devices"][0]["state"] == "needs-passcode" {
            seen_status = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(seen_status, "status never showed needs-passcode");
    let (code, body) = lifeboat_e2e::http_get(server.http_addr, "/api/v1/devices", Some(&credential)).await.unwrap();
    assert_eq!(code, 200, "{body}");
    let devices: serde_json::Value = serde_json::from_str(&body).unwrap();
    let listed = devices.as_array().or_else(|| devices["devices"].as_array()).unwrap();
    let row = listed.iter().find(|d| d["udid"] == udid.as_str()).unwrap();
    assert_eq!(row["state"], "needs-passcode", "{row}");
    assert!(phone.waiting_for_passcode());
    phone.enter_passcode();
    let (ok, _, err) = backup.await.unwrap();
    assert!(ok, "{err}");
    assert!(err.contains("Enter the passcode on the iPhone to start the backup."), "{err}");

    // An unknown device is a clear error.
    let (ok, _, err) = run(vec!["backup".into(), "--device".into(), "00000000-0000000000000000".into()]).await.unwrap();
    assert!(!ok && err.contains("no iPhone 00000000-0000000000000000 is attached"), "{err}");
    drop(server);
}

#[test]
fn bad_configuration_and_flags_are_named_before_anything_runs() {
    let dir = tempdir();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin("lifeboat-agent"))
            .args(args)
            .env_remove("LIFEBOAT_AGENT_CONFIG")
            .env_remove("LIFEBOAT_AGENT_STATE_DIR")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let missing = dir.path().join("missing.toml");
    let (code, err) = run(&["--config", missing.to_str().unwrap(), "status"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot read configuration file") && err.contains("missing.toml"), "{err}");
    let typo = dir.path().join("agent.toml");
    std::fs::write(&typo, "max_concurent_backups = 3\n").unwrap();
    let (code, err) = run(&["--config", typo.to_str().unwrap(), "run"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown field `max_concurent_backups`"), "{err}");
    let (code, err) = run(&["--max-concurrent-backups", "0", "run"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("max_concurrent_backups must be between 1 and 64, not 0"), "{err}");
    let (code, err) = run(&["--usbmuxd", "localhost", "--state-dir", dir.path().to_str().unwrap(), "status"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not enrolled"), "an unenrolled workstation says what to do first: {err}");
    let (code, err) = run(&["backup"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--device"), "{err}");
}

/// The agent's ChangePassword reads the phone's answer (idevice's own discards it): on,
/// a wrong old password refused with the phone's 207, off, and a forced phone that may
/// not turn encryption off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_changes_a_phones_backup_password_and_hears_a_refusal() {
    use lifeboat_agent::device::{DeviceError, Provider, encryption};
    use lifeboat_shared::Secret;

    let phone_state = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config {
        seed: 4,
        devices: 1,
        profile: Profile::Tiny,
        state_dir: phone_state.path().to_path_buf(),
        kdf_rounds: 1000,
    };
    let registry = Arc::new(Registry::new(config).unwrap());
    tokio::spawn(usbmuxd::serve(listener, registry.clone()));
    let udid = registry.all()[0].udid.clone();
    let phone = registry.state_by_udid(&udid).unwrap();
    let device = Provider::find(idevice::usbmuxd::UsbmuxdAddr::TcpSocket(addr), &udid).await.unwrap();

    let password = encryption::generate_password().unwrap();
    assert!(!device.will_encrypt().await.unwrap());
    device.change_password(None, Some(&password)).await.unwrap();
    assert!(device.will_encrypt().await.unwrap());
    assert!(phone.encryption().will_encrypt());

    let wrong = Secret::new("not it".to_string());
    match device.change_password(Some(&wrong), None).await {
        Err(DeviceError::WrongBackupPassword(text)) => {
            assert_eq!(text, virtual_iphone::encryption::INVALID_PASSWORD_TEXT);
        }
        other => panic!("a wrong old password must be refused: {other:?}"),
    }
    assert!(phone.encryption().will_encrypt(), "nothing changed");
    assert_eq!(
        DeviceError::WrongBackupPassword(String::new()).reason(),
        "needs-backup-password",
        "a run that fails on it says what it needs"
    );
    device.change_password(Some(&password), None).await.unwrap();
    assert!(!device.will_encrypt().await.unwrap());

    // A profile forces encryption: on works, off is refused with the phone's error 1.
    phone.encryption().set_mdm_forced(true).unwrap();
    device.change_password(None, Some(&password)).await.unwrap();
    match device.change_password(Some(&password), None).await {
        Err(DeviceError::Refused { code: 1, description }) => {
            assert_eq!(description, virtual_iphone::encryption::FORCED_OFF_TEXT);
        }
        other => panic!("a forced phone keeps encryption on: {other:?}"),
    }
    assert!(phone.encryption().will_encrypt());
}
