//! iOS-encrypted backups end to end, with the agent binary, a server process and virtual
//! iPhones that encrypt as phones do (`kdf_rounds` 1000 so a test derives in
//! milliseconds; the counts are read from the keybag either way):
//! under a tenant policy of `required`, `lifeboat-agent run` turns encryption on for a
//! phone without a password (escrowed first) and for an MDM-forced one, and stores the
//! plaintext, which equals `expect`; a phone with a password nobody told the server is
//! needs-backup-password in the API, `status` and the metrics, until an admin enters it;
//! an incremental encrypted backup sends what an unencrypted one would; `export` writes
//! the phone's own encrypted bytes, which `iphone_backup_decrypt` opens with the revealed
//! password (or the plaintext with `--decrypted`); `restore` puts the snapshot onto
//! another phone.

use std::time::Duration;

use std::path::Path;

use lifeboat_e2e::{have_postgres, http_get, http_json, server_cli, skip_or_fail};

use crate::agent_run::{AgentProcess, World, agent, device_state, latest, same, snapshot_content, until, world};

/// The escrowed password as the operator's CLI reveals it (stdout's last line).
fn revealed(w: &World, udid: &str) -> String {
    let (ok, out, err) =
        server_cli(&w.server.data_dir, &["device", "backup-password", "--tenant", "acme", "--udid", udid]);
    assert!(ok, "{err}");
    out.lines().last().unwrap().to_string()
}

