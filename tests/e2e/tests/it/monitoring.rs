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

/// Every PromQL expression of every dashboard, with `$udid` replaced and every tenant.
fn dashboard_queries(udid: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            for p in d["panels"].as_array().unwrap() {
                for t in p["targets"].as_array().unwrap() {
                    let expr = t["expr"].as_str().unwrap().replace("$udid", udid).replace("$tenant", ".*");
                    out.push((format!("{} / {}", d["title"].as_str().unwrap(), p["title"].as_str().unwrap()), expr));
                }
            }
        }
    }
    assert!(out.len() >= 20, "only {} panel queries found", out.len());
    out
}

/// Each rule's name and expression: `expr: …` on one line, or `expr: >-` folding the
/// more-indented lines after it into one.
fn alert_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("deploy/prometheus/lifeboat.rules.yml")).unwrap();
    let mut out = Vec::new();
    let mut name = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let indent = line.len() - line.trim_start().len();
        if let Some(n) = line.trim().strip_prefix("- alert: ") {
            name = n.to_string();
        } else if line.trim() == "expr: >-" {
            let mut folded = Vec::new();
            while let Some(next) = lines.next_if(|l| l.len() - l.trim_start().len() > indent) {
                folded.push(next.trim());
            }
            out.push((name.clone(), folded.join(" ")));
        } else if let Some(e) = line.trim().strip_prefix("expr: ") {
            out.push((name.clone(), e.to_string()));
        }
    }
    assert_eq!(out.len(), 15, "every rule of lifeboat.rules.yml");
    assert!(out.iter().all(|(_, e)| !e.is_empty() && !e.starts_with('>')), "{out:?}");
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

    // Pending: each rule waits its `for:` before it fires.
    until(
        "LifeboatDeviceStale and LifeboatLatestBackupUnrestorable are pending",
        Duration::from_secs(60),
        async || {
            let (_, body) = http_get(prom, "/api/v1/alerts", None).await.unwrap();
            let v: Value = serde_json::from_str(&body).unwrap();
            let firing: Vec<(String, String)> = v["data"]["alerts"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["state"] == "pending" || a["state"] == "firing")
                .map(|a| {
                    (
                        a["labels"]["alertname"].as_str().unwrap().to_string(),
                        a["labels"]["udid"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect();
            firing.contains(&("LifeboatDeviceStale".into(), ok_dev.udid.to_string()))
                && firing.iter().any(|(a, _)| a == "LifeboatRestoreTestFailed")
                && firing.iter().any(|(a, _)| a == "LifeboatLatestBackupUnrestorable")
        },
    )
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

/// The value of one series in the server's /metrics text, by its exact label text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes the server at `addr` until `series` is `want` (the fleet gauges refresh on
/// their own clock); the /metrics text that showed it.
async fn until_metric(addr: std::net::SocketAddr, series: &str, want: f64) -> String {
    let mut text = String::new();
    for _ in 0..150 {
        text = http_get(addr, "/metrics", None).await.unwrap().1;
        if metric(&text, series) == Some(want) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{series} never became {want}: {text}");
}

/// A server on a test database with no restore tests and fleet gauges refreshed every
/// 200 ms, after `adjust` changed its configuration.
async fn fleet_server(adjust: impl FnOnce(&mut lifeboat_server::config::Config)) -> Option<Fixture> {
    let db = test_db().await?;
    let dir = tempfile::tempdir().unwrap();
    let mut config = server_config(&db.url, &dir.path().join("data"));
    config.fleet.refresh = Duration::from_millis(200);
    config.fleet.restore_tests = false;
    adjust(&mut config);
    Some(Fixture { server: serve::start(config).await.unwrap(), db, _dir: dir })
}

/// How long a phone has waited for its user is measured from when it began to wait:
/// the agent's retries (backing-up, needs-passcode again) do not reset it, the next
/// successful backup ends it. A phone that never backed up exports when it was first
/// seen, and the server exports its own thresholds for the alert rules.
#[tokio::test]
async fn needs_action_is_measured_across_retries_and_thresholds_are_exported() {
    let Some(fx) = fleet_server(|c| c.fleet.stale_after = Duration::from_secs(5 * 3600)).await else { return };
    let tenant = fx.tenant("acme").await;
    let (client, keys) = fx.enrolled_agent(tenant).await;
    let phone = device("00008030-0000000000000009");
    client.request(&Request::RegisterDevice { device: phone.clone(), serial_number: None }).await.unwrap();
    let pg = fx.db.client().await;
    let report = async |state: DeviceState| {
        let req = Request::ReportState { udid: phone.udid.clone(), state, message: None };
        client.request(&req).await.unwrap();
        let row = pg
            .query_one(
                "SELECT extract(epoch FROM needs_action_since)::float8, extract(epoch FROM state_changed_at)::float8, \
                 extract(epoch FROM first_seen_at)::float8 FROM devices WHERE udid = $1",
                &[&phone.udid.as_str()],
            )
            .await
            .unwrap();
        (row.get::<_, Option<f64>>(0), row.get::<_, f64>(1), row.get::<_, f64>(2))
    };
    let (since, changed, first_seen) = report(DeviceState::NeedsPasscode).await;
    let since = since.expect("waiting since it asked for its passcode");
    // Retries: the state and its change time move, the waiting does not start over.
    for state in [DeviceState::BackingUp, DeviceState::NeedsPasscode, DeviceState::Failing, DeviceState::NeedsTrust] {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (again, moved, _) = report(state).await;
        assert_eq!(again, Some(since), "{state:?} kept the start of the wait");
        assert!(moved > changed, "{state:?} moved state_changed_at");
    }
    // The server's /metrics says so, with the thresholds the rules compare against.
    let udid = phone.udid.as_str();
    let labels = format!(r#"{{tenant="acme",udid="{udid}"}}"#);
    let waiting_since = format!("lifeboat_device_needs_action_since_timestamp_seconds{labels}");
    let text = until_metric(fx.server.http_addr, &waiting_since, since).await;
    assert_eq!(metric(&text, &format!("lifeboat_device_first_seen_timestamp_seconds{labels}")), Some(first_seen));
    assert_eq!(
        metric(&text, &format!("lifeboat_device_last_success_timestamp_seconds{labels}")),
        None,
        "never backed up"
    );
    assert_eq!(metric(&text, r#"lifeboat_devices{status="needs-action",tenant="acme"}"#), Some(1.0));
    assert_eq!(metric(&text, "lifeboat_stale_after_seconds"), Some(5.0 * 3600.0));
    assert_eq!(metric(&text, "lifeboat_needs_action_after_seconds"), Some(4.0 * 3600.0));
    // Backed up (the agent reports idle): the wait is over.
    let (ended, _, _) = report(DeviceState::Idle).await;
    assert_eq!(ended, None);
    until_metric(fx.server.http_addr, &waiting_since, 0.0).await;
    // A committed snapshot ends a wait too, even if the agent never reports idle.
    let (waiting, _, _) = report(DeviceState::NeedsTrust).await;
    assert!(waiting.is_some());
    let tree = tempfile::tempdir().unwrap();
    lifeboat_e2e::make_tree(tree.path(), 3, 1 << 16, 5).unwrap();
    let (run, snapshot) = open_run(&client, &phone).await;
    transfer::upload_dir(&client, &keys, run, snapshot, phone.clone(), tree.path(), 0).await.unwrap();
    let row = pg.query_one("SELECT needs_action_since FROM devices WHERE udid = $1", &[&phone.udid.as_str()]).await;
    assert_eq!(row.unwrap().get::<_, Option<std::time::SystemTime>>(0), None);
    fx.server.stop().await.unwrap();
}

/// The example Alertmanager configuration, in a real Alertmanager: pages and tickets go
/// to their receivers; a tenant's fleet-wide failure inhibits its per-device tickets (not
/// another tenant's); the server down inhibits every other Lifeboat alert.
#[tokio::test]
async fn alertmanager_routes_pages_and_tickets_and_inhibits_the_rest_while_the_server_is_down() {
    let Some(binary) = which("prometheus-alertmanager").or_else(|| which("alertmanager")) else {
        skip_or_fail("alertmanager is not installed (Debian package prometheus-alertmanager)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = repo().join("deploy/prometheus/alertmanager.example.yml");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port().unwrap()).parse().unwrap();
    let _am = spawn_stopped_on_exit(&[
        binary.to_str().unwrap(),
        &format!("--config.file={}", config.display()),
        &format!("--storage.path={}", dir.path().display()),
        &format!("--web.listen-address={addr}"),
        "--cluster.listen-address=",
    ])
    .unwrap();
    until("Alertmanager is ready", Duration::from_secs(30), async || {
        http_get(addr, "/-/ready", None).await.is_ok_and(|(s, _)| s == 200)
    })
    .await;
    let post = async |alerts: Value| {
        let (status, body) =
            lifeboat_e2e::http_post_json(addr, "/api/v2/alerts", None, &alerts.to_string()).await.unwrap();
        assert_eq!(status, 200, "{body}");
    };
    let alert = |name: &str, severity: &str, tenant: &str, udid: &str| serde_json::json!({ "labels": { "alertname": name, "severity": severity, "tenant": tenant, "udid": udid } });
    // (alertname, tenant) → (state, receivers).
    let states = async || -> std::collections::BTreeMap<(String, String), (String, Vec<String>)> {
        let (_, body) = http_get(addr, "/api/v2/alerts", None).await.unwrap();
        let list: Value = serde_json::from_str(&body).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let l = &a["labels"];
                let receivers = a["receivers"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().into());
                (
                    (l["alertname"].as_str().unwrap().into(), l["tenant"].as_str().unwrap_or("").into()),
                    (a["status"]["state"].as_str().unwrap().into(), receivers.collect()),
                )
            })
            .collect()
    };
    let entry = |state: &str, receiver: &str| (state.to_string(), vec![receiver.to_string()]);
    let key = |a: &str, t: &str| (a.to_string(), t.to_string());

    post(serde_json::json!([
        alert("LifeboatFleetBackupsFailing", "page", "acme", ""),
        alert("LifeboatBackupsFailing", "ticket", "acme", "A"),
        alert("LifeboatBackupsFailing", "ticket", "globex", "G"),
    ]))
    .await;
    until("the three alerts are in", Duration::from_secs(30), async || states().await.len() == 3).await;
    let seen = states().await;
    assert_eq!(seen[&key("LifeboatFleetBackupsFailing", "acme")], entry("active", "oncall-pager"));
    assert_eq!(seen[&key("LifeboatBackupsFailing", "acme")], entry("suppressed", "helpdesk-tickets"));
    assert_eq!(seen[&key("LifeboatBackupsFailing", "globex")], entry("active", "helpdesk-tickets"));

    post(serde_json::json!([
        { "labels": { "alertname": "LifeboatServerDown", "severity": "page", "job": "lifeboat" } },
        alert("LifeboatDeviceStale", "ticket", "globex", "G"),
    ]))
    .await;
    until("the five alerts are in", Duration::from_secs(30), async || states().await.len() == 5).await;
    let seen = states().await;
    assert_eq!(seen[&key("LifeboatServerDown", "")], entry("active", "oncall-pager"));
    for (name, tenant) in [
        ("LifeboatFleetBackupsFailing", "acme"),
        ("LifeboatBackupsFailing", "acme"),
        ("LifeboatBackupsFailing", "globex"),
        ("LifeboatDeviceStale", "globex"),
    ] {
        assert_eq!(seen[&key(name, tenant)].0, "suppressed", "{name} {tenant} while the server is down: {seen:?}");
    }
}

/// What is wrong with a dashboard for a 500-phone fleet, or how it breaks on import:
/// table panels must run instant queries formatted as a table (a range query gives a
/// row per sample), stats and gauges need thresholds (Grafana's default is red at 80),
/// a `dateTime*` unit wants milliseconds (`* 1000`) and `s` wants seconds, every query
/// goes through the `$datasource` variable, which `__inputs` lets a UI import choose.
fn dashboard_problems(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let title = d["title"].as_str().unwrap_or("?");
    let inputs = d["__inputs"].as_array().map(|i| i.iter().any(|i| i["name"] == "DS_PROMETHEUS"));
    if inputs != Some(true) {
        out.push(format!("{title}: no __inputs entry DS_PROMETHEUS"));
    }
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .map(|l| l.iter().filter_map(|v| v["name"].as_str()).collect())
        .unwrap_or_default();
    for v in ["datasource", "tenant"] {
        if !vars.contains(&v) {
            out.push(format!("{title}: no ${v} variable"));
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["name"] == "udid"
            && !v["definition"].as_str().unwrap_or("").contains("lifeboat_device_first_seen_timestamp_seconds")
        {
            out.push(format!("{title}: the device picker misses devices that never backed up"));
        }
    }
    for p in d["panels"].as_array().into_iter().flatten() {
        let name = format!("{title} / {}", p["title"].as_str().unwrap_or("?"));
        let kind = p["type"].as_str().unwrap_or("");
        let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("");
        if p["datasource"]["uid"] != "${datasource}" {
            out.push(format!("{name}: data source is not $datasource"));
        }
        if matches!(kind, "stat" | "gauge" | "bargauge")
            && p["fieldConfig"]["defaults"]["thresholds"]["steps"].as_array().is_none_or(|s| s.is_empty())
        {
            out.push(format!("{name}: a {kind} without thresholds"));
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or("");
            if t["datasource"]["uid"] != "${datasource}" {
                out.push(format!("{name}: a query's data source is not $datasource"));
            }
            if kind == "table" && (t["instant"] != true || t["format"] != "table") {
                out.push(format!("{name}: a table whose query is not instant with format table"));
            }
            let in_ms = expr.trim_end().ends_with("* 1000");
            if unit.starts_with("dateTime") && !in_ms {
                out.push(format!("{name}: unit {unit} wants milliseconds, the query gives seconds"));
            }
            if unit == "s" && in_ms {
                out.push(format!("{name}: unit s, but the query gives milliseconds"));
            }
        }
    }
    out
}

#[test]
fn every_shipped_dashboard_has_instant_tables_thresholds_right_units_and_inputs() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            assert_eq!(dashboard_problems(&d), Vec::<String>::new(), "{}", path.display());
            checked += 1;
        }
    }
    assert_eq!(checked, 4);
}

#[test]
fn the_dashboard_check_finds_range_tables_bare_stats_and_seconds_shown_as_dates() {
    let ds = serde_json::json!({ "type": "prometheus", "uid": "${datasource}" });
    let d = serde_json::json!({
        "title": "T",
        "templating": { "list": [{ "name": "udid", "definition": "label_values(lifeboat_device_last_success_timestamp_seconds, udid)" }] },
        "panels": [
            { "title": "table", "type": "table", "datasource": ds,
              "targets": [{ "expr": "up", "datasource": ds }] },
            { "title": "stat", "type": "stat", "datasource": { "uid": "lifeboat-prometheus" },
              "fieldConfig": { "defaults": { "unit": "dateTimeFromNow" } },
              "targets": [{ "expr": "max(lifeboat_device_needs_action_since_timestamp_seconds)", "datasource": ds }] },
            { "title": "age", "type": "timeseries", "datasource": ds,
              "fieldConfig": { "defaults": { "unit": "s" } },
              "targets": [{ "expr": "time() * 1000", "datasource": { "uid": "x" } }] },
        ],
    });
    assert_eq!(
        dashboard_problems(&d),
        [
            "T: no __inputs entry DS_PROMETHEUS",
            "T: no $datasource variable",
            "T: no $tenant variable",
            "T: the device picker misses devices that never backed up",
            "T / table: a table whose query is not instant with format table",
            "T / stat: data source is not $datasource",
            "T / stat: a stat without thresholds",
            "T / stat: unit dateTimeFromNow wants milliseconds, the query gives seconds",
            "T / age: a query's data source is not $datasource",
            "T / age: unit s, but the query gives milliseconds",
        ]
    );
}

/// At 10,000 devices the per-device series switch themselves off (`auto`) and /metrics
/// stays under 100 KB, the fleet gauges still counting every device; and reasons an
/// agent makes up are counted as `other`, so 1,000 of them add one series, not 1,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_stay_bounded_at_ten_thousand_devices_and_a_thousand_reasons() {
    let Some(fx) = fleet_server(|_| {}).await else { return };
    let tenant = fx.tenant("acme").await;
    let (client, _) = fx.enrolled_agent(tenant).await;
    let addr = fx.server.http_addr;
    let scrape = async || http_get(addr, "/metrics", None).await.unwrap().1;

    // A few devices: per-device series on.
    let dev = device("00008030-0000000000000001");
    let (run, _) = open_run(&client, &dev).await;
    client
        .request(&Request::EndRun {
            run,
            end: RunEnd::Failed { reason: "device-disconnected".into(), message: String::new() },
        })
        .await
        .unwrap();
    until_metric(addr, "lifeboat_per_device_series", 1.0).await;
    // 1,000 reasons nobody knows: one `other` series.
    for i in 0..1000 {
        let (run, _) = open_run(&client, &dev).await;
        let end = RunEnd::Failed { reason: format!("made-up-{i}"), message: String::new() };
        client.request(&Request::EndRun { run, end }).await.unwrap();
    }
    let text = scrape().await;
    let runs: Vec<&str> = text.lines().filter(|l| l.starts_with("lifeboat_backup_runs_total{")).collect();
    assert_eq!(
        runs,
        [
            r#"lifeboat_backup_runs_total{reason="device-disconnected",result="failed"} 1"#,
            r#"lifeboat_backup_runs_total{reason="other",result="failed"} 1000"#,
        ]
    );

    // 10,000 devices: `auto` turns the per-device series off.
    let pg = fx.db.client().await;
    pg.execute(
        "INSERT INTO devices (tenant_id, udid) \
         SELECT $1, '00009000-' || lpad(to_hex(g), 16, '0') FROM generate_series(1, 10000) g",
        &[&tenant.0],
    )
    .await
    .unwrap();
    until_metric(addr, "lifeboat_per_device_series", 0.0).await;
    let text = until_metric(addr, r#"lifeboat_devices{status="stale",tenant="acme"}"#, 10_000.0).await;
    assert!(text.len() < 100_000, "/metrics is {} bytes at 10,000 devices", text.len());
    assert_eq!(metric(&text, r#"lifeboat_devices{status="failing",tenant="acme"}"#), Some(1.0));
    assert!(!text.contains("udid="), "no per-device series");
    assert!(!text.contains("agent=\""), "no per-agent series");
    fx.server.stop().await.unwrap();
}

/// `--metrics-listen`: /metrics moves to a listener of its own and leaves the API's.
#[tokio::test]
async fn metrics_can_have_a_listener_of_their_own() {
    let Some(fx) = fleet_server(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await else { return };
    let metrics = fx.server.metrics_addr.expect("a metrics listener");
    assert_ne!(metrics, fx.server.http_addr);
    let (status, body) = http_get(metrics, "/metrics", None).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("lifeboat_build_info{"), "{body}");
    assert_eq!(http_get(fx.server.http_addr, "/metrics", None).await.unwrap().0, 404);
    assert_eq!(http_get(metrics, "/api/v1/devices", None).await.unwrap().0, 404, "no API there");
    assert_eq!(http_get(fx.server.http_addr, "/readyz", None).await.unwrap().0, 200);
    fx.server.stop().await.unwrap();
}
