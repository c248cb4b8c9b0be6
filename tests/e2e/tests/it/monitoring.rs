//! A real Prometheus scrapes a real server after successful, failed and needs-passcode
//! backups and a restore test; every dashboard panel's query returns data, every alert
//! rule parses, and the stale-device and restore-failed alerts fire.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lifeboat_agent::pipeline::transfer;
use lifeboat_e2e::{BackupContent, http_get, make_iphone_backup, server_config, skip_or_fail};
use lifeboat_server::restore::verify;
use lifeboat_server::serve;
use lifeboat_shared::wire::{DeviceState, Request, RunEnd};
use lifeboat_test_support::{free_port, spawn_stopped_on_exit, test_db};
use serde_json::Value;

use crate::ingest::{Fixture, device, open_run};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn query(prom: std::net::SocketAddr, q: &str) -> Value {
    let (status, body) = http_get(prom, &format!("/api/v1/query?query={}", encode(q)), None).await.unwrap();
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(status, 200, "query {q:?} failed: {body}");
    v
}

async fn until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every PromQL expression of every dashboard, with `$udid` replaced.
fn dashboard_queries(udid: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            for p in d["panels"].as_array().unwrap() {
                for t in p["targets"].as_array().unwrap() {
                    let expr = t["expr"].as_str().unwrap().replace("$udid", udid);
                    out.push((format!("{} / {}", d["title"].as_str().unwrap(), p["title"].as_str().unwrap()), expr));
                }
            }
        }
    }
    assert!(out.len() >= 20, "only {} panel queries found", out.len());
    out
}

fn alert_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("deploy/prometheus/lifeboat.rules.yml")).unwrap();
    let mut out = Vec::new();
    let mut name = String::new();
    for line in text.lines() {
        if let Some(n) = line.trim().strip_prefix("- alert: ") {
            name = n.to_string();
        } else if let Some(e) = line.trim().strip_prefix("expr: ") {
            out.push((name.clone(), e.to_string()));
        }
    }
    assert_eq!(out.len(), 8, "every rule of lifeboat.rules.yml");
    out
}