fn require_encryption(w: &World) {
    let (ok, out, err) = server_cli(&w.server.data_dir, &["tenant", "encryption", "acme", "required"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "tenant acme: backup encryption required");
}

async fn needs_action(w: &World) -> Option<f64> {
    let (_, body) = http_get(w.server.http_addr, "/metrics", None).await.unwrap();
    body.lines()
        .find(|l| l.starts_with("lifeboat_devices{") && l.contains("status=\"needs-action\"") && l.contains("acme"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_encrypts_escrows_and_asks_for_an_unknown_password() {
    if !have_postgres() {
        return;
    }
    let w = world(&[], 3, 41).await;
    require_encryption(&w);
    let (ok, out, err) = server_cli(&w.server.data_dir, &["user", "create", "--tenant", "acme", "--role", "admin"]);
    assert!(ok, "{err}");
    let admin = out.split_whitespace().find(|t| t.starts_with("lbu1_")).unwrap().to_string();
    let all = w.registry.all();
    let (plain, forced, unknown) = (all[0].udid.clone(), all[1].udid.clone(), all[2].udid.clone());
    let phone = |u: &str| w.registry.state_by_udid(u).unwrap();
    phone(&forced).encryption().set_mdm_forced(true).unwrap();
    phone(&unknown).encryption().set(Some("the user's own".into())).unwrap();
    assert!(!phone(&plain).encryption().will_encrypt() && !phone(&forced).encryption().will_encrypt());

    let service = AgentProcess::start(
        &w.state,
        &w.mux,
        &["--retry-initial-seconds", "1", "--retry-max-seconds", "2", "--max-concurrent-backups", "2", "run"],
    );
    // The phone without a password, and the forced one: encrypted with a password only
    // the server knows, backed up, the plaintext stored.
    for udid in [&plain, &forced] {
        let snapshot = until(Duration::from_secs(240), "an encrypted snapshot", || latest(&w.state, udid)).await;
        let p = phone(udid);
        assert!(p.encryption().will_encrypt(), "{udid} encrypts now");
        let password = revealed(&w, udid);
        assert_eq!(password.len(), 29, "a generated password: {password:?}");
        assert!(p.encryption().keys().is_some());
        same(
            &snapshot_content(&w.state, &w.server.data_dir, snapshot).await,
            &p.expect().unwrap(),
            "the encrypted snapshot's plaintext",
        );
        let (code, body) =
            http_get(w.server.http_addr, &format!("/api/v1/devices/{udid}/snapshots"), Some(&w.viewer)).await.unwrap();
        assert_eq!(code, 200, "{body}");
        let list: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rows = list.as_array().cloned().or_else(|| list["snapshots"].as_array().cloned()).unwrap();
        assert_eq!(rows[0]["encrypted"], true, "{list}");
        assert!(!service.log().contains(&password), "the password is never logged");
    }
    // The keychain, call history and Health, which only encrypted backups carry.
    let content = phone(&plain).expect().unwrap();
    assert!(content.iter().any(|l| l.contains("keychain-backup.plist")), "the keychain is in the snapshot");

    // A password set by someone else: needs-backup-password everywhere, nothing stored.
    until(Duration::from_secs(60), "needs-backup-password in the API", || async {
        (device_state(&w, &unknown).await.as_deref() == Some("needs-backup-password")).then_some(())
    })
    .await;
    let (ok, out, err) = agent(&w.state, &w.mux, &["status", "--json"]).await;
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let row = status["devices"].as_array().unwrap().iter().find(|d| d["udid"] == unknown.as_str()).unwrap().clone();
    assert_eq!(row["state"], "needs-backup-password", "{status}");
    until(Duration::from_secs(30), "needs-action in the metrics", || async {
        (needs_action(&w).await == Some(1.0)).then_some(())
    })
    .await;
    assert!(latest(&w.state, &unknown).await.is_none(), "nothing is backed up without the password");

    // A wrong password is refused against the keybag of the backup the phone made anyway
    // (into the mirror, nothing uploaded), and nothing is stored.
    let path = format!("/api/v1/devices/{unknown}/backup-password");
    let wrong = serde_json::json!({ "password": "a guess" }).to_string();
    let (code, text) = http_json(w.server.http_addr, "PUT", &path, Some(&admin), &wrong).await.unwrap();
    assert_eq!(code, 422, "{text}");
    let error: serde_json::Value = serde_json::from_str(&text).unwrap();
    let error = error["error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!(
            "backup password refused: it does not unlock the keybag of the backup {unknown} made on "
        )) && error.contains("nothing was stored"),
        "{error}"
    );
    let (code, text) = http_get(w.server.http_addr, &path, Some(&admin)).await.unwrap();
    assert_eq!((code, text.contains("no backup password is escrowed")), (404, true), "{text}");
    let mut cli = std::process::Command::new(lifeboat_e2e::bin("lifeboat-server"));
    cli.arg("--data-dir").arg(&w.server.data_dir).args(["--quic-listen", "127.0.0.1:0"]);
    cli.args(["device", "backup-password", "--tenant", "acme", "--udid", &unknown, "--set"]);
    let out = piped(cli, "another guess\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not unlock the keybag"), "{out:?}");

    // An admin enters the right one: checked, kept, and the next try backs the phone up.
    let body = serde_json::json!({ "password": "the user's own" }).to_string();
    let (code, text) = http_json(w.server.http_addr, "PUT", &path, Some(&admin), &body).await.unwrap();
    assert_eq!(code, 200, "{text}");
    let set: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!((set["source"].as_str(), set["verified"].as_bool()), (Some("admin"), Some(true)), "{text}");
    let snapshot =
        until(Duration::from_secs(240), "the snapshot after the password", || latest(&w.state, &unknown)).await;
    same(
        &snapshot_content(&w.state, &w.server.data_dir, snapshot).await,
        &phone(&unknown).expect().unwrap(),
        "its plaintext",
    );
    assert_eq!(revealed(&w, &unknown), "the user's own", "the agent left the user's password as it was");
    drop(service);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_snapshots_dedup_export_as_the_phone_made_them_and_restore() {
    if !have_postgres() {
        return;
    }
    let w = world(&[], 2, 43).await;
    require_encryption(&w);
    let udid = w.registry.all()[0].udid.clone();
    let target = w.registry.all()[1].udid.clone();
    w.registry.set_plugged(&target, false);
    let phone = w.registry.state_by_udid(&udid).unwrap();
    let (ok, out, err) = agent(&w.state, &w.mux, &["backup", "--device", &udid, "--json"]).await;
    assert!(ok, "{err}");
    let first: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(phone.encryption().will_encrypt());
    let used = phone.simulate_use(0.01, 3).unwrap();
    let (ok, out, err) = agent(&w.state, &w.mux, &["backup", "--device", &udid, "--json"]).await;
    assert!(ok, "{err}");
    let second: serde_json::Value = serde_json::from_str(&out).unwrap();
    let snapshot = latest(&w.state, &udid).await.unwrap();
    same(
        &snapshot_content(&w.state, &w.server.data_dir, snapshot).await,
        &phone.expect().unwrap(),
        "the incremental snapshot",
    );
    // Plaintext chunks: what changed, plus the backup's own metadata (Manifest.db
    // decrypted, a few KiB of plists), never the whole phone again.
    let mirror = w.state.join("mirror").join(&udid);
    let metadata: u64 = ["Manifest.db", "Manifest.plist", "Status.plist", "Info.plist"]
        .iter()
        .map(|f| std::fs::metadata(mirror.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum();
    let changed = used.added_bytes + used.changed_bytes + metadata;
    let sent = second["blob_bytes_sent"].as_u64().unwrap();
    eprintln!("first sent {}, changed {changed}, second sent {sent}", first["blob_bytes_sent"]);
    assert!(sent * 100 <= changed * 105, "sent {sent} bytes of chunks for {changed} bytes changed");
    assert!(second["cached_files"].as_u64().unwrap() > 4000, "{second}");

    // Export: the phone's own bytes, every file as in the mirror the phone wrote into.
    let out = tempfile::tempdir().unwrap();
    let (ok, text, err) = agent(
        &w.state,
        &w.mux,
        &["export", "--device", &udid, "--credential", path(&w.helpdesk_file), "--json", path(out.path())],
    )
    .await;
    assert!(ok, "{err}");
    let exported: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!((exported["encrypted"].as_bool(), exported["plaintext"].as_bool()), (Some(true), Some(false)));
    assert_eq!(exported["snapshot"], snapshot.to_string());
    let folder = out.path().join(&udid);
    let (mine, theirs) = (files_of(&folder), files_of(&mirror));
    assert_eq!(mine.len(), theirs.len(), "the export has the mirror's files");
    for (rel, bytes) in &mine {
        assert!(theirs.get(rel) == Some(bytes), "{rel} is not the phone's bytes");
    }
    let (ok, _, err) = agent(
        &w.state,
        &w.mux,
        &["export", "--device", &udid, "--credential", path(&w.helpdesk_file), path(out.path())],
    )
    .await;
    assert!(!ok && err.contains("exists and is not empty: export into another directory"), "{err}");
    // Opened by the reader forensic and export tools build on, with the revealed password.
    let password = revealed(&w, &udid);
    let truth = phone.expect().unwrap();
    if let Some(python) = reader_python() {
        let (code, stdout) = decrypt_with_library(&python, &folder, &password);
        assert_eq!(code, Some(0), "{stdout}");
        let sms = truth.iter().find(|l| l.starts_with("HomeDomain\tLibrary/SMS/sms.db\t")).unwrap();
        assert!(stdout.contains(&format!("sms.db {}", sms.rsplit('\t').next().unwrap())), "{stdout}\n{sms}");
        let (code, stdout) = decrypt_with_library(&python, &folder, "not the password");
        assert_eq!(code, Some(3), "a wrong password is refused: {stdout}");
    }
    // --decrypted: the plaintext, under a Manifest.plist that says it is not encrypted.
    let plain = tempfile::tempdir().unwrap();
    let (ok, _, err) = agent(
        &w.state,
        &w.mux,
        &[
            "export",
            "--snapshot",
            &snapshot.to_string(),
            "--decrypted",
            "--credential",
            path(&w.helpdesk_file),
            path(plain.path()),
        ],
    )
    .await;
    assert!(ok, "{err}");
    same(&lifeboat_e2e::iphone_backup_content(&plain.path().join(&udid)), &truth, "the decrypted export");
    let plist = plist::Value::from_file(plain.path().join(&udid).join("Manifest.plist")).unwrap();
    assert_eq!(plist.as_dictionary().unwrap().get("IsEncrypted").and_then(plist::Value::as_boolean), Some(false));

    // Restore onto another phone: it asks for the password, gets the escrowed one, and
    // ends up with exactly the source's data.
    w.registry.set_plugged(&target, true);
    let (ok, text, err) = agent(
        &w.state,
        &w.mux,
        &["restore", "--device", &target, "--from-device", &udid, "--credential", path(&w.helpdesk_file), "--json"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(text.contains(&snapshot.to_string()), "{text}");
    let restored = w.registry.state_by_udid(&target).unwrap();
    same(&restored.expect().unwrap(), &truth, "the phone restored from the encrypted snapshot");

    // A restore test checks it as fully as an unencrypted one, and what a restore needs:
    // the escrowed password unlocks the keybag and every file's key unwraps.
    let id = snapshot.to_string();
    let verify = || {
        let (ok, out, err) = server_cli(&w.server.data_dir, &["verify", "--snapshot", &id, "--json"]);
        let report: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or("null")).unwrap();
        (ok, report, err)
    };
    let (ok, report, err) = verify();
    assert!(ok, "{report}\n{err}");
    let content = phone.content().unwrap();
    let photos = {
        let db = plain.path().join(&udid).join(lifeboat_server::ios::backup_path(lifeboat_server::ios::PHOTOS_DB));
        let db = rusqlite::Connection::open(db).unwrap();
        db.query_row("SELECT count(*) FROM ZASSET", [], |r| r.get::<_, i64>(0)).unwrap()
    };
    assert_eq!(
        (&report["passed"], &report["encrypted"], &report["keychain"]),
        (&serde_json::json!(true), &serde_json::json!(true), &serde_json::json!(true)),
        "{report}"
    );
    assert_eq!(report["counts"]["messages"], i64::from(content.state.messages.len()), "{report}");
    assert_eq!(report["counts"]["contacts"], i64::from(content.state.contacts.len()), "{report}");
    assert_eq!(report["counts"]["photos"], photos, "{report}");
    assert_eq!(report["files_checked"].as_u64(), Some(mine.len() as u64), "{report}");

    // A wrong escrowed password (an admin entered one with no keybag to check it against):
    // the test fails, saying a restore would.
    set_password(&w, &udid, "not the password");
    let (ok, report, _) = verify();
    assert!(!ok && report["passed"] == false, "{report}");
    assert_eq!(
        report["problems"],
        serde_json::json!([
            "Manifest.plist: the escrowed backup password does not unlock the backup keybag: a restore would fail; an admin enters the right one"
        ])
    );
    set_password(&w, &udid, &password);

    // One pack damaged: the test fails naming the file whose chunk no longer verifies.
    let packs = lifeboat_e2e::pack_files(&w.server.data_dir.join("storage"));
    let biggest = packs.iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap();
    let mut bytes = std::fs::read(biggest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(biggest, &bytes).unwrap();
    let (ok, report, err) = verify();
    assert!(!ok && report["passed"] == false, "{report}");
    assert!(err.contains("1 of 1 snapshots failed their restore test"), "{err}");
    let named: Vec<&str> = report["problems"].as_array().unwrap().iter().filter_map(|p| p.as_str()).collect();
    assert!(
        named.iter().any(|p| p.contains(": chunk ")
            && p.contains("does not verify")
            && mine.contains_key(p.split(':').next().unwrap())),
        "{named:?}"
    );
}

/// Escrows a password as an admin at the CLI (`--set` reads it from stdin).
fn set_password(w: &World, udid: &str, password: &str) {
    let mut cli = std::process::Command::new(lifeboat_e2e::bin("lifeboat-server"));
    cli.arg("--data-dir").arg(&w.server.data_dir).args(["--quic-listen", "127.0.0.1:0"]);
    cli.args(["device", "backup-password", "--tenant", "acme", "--udid", udid, "--set"]);
    let out = piped(cli, &format!("{password}\n"));
    assert!(out.status.success(), "{out:?}");
}

/// Runs `cmd` with `input` on its stdin.
fn piped(mut cmd: std::process::Command, input: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Every file under `dir` (relative path → bytes).
fn files_of(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_str().unwrap().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The Python with `iphone_backup_decrypt` (`BACKUP_DECRYPT_PYTHON`, as `scripts/lib.sh`
/// installs it): missing is a skip locally and a failure in CI.
fn reader_python() -> Option<String> {
    let python = std::env::var("BACKUP_DECRYPT_PYTHON").unwrap_or_else(|_| "python3".into());
    let found = std::process::Command::new(&python)
        .args(["-c", "import iphone_backup_decrypt"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        skip_or_fail("iphone_backup_decrypt (python module) is not installed");
    }
    found.then_some(python)
}

/// Opens a backup folder with `iphone_backup_decrypt` and prints the sha256 of sms.db;
/// exit 3 on a wrong password.
fn decrypt_with_library(python: &str, dir: &Path, password: &str) -> (Option<i32>, String) {
    const READER: &str = r#"
import hashlib, sys
from iphone_backup_decrypt import EncryptedBackup, IncorrectPassphraseError
try:
    b = EncryptedBackup(backup_directory=sys.argv[1], passphrase=sys.argv[2])
    b.test_decryption()
except IncorrectPassphraseError as e:
    print(f"IncorrectPassphraseError: {e}")
    sys.exit(3)
print("sms.db", hashlib.sha256(b.extract_file_as_bytes("Library/SMS/sms.db", domain_like="HomeDomain")).hexdigest())
"#;
    let o = std::process::Command::new(python).args(["-c", READER, path(dir), password]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    (o.status.code(), text)
}
