//! Restore tests: a good snapshot passes with its counts; a corrupted or deleted pack
//! makes it fail, naming the file; results are recorded; the `verify` command says so.

use lifeboat_agent::pipeline::transfer;
use lifeboat_e2e::{BackupContent, file_id, make_iphone_backup};
use lifeboat_server::restore::verify;
use lifeboat_shared::ids::SnapshotId;

use crate::ingest::{Fixture, device, open_run, start_server};

const UDID: &str = "00008110-000C1D2E3F405162";

fn pack_files(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().contains("/packs/") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_restore_test_passes_on_a_good_snapshot_and_names_the_file_when_a_pack_is_damaged() {
    let Some(fx) = start_server().await else { return };
    let tenant = fx.tenant("acme").await;
    let (client, keys) = fx.enrolled_agent(tenant).await;
    let backup = tempfile::tempdir().unwrap();
    let content = BackupContent { messages: 120, contacts: 35, photos: 6 };
    make_iphone_backup(backup.path(), 1, content, 300_000).unwrap();
    let dev = device(UDID);
    let (run, snapshot) = open_run(&client, &dev).await;
    let (report, _) = transfer::upload_dir(&client, &keys, run, snapshot, dev, backup.path(), 0).await.unwrap();

    let db = fx.db.client().await;
    let tkeys = fx.server.app.tenant_keys(tenant).await.unwrap();
    let op = &fx.server.app.storage;
    let mut progressed = 0;
    let good =
        verify::verify_snapshot(&db, op, &tkeys, &fx.server.app.scratch, snapshot, |n| progressed += n).await.unwrap();
    assert!(good.passed, "{:?}", good.problems);
    assert_eq!(good.files_checked, report.files);
    assert_eq!(good.bytes_checked, report.logical_bytes);
    assert_eq!(progressed, report.logical_bytes);
    assert_eq!(good.counts, verify::Counts { messages: Some(120), contacts: Some(35), photos: Some(6) });
    verify::record(&db, tenant, &good, std::time::SystemTime::now()).await.unwrap();

    // Flip one byte in the middle of a pack: the chunk there no longer verifies.
    let storage = fx.server.data_dir().join("storage");
    let packs = pack_files(&storage);
    assert!(!packs.is_empty());
    let mut bytes = std::fs::read(&packs[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&packs[0], &bytes).unwrap();
    let bad = verify::verify_snapshot(&db, op, &tkeys, &fx.server.app.scratch, snapshot, |_| {}).await.unwrap();
    assert!(!bad.passed);
    let files: Vec<String> = transfer::list_files(backup.path()).unwrap();
    assert!(
        bad.problems.iter().any(|p| p.contains("does not verify") && files.iter().any(|f| p.starts_with(f.as_str()))),
        "{:?}",
        bad.problems
    );
    verify::record(&db, tenant, &bad, std::time::SystemTime::now()).await.unwrap();

    // Delete the pack: every file with a chunk in it is named.
    std::fs::remove_file(&packs[0]).unwrap();
    let gone = verify::verify_snapshot(&db, op, &tkeys, &fx.server.app.scratch, snapshot, |_| {}).await.unwrap();
    assert!(!gone.passed);
    assert!(gone.problems.iter().any(|p| p.contains("cannot be read")), "{:?}", gone.problems);
    let sms = file_id("HomeDomain", "Library/SMS/sms.db");
    if gone.problems.iter().any(|p| p.contains(&sms)) {
        assert_eq!(gone.counts.messages, None, "a damaged sms.db cannot be counted");
    }

    // The API says so, naming the damaged file.
    let (_, viewer) =
        lifeboat_server::users::create(&db, tenant, "grafana", lifeboat_server::users::Role::Viewer, None)
            .await
            .unwrap();
    let (status, body) =
        lifeboat_e2e::http_get(fx.server.http_addr, "/api/v1/restore-tests?passed=false", Some(&viewer)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let failed = &v["restore_tests"][0];
    assert_eq!(failed["passed"], false);
    assert_eq!(failed["snapshot_id"], snapshot.to_string());
    assert!(failed["problems"][0].as_str().unwrap().contains("does not verify"), "{failed}");

    let rows = db
        .query("SELECT passed, cardinality(problems), messages FROM restore_tests ORDER BY finished_at", &[])
        .await
        .unwrap();
    let seen: Vec<(bool, i32, Option<i64>)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0], (true, 0, Some(120)));
    assert!(!seen[1].0 && seen[1].1 > 0);
    fx.server.stop().await.unwrap();
}

#[tokio::test]
async fn the_verify_command_passes_and_fails_with_the_right_exit_status() {
    let Some(fx) = start_server().await else { return };
    let tenant = fx.tenant("acme").await;
    let (client, keys) = fx.enrolled_agent(tenant).await;
    let backup = tempfile::tempdir().unwrap();
    make_iphone_backup(backup.path(), 2, BackupContent { messages: 3, contacts: 2, photos: 1 }, 50_000).unwrap();
    let dev = device(UDID);
    let (run, snapshot) = open_run(&client, &dev).await;
    transfer::upload_dir(&client, &keys, run, snapshot, dev, backup.path(), 0).await.unwrap();

    let data = fx.server.data_dir().to_path_buf();
    let cli = |args: &[&str]| {
        std::process::Command::new(lifeboat_e2e::bin("lifeboat-server"))
            .env_remove("LIFEBOAT_DATABASE_URL")
            .arg("--data-dir")
            .arg(&data)
            .args(["--database-url", &fx.db.url])
            .args(args)
            .output()
            .unwrap()
    };
    let out = cli(&["verify", "--tenant", "acme", "--all", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(report["passed"], true);
    assert_eq!(report["snapshot"], snapshot.to_string());
    assert_eq!(report["counts"]["messages"], 3);

    for p in pack_files(&data.join("storage")) {
        std::fs::remove_file(p).unwrap();
    }
    let out = cli(&["verify", "--snapshot", &snapshot.to_string()]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with(&format!("FAILED {snapshot}")), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("error: 1 of 1 snapshots failed their restore test"));
    let out = cli(&["verify", "--tenant", "acme"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("say what to verify"));
    let out = cli(&["verify", "--tenant", "nobody", "--all"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("error: no tenant named \"nobody\""));
    fx.server.stop().await.unwrap();
}

#[tokio::test]
async fn restore_test_results_show_what_the_backup_holds_beside_the_previous_snapshot() {
    let Some(fx) = start_server().await else { return };
    let tenant = fx.tenant("acme").await;
    let (client, keys) = fx.enrolled_agent(tenant).await;
    let db = fx.db.client().await;
    let tkeys = fx.server.app.tenant_keys(tenant).await.unwrap();
    let dev = device(UDID);
    for (seed, messages) in [(4u64, 10i64), (5, 25)] {
        let backup = tempfile::tempdir().unwrap();
        make_iphone_backup(backup.path(), seed, BackupContent { messages, contacts: 3, photos: 1 }, 10_000).unwrap();
        let (run, snapshot) = open_run(&client, &dev).await;
        transfer::upload_dir(&client, &keys, run, snapshot, dev.clone(), backup.path(), 0).await.unwrap();
        let report =
            verify::verify_snapshot(&db, &fx.server.app.storage, &tkeys, &fx.server.app.scratch, snapshot, |_| {})
                .await
                .unwrap();
        assert!(report.passed, "{:?}", report.problems);
        verify::record(&db, tenant, &report, std::time::SystemTime::now()).await.unwrap();
    }
    let (_, viewer) =
        lifeboat_server::users::create(&db, tenant, "desk", lifeboat_server::users::Role::Viewer, None).await.unwrap();
    let path = format!("/api/v1/restore-tests?udid={UDID}");
    let (status, body) = lifeboat_e2e::http_get(fx.server.http_addr, &path, Some(&viewer)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let tests = v["restore_tests"].as_array().unwrap();
    assert_eq!(tests.len(), 2);
    assert_eq!(tests[0]["counts"]["messages"], 25);
    assert_eq!(tests[0]["previous_counts"]["messages"], 10);
    assert_eq!(tests[1]["counts"]["messages"], 10);
    assert_eq!(tests[1]["previous_counts"]["messages"], serde_json::Value::Null);
    fx.server.stop().await.unwrap();
}

/// How many restore tests `snapshot` has had (`passed` ones only, if asked).
async fn tests_of(fx: &Fixture, snapshot: SnapshotId, passed_only: bool) -> i64 {
    let passed = if passed_only { " AND passed" } else { "" };
    fx.count(&format!("SELECT count(*) FROM restore_tests WHERE snapshot_id = '{snapshot}'{passed}")).await
}

/// Waits (30 s at most) until the background runner has tested `snapshot`.
async fn until_tested(fx: &Fixture, snapshot: SnapshotId, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while tests_of(fx, snapshot, false).await == 0 {
        assert!(std::time::Instant::now() < deadline, "the runner did not test {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Makes `snapshot` look committed `days` ago.
async fn age(db: &tokio_postgres::Client, snapshot: SnapshotId, days: i32) {
    let sql = "UPDATE snapshots SET committed_at = now() - make_interval(days => $2) WHERE id = $1";
    assert_eq!(db.execute(sql, &[&snapshot.0, &days]).await.unwrap(), 1, "snapshot {snapshot}");
}

#[tokio::test]
async fn the_background_runner_tests_sampled_snapshots_at_once_and_the_others_on_schedule() {
    let Some(db) = lifeboat_test_support::test_db().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut config = lifeboat_e2e::server_config(&db.url, &dir.path().join("data"));
    config.fleet.restore_tests = true;
    config.fleet.restore_test_interval = std::time::Duration::from_millis(200);
    config.fleet.restore_test_sample_percent = 0;
    let fx = Fixture { server: lifeboat_server::serve::start(config).await.unwrap(), db, _dir: dir };
    let tenant = fx.tenant("acme").await;
    let (client, keys) = fx.enrolled_agent(tenant).await;
    let backup = tempfile::tempdir().unwrap();
    make_iphone_backup(backup.path(), 6, BackupContent { messages: 1, contacts: 1, photos: 1 }, 10_000).unwrap();
    let dev = device(UDID);
    // The snapshot under test, then two witnesses. The runner takes snapshots newest
    // first, so a pass that tests a witness older than the snapshot has looked at the
    // snapshot before, and tested it then if it was due.
    let mut snapshots = Vec::new();
    for _ in 0..3 {
        let (run, snapshot) = open_run(&client, &dev).await;
        transfer::upload_dir(&client, &keys, run, snapshot, dev.clone(), backup.path(), 0).await.unwrap();
        snapshots.push(snapshot);
    }
    let (snapshot, first_witness, second_witness) = (snapshots[0], snapshots[1], snapshots[2]);
    let pg = fx.db.client().await;

    // Not sampled: not tested while it is new, though a pass went past it to an old witness.
    age(&pg, first_witness, 9).await;
    until_tested(&fx, first_witness, "the first witness, 9 days old").await;
    assert_eq!(tests_of(&fx, snapshot, false).await, 0, "a new snapshot outside the sample was tested");
    // Once older than the window, it is tested, and it passes.
    age(&pg, snapshot, 8).await;
    until_tested(&fx, snapshot, "the snapshot once 8 days old").await;
    assert_eq!(tests_of(&fx, snapshot, true).await, 1, "the snapshot's test passed");
    // Tested within the window: not tested again. The second witness, aged only now, is
    // tested by a pass that began after the snapshot's test, and that pass would have
    // come to the (newer) snapshot first.
    age(&pg, second_witness, 10).await;
    until_tested(&fx, second_witness, "the second witness, 10 days old").await;
    assert_eq!(tests_of(&fx, snapshot, false).await, 1, "the snapshot was tested again within the window");
    assert_eq!(fx.count("SELECT count(*) FROM restore_tests").await, 3);
    let (_, metrics) = lifeboat_e2e::http_get(fx.server.http_addr, "/metrics", None).await.unwrap();
    assert!(metrics.contains("lifeboat_restore_tests_total{result=\"passed\"} 3"), "{metrics}");
    fx.server.stop().await.unwrap();
}