#[tokio::test]
async fn prometheus_scrapes_the_server_and_every_panel_and_alert_works() {
    if which("prometheus").is_none() {
        skip_or_fail("prometheus is not installed (Debian package prometheus)");
        return;
    }
    let Some(db) = test_db().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut config = server_config(&db.url, &dir.path().join("data"));
    config.fleet.restore_tests = true;
    config.fleet.refresh = Duration::from_millis(500);
    config.fleet.restore_test_interval = Duration::from_millis(500);
    let fx = Fixture { server: serve::start(config).await.unwrap(), db, _dir: dir };

    // A successful backup, a failed one, and a device waiting for its passcode.
    let tenant = fx.tenant("acme").await;
    let (client, keys) = fx.enrolled_agent(tenant).await;
    let backup = tempfile::tempdir().unwrap();
    make_iphone_backup(backup.path(), 3, BackupContent { messages: 10, contacts: 5, photos: 2 }, 100_000).unwrap();
    let ok_dev = device("00008030-0000000000000001");
    let (run, snapshot) = open_run(&client, &ok_dev).await;
    transfer::upload_dir(&client, &keys, run, snapshot, ok_dev.clone(), backup.path(), 0).await.unwrap();
    let failing = device("00008030-0000000000000002");
    let (run, _) = open_run(&client, &failing).await;
    let end = RunEnd::Failed { reason: "device-disconnected".into(), message: "unplugged".into() };
    client.request(&Request::EndRun { run, end }).await.unwrap();
    let waiting = device("00008030-0000000000000003");
    client.request(&Request::RegisterDevice { device: waiting.clone(), serial_number: None }).await.unwrap();
    let state = Request::ReportState { udid: waiting.udid.clone(), state: DeviceState::NeedsPasscode, message: None };
    client.request(&state).await.unwrap();

    // A real Prometheus, scraping every half second, evaluating our rules.
    let pdir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let prom: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let rules = repo().join("deploy/prometheus/lifeboat.rules.yml").canonicalize().unwrap();
    std::fs::write(
        pdir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 500ms\n  evaluation_interval: 500ms\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: lifeboat\n    static_configs:\n      - targets: ['{}']\n",
            rules.display(),
            fx.server.http_addr
        ),
    )
    .unwrap();
    let config_file = pdir.path().join("prometheus.yml");
    let tsdb = pdir.path().join("data");
    let _prometheus = spawn_stopped_on_exit(&[
        "prometheus",
        &format!("--config.file={}", config_file.display()),
        &format!("--storage.tsdb.path={}", tsdb.display()),
        &format!("--web.listen-address={prom}"),
    ])
    .unwrap();
    until("Prometheus is ready", Duration::from_secs(60), async || {
        http_get(prom, "/-/ready", None).await.is_ok_and(|(s, _)| s == 200)
    })
    .await;

    // Wait for the restore test of the good snapshot, then for a few scrapes after it.
    until("the restore test ran and was scraped", Duration::from_secs(60), async || {
        let v = query(prom, "lifeboat_restore_tests_total").await;
        v["data"]["result"].as_array().is_some_and(|r| !r.is_empty())
    })
    .await;
    // The job runner's gauge, as Prometheus stores it: the scrape's own `job` label wins,
    // ours becomes `exported_job` (the alert rule relies on that name).
    for job in ["fleet-gauges", "restore-tests"] {
        let expr =
            format!(r#"max by (exported_job) (lifeboat_job_last_success_timestamp_seconds{{exported_job="{job}"}})"#);
        until(&format!("the {job} job's last success was scraped"), Duration::from_secs(60), async || {
            let v = query(prom, &expr).await;
            v["data"]["result"].as_array().is_some_and(|r| r.len() == 1)
        })
        .await;
    }

    // Every panel's query gets data (rates need scrapes after the counters moved): waited
    // for, panel by panel, rather than for a guessed few seconds.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (panel, expr) in dashboard_queries(ok_dev.udid.as_str()) {
        loop {
            let v = query(prom, &expr).await;
            assert_eq!(v["status"], "success", "{panel}: {expr}: {v}");
            let result = v["data"]["result"].as_array().unwrap_or_else(|| panic!("{panel}: no result: {v}"));
            if !result.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{panel}: {expr} returned no data");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    for (alert, expr) in alert_exprs() {
        let v = query(prom, &expr).await;
        assert_eq!(v["status"], "success", "{alert}: {expr}: {v}");
    }
    let v = query(prom, r#"max(lifeboat_devices{status="needs-action"})"#).await;
    assert_eq!(v["data"]["result"][0]["value"][1], "1", "{v}");
    let v = query(prom, r#"max(lifeboat_devices{status="failing"})"#).await;
    assert_eq!(v["data"]["result"][0]["value"][1], "1", "{v}");

    // Make the good device stale, and damage its snapshot: both alerts fire.
    let pg = fx.db.client().await;
    pg.execute("UPDATE snapshots SET committed_at = now() - interval '10 days'", &[]).await.unwrap();
    let storage = fx.server.data_dir().join("storage/tenants");
    let pack = find_pack(&storage).expect("a pack");
    std::fs::remove_file(&pack).unwrap();
    let keys = fx.server.app.tenant_keys(tenant).await.unwrap();
    let report = verify::verify_snapshot(&pg, &fx.server.app.storage, &keys, &fx.server.app.scratch, snapshot, |_| {})
        .await
        .unwrap();
    assert!(!report.passed);
    verify::record(&pg, tenant, &report, std::time::SystemTime::now()).await.unwrap();

    until("LifeboatDeviceStale and LifeboatRestoreTestFailed fire", Duration::from_secs(60), async || {
        let (_, body) = http_get(prom, "/api/v1/alerts", None).await.unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        let firing: Vec<(String, String)> = v["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["state"] == "firing")
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap().to_string(),
                    a["labels"]["udid"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        firing.contains(&("LifeboatDeviceStale".into(), ok_dev.udid.to_string()))
            && firing.iter().any(|(a, _)| a == "LifeboatRestoreTestFailed")
    })
    .await;
    fx.server.stop().await.unwrap();
}

fn find_pack(dir: &Path) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()? {
        let p = e.ok()?.path();
        if p.is_dir() {
            if let Some(found) = find_pack(&p) {
                return Some(found);
            }
        } else if p.to_string_lossy().contains("/packs/") {
            return Some(p);
        }
    }
    None
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(program)).find(|p| p.is_file())
}
