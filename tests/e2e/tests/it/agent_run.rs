//! `lifeboat-agent run` — the service — and the agent's transfer guarantees, with a real
//! server process, the agent binary and virtual iPhones (`small`: 5,000 files, 199 MB):
//! first backups happen on their own; an iPhone that does not trust the computer yet shows
//! needs-trust until Trust is tapped; unplugging mid-backup fails that run as
//! device-disconnected and leaves the previous snapshot intact, and the next attach backs
//! up; an incremental backup sends only what changed; an agent killed mid-upload resumes
//! the same run without sending again what the server holds.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lifeboat_agent::net::Client;
use lifeboat_agent::pipeline::transfer;
use lifeboat_agent::state::AgentState;
use lifeboat_e2e::{
    ServerProcess, bin, have_postgres, http_get, http_post_json, iphone_backup_content, server_cli, tempdir,
    tenant_with_token,
};
use lifeboat_shared::ids::SnapshotId;
use lifeboat_shared::wire::{Request, Response};
use virtual_iphone::content::Profile;
use virtual_iphone::devices::Faults;
use virtual_iphone::{Config, Registry, usbmuxd};

/// A server, a tenant with an enrolled agent state directory, a viewer credential, and
/// virtual iPhones on an in-process usbmuxd.
/// Fields drop in order: the server stops before its directory goes.
pub(crate) struct World {
    pub(crate) server: ServerProcess,
    pub(crate) state: PathBuf,
    pub(crate) mux: String,
    pub(crate) viewer: String,
    pub(crate) helpdesk: String,
    /// A file holding `helpdesk`, for `restore|export --credential`.
    pub(crate) helpdesk_file: PathBuf,
    pub(crate) registry: Arc<Registry>,
    _phones: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

pub(crate) async fn world(server_args: &[&str], devices: u32, seed: u64) -> World {
    let dir = tempdir();
    let data = dir.path().join("data");
    let server = ServerProcess::start(&data, server_args).unwrap();
    let token = tenant_with_token(&server, "acme").unwrap();
    let (ok, out, err) = server_cli(&data, &["user", "create", "--tenant", "acme", "--role", "viewer"]);
    assert!(ok, "{err}");
    let viewer = out.split_whitespace().find(|w| w.starts_with("lbu1_")).unwrap().to_string();
    let (ok, out, err) = server_cli(&data, &["user", "create", "--tenant", "acme", "--role", "helpdesk"]);
    assert!(ok, "{err}");
    let helpdesk = out.split_whitespace().find(|w| w.starts_with("lbu1_")).unwrap().to_string();
    let helpdesk_file = dir.path().join("helpdesk.credential");
    std::fs::write(&helpdesk_file, &helpdesk).unwrap();

    let phones = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mux = listener.local_addr().unwrap().to_string();
    let config =
        Config { seed, devices, profile: Profile::Small, state_dir: phones.path().to_path_buf(), kdf_rounds: 1000 };
    let registry = Arc::new(Registry::new(config).unwrap());
    tokio::spawn(usbmuxd::serve(listener, registry.clone()));

    let state = dir.path().join("agent");
    let (ok, _, err) = agent(&state, &mux, &["enroll", &token]).await;
    assert!(ok, "{err}");
    World { server, state, mux, viewer, helpdesk, helpdesk_file, registry, _phones: phones, _dir: dir }
}

/// Runs the agent binary to completion.
pub(crate) async fn agent(state: &Path, mux: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(bin("lifeboat-agent"));
    cmd.arg("--state-dir").arg(state).args(args).env("USBMUXD_SOCKET_ADDRESS", mux).env("LIFEBOAT_LOG", "info");
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A long-running agent process whose log lines are kept.
pub(crate) struct AgentProcess {
    child: std::process::Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl AgentProcess {
    pub(crate) fn start(state: &Path, mux: &str, args: &[&str]) -> Self {
        let mut child = std::process::Command::new(bin("lifeboat-agent"))
            .arg("--state-dir")
            .arg(state)
            .args(args)
            .env("USBMUXD_SOCKET_ADDRESS", mux)
            .env("LIFEBOAT_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Self { child, log }
    }

    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn client(state: &Path) -> (Client, AgentState) {
    let s = AgentState::load(state).unwrap();
    let c = Client::connect(&s.server, s.fingerprint().unwrap(), s.refresh_auth().unwrap()).await.unwrap();
    (c, s)
}

pub(crate) async fn latest(state: &Path, udid: &str) -> Option<SnapshotId> {
    let (c, _) = client(state).await;
    let r = c.request(&Request::LatestSnapshot { udid: udid.parse().unwrap() }).await;
    c.close().await;
    match r {
        Ok(Response::Snapshot { snapshot, .. }) => Some(snapshot),
        _ => None,
    }
}

/// Polls `f` every 200 ms until it gives `Some`, at most `timeout`.
pub(crate) async fn until<T, F: Future<Output = Option<T>>>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A snapshot's files in `expect`'s format (domain, path, size, sha256).
/// (Read as a help-desk export: the server serves a snapshot only within a job.)
pub(crate) async fn snapshot_content(state: &Path, data_dir: &Path, snapshot: SnapshotId) -> Vec<String> {
    let (c, s) = client(state).await;
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("snap");
    let db = lifeboat_e2e::embedded_db(data_dir).await;
    lifeboat_e2e::download_as_export(&c, &db, &s.keys().unwrap(), snapshot, &dest).await;
    c.close().await;
    iphone_backup_content(&dest)
}

pub(crate) async fn api(w: &World, path: &str) -> serde_json::Value {
    let (code, body) = http_get(w.server.http_addr, path, Some(&w.viewer)).await.unwrap();
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

pub(crate) async fn device_state(w: &World, udid: &str) -> Option<String> {
    let devices = api(w, "/api/v1/devices").await;
    let list = devices.as_array().cloned().or_else(|| devices["devices"].as_array().cloned()).unwrap_or_default();
    list.iter().find(|d| d["udid"] == udid).and_then(|d| d["state"].as_str().map(String::from))
}

pub(crate) async fn runs(w: &World, udid: &str) -> Vec<serde_json::Value> {
    api(w, &format!("/api/v1/runs?udid={udid}")).await["runs"].as_array().cloned().unwrap_or_default()
}

/// Asserts two content listings are equal, naming the first difference (not all 5,000 lines).
pub(crate) fn same(got: &[String], want: &[String], what: &str) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(g, w)| g != w).unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: {} files, expected {}; first difference at line {first}:\n  got  {:?}\n  want {:?}",
        got.len(),
        want.len(),
        got.get(first),
        want.get(first)
    );
}

fn uuid_zero() -> &'static str {
    "00000000-0000-0000-0000-000000000000"
}

/// A counter from the server's /metrics.
pub(crate) async fn metric(w: &World, name: &str) -> f64 {
    let (code, body) = http_get(w.server.http_addr, "/metrics", None).await.unwrap();
    assert_eq!(code, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_backs_up_on_attach_asks_for_trust_survives_an_unplug_and_takes_restore_jobs() {
    if !have_postgres() {
        return;
    }
    // Every device is due again 3 s after its last backup.
    let w = world(&["--backup-interval-seconds", "3"], 2, 21).await;
    let (a, b) = (w.registry.all()[0].udid.clone(), w.registry.all()[1].udid.clone());
    let phone_a = w.registry.state_by_udid(&a).unwrap();
    let phone_b = w.registry.state_by_udid(&b).unwrap();
    // B is not plugged in yet, and will not trust this computer at first.
    w.registry.set_plugged(&b, false);
    w.registry.untrust(&b);

    let service = AgentProcess::start(
        &w.state,
        &w.mux,
        &["--retry-initial-seconds", "1", "--retry-max-seconds", "2", "--max-concurrent-backups", "2", "run"],
    );
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("{:6.1} s  {what}", t0.elapsed().as_secs_f64());

    // A is backed up on its own; the snapshot holds exactly the phone.
    let first = until(Duration::from_secs(240), "A's first snapshot", || latest(&w.state, &a)).await;
    let before_use = phone_a.expect().unwrap();
    same(&snapshot_content(&w.state, &w.server.data_dir, first).await, &before_use, "the first snapshot");

    step("first backup of A checked");
    // B arrives without trusting this computer: needs-trust, through the API and in
    // `status`, until Trust is tapped; then it is backed up.
    w.registry.set_plugged(&b, true);
    until(Duration::from_secs(60), "needs-trust in the API", || async {
        (device_state(&w, &b).await.as_deref() == Some("needs-trust")).then_some(())
    })
    .await;
    let (ok, out, err) = agent(&w.state, &w.mux, &["status", "--json"]).await;
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let row = status["devices"].as_array().unwrap().iter().find(|d| d["udid"] == b.as_str()).unwrap().clone();
    assert_eq!(row["state"], "needs-trust", "{status}");
    assert!(latest(&w.state, &b).await.is_none(), "nothing is backed up before Trust");
    step("needs-trust seen");
    w.registry.trust(&b);
    let b_snap = until(Duration::from_secs(240), "B's first snapshot", || latest(&w.state, &b)).await;
    same(
        &snapshot_content(&w.state, &w.server.data_dir, b_snap).await,
        &phone_b.expect().unwrap(),
        "B's first snapshot",
    );

    step("B backed up");
    // A slow backup of A after some use, unplugged in the middle. First A goes away, so
    // that no backup is under way while the phone is used.
    w.registry.set_plugged(&a, false);
    until(Duration::from_secs(60), "no backup of A under way", || async {
        runs(&w, &a).await.iter().all(|r| r["status"] != "running").then_some(())
    })
    .await;
    let previous = latest(&w.state, &a).await.unwrap();
    same(&snapshot_content(&w.state, &w.server.data_dir, previous).await, &before_use, "A's latest snapshot");
    phone_a.set_faults(Faults { throttle_mb_per_s: Some(1.0), ..Faults::default() });
    phone_a.simulate_use(0.05, 7).unwrap();
    step("A quiet, used");
    // The phone stages what it sends in the mirror's Snapshot directory: once another MB
    // is there (at 1 MB/s, of the use's ~10 MB), the backup is under way and far from done.
    let staging = w.state.join("mirror").join(&a).join("Snapshot");
    let staged = transfer::dir_bytes(&staging);
    w.registry.set_plugged(&a, true);
    let slow_run = until(Duration::from_secs(60), "the slow backup of A", || async {
        runs(&w, &a).await.into_iter().find(|r| r["status"] == "running").map(|r| r["id"].clone())
    })
    .await;
    until(Duration::from_secs(60), "1 MB more staged for A's backup", || async {
        (transfer::dir_bytes(&staging) >= staged + 1_000_000).then_some(())
    })
    .await;
    w.registry.set_plugged(&a, false);
    let failed = until(Duration::from_secs(60), "the unplugged run to fail", || async {
        runs(&w, &a).await.into_iter().find(|r| r["id"] == slow_run && r["status"] != "running")
    })
    .await;
    assert_eq!((failed["status"].as_str(), failed["reason"].as_str()), (Some("failed"), Some("device-disconnected")));
    assert_eq!(latest(&w.state, &a).await, Some(previous), "no snapshot from the unplugged backup");
    same(
        &snapshot_content(&w.state, &w.server.data_dir, previous).await,
        &before_use,
        "the previous snapshot after the unplug",
    );

    step("unplugged run failed, previous intact");
    // Plugged in again: backed up, with the use.
    phone_a.set_faults(Faults::default());
    w.registry.set_plugged(&a, true);
    let after = until(Duration::from_secs(240), "A's backup after the unplug", || async {
        latest(&w.state, &a).await.filter(|s| *s != previous)
    })
    .await;
    same(
        &snapshot_content(&w.state, &w.server.data_dir, after).await,
        &phone_a.expect().unwrap(),
        "A's snapshot after the unplug",
    );

    step("A backed up after the unplug");
    // The help desk asks for A's latest snapshot on B: the service restores it (B restarts)
    // and the job says so.
    let post = |who: &str, body: String| {
        let (addr, who) = (w.server.http_addr, who.to_string());
        async move { http_post_json(addr, "/api/v1/restores", Some(&who), &body).await.unwrap() }
    };
    let ask = format!(r#"{{"target_udid": "{b}", "from_device": "{a}"}}"#);
    let (code, body) = post(&w.viewer, ask.clone()).await;
    assert_eq!(code, 403, "a viewer cannot restore: {body}");
    let (code, body) =
        post(&w.helpdesk, format!(r#"{{"target_udid": "{b}", "snapshot_id": "{}"}}"#, uuid_zero())).await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = post(&w.helpdesk, format!(r#"{{"target_udid": "{b}"}}"#)).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = post(&w.helpdesk, ask.clone()).await;
    assert_eq!(code, 201, "{body}");
    let job: serde_json::Value = serde_json::from_str(&body).unwrap();
    // A's latest snapshot: `after`, or one of the (unchanged) backups made every 3 s since.
    assert_eq!((job["status"].as_str(), job["source_udid"].as_str()), (Some("queued"), Some(a.as_str())));
    let (code, body) = post(&w.helpdesk, ask).await;
    assert_eq!(code, 409, "one open restore per iPhone: {body}");
    let path = format!("/api/v1/restores/{}", job["id"].as_str().unwrap());
    let done = until(Duration::from_secs(240), "the restore job to end", || async {
        let j = api(&w, &path).await;
        (j["status"] == "succeeded" || j["status"] == "failed").then_some(j)
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(phone_b.stats().restores, 1);
    same(&phone_b.expect().unwrap(), &phone_a.expect().unwrap(), "B after the restore of A");
    // Beside it, the help-desk exports this test read snapshots through, each ended.
    let jobs = api(&w, "/api/v1/restores").await["restores"].as_array().unwrap().clone();
    let restores: Vec<_> = jobs.iter().filter(|j| j["kind"] == "restore").collect();
    assert_eq!(restores.len(), 1, "{jobs:?}");
    assert_eq!(restores[0]["requested_by"], done["requested_by"]);
    assert!(done["requested_by"].is_string(), "{done}");
    assert!(jobs.iter().all(|j| j["kind"] == "restore" || (j["kind"] == "export" && j["status"] == "succeeded")));

    step("restore job done");
    // SIGTERM stops the service promptly.
    service.signal(nix::sys::signal::Signal::SIGTERM);
    let mut service = service;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = service.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the agent did not stop; it logged:\n{}", service.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    step("stopped");
    assert!(status.success(), "{status}; it logged:\n{}", service.log());
    let log = service.log();
    assert!(log.contains("iPhone attached") && log.contains("backup committed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_backups_send_only_changes_and_a_killed_agent_resumes() {
    if !have_postgres() {
        return;
    }
    let w = world(&[], 2, 31).await;
    let (a, b) = (w.registry.all()[0].udid.clone(), w.registry.all()[1].udid.clone());
    let phone_a = w.registry.state_by_udid(&a).unwrap();
    let phone_b = w.registry.state_by_udid(&b).unwrap();
    const RECEIVED: &str = "lifeboat_ingest_received_bytes_total";

    // A full backup, ~1 % of use, an incremental one.
    let (ok, _, err) = agent(&w.state, &w.mux, &["backup", "--device", &a, "--json"]).await;
    assert!(ok, "{err}");
    let used = phone_a.simulate_use(0.01, 3).unwrap();
    let received_before = metric(&w, RECEIVED).await;
    let (ok, out, err) = agent(&w.state, &w.mux, &["backup", "--device", &a, "--json"]).await;
    assert!(ok, "{err}");
    let second: serde_json::Value = serde_json::from_str(&out).unwrap();
    let received = (metric(&w, RECEIVED).await - received_before) as u64;
    // What changed: the files the phone added or changed, and the backup's own metadata,
    // which the phone writes anew each time.
    let mirror = w.state.join("mirror").join(&a);
    let metadata: u64 = ["Manifest.db", "Manifest.plist", "Status.plist", "Info.plist"]
        .iter()
        .map(|f| std::fs::metadata(mirror.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum();
    let changed = used.added_bytes + used.changed_bytes + metadata;
    let sent = second["blob_bytes_sent"].as_u64().unwrap();
    let quic = second["quic_bytes_sent"].as_u64().unwrap();
    eprintln!(
        "changed {changed} bytes ({used:?}, metadata {metadata}); chunks sent {sent}, server received {received}, QUIC sent {quic}"
    );
    assert_eq!(sent, received, "the agent's and the server's counts of chunk bytes agree");
    assert!(sent * 100 <= changed * 105, "sent {sent} bytes of chunks for {changed} changed bytes");
    assert!(quic * 100 <= changed * 105, "{quic} bytes over QUIC for {changed} changed bytes");
    assert!(second["cached_files"].as_u64().unwrap() > 4_000, "unchanged files were not read again: {second}");
    same(
        &snapshot_content(&w.state, &w.server.data_dir, second["snapshot"].as_str().unwrap().parse().unwrap()).await,
        &phone_a.expect().unwrap(),
        "A's incremental snapshot",
    );

    // B's first backup, slowed down, killed (SIGKILL) once the server holds a good part.
    phone_b.set_faults(Faults { throttle_mb_per_s: Some(25.0), ..Faults::default() });
    let start = metric(&w, RECEIVED).await;
    let killed = AgentProcess::start(&w.state, &w.mux, &["backup", "--device", &b]);
    until(Duration::from_secs(120), "60 MB at the server", || async {
        (metric(&w, RECEIVED).await - start >= 60e6).then_some(())
    })
    .await;
    killed.signal(nix::sys::signal::Signal::SIGKILL);
    drop(killed);
    phone_b.set_faults(Faults::default());
    let (ok, out, err) = agent(&w.state, &w.mux, &["backup", "--device", &b, "--json"]).await;
    assert!(ok, "{err}");
    assert!(err.contains("resuming the interrupted run"), "{err}");
    let resumed: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The resumed run's part is what it says it sent (the agent's and the server's counts
    // agree, as above); the killed agent's is the rest of what the server received since
    // it started, however late its last packets arrived.
    let second_part = resumed["blob_bytes_sent"].as_u64().unwrap() as f64;
    let first_part = metric(&w, RECEIVED).await - start - second_part;
    let logical = resumed["logical_bytes"].as_u64().unwrap() as f64;
    eprintln!("before the kill {first_part} bytes, after {second_part}, snapshot {logical} bytes");
    assert!(first_part >= 60e6, "{first_part} bytes from the killed agent; the server had 60 MB before the kill");
    // Nothing the server held was sent again: both parts together are the snapshot once.
    assert!(first_part + second_part <= logical * 1.02, "{first_part} + {second_part} for {logical} bytes");
    assert!(second_part <= logical - first_part * 0.9, "resent what the server held");
    let runs = runs(&w, &b).await;
    assert_eq!(runs.len(), 1, "one run, resumed: {runs:?}");
    assert_eq!(runs[0]["status"], "succeeded");
    same(
        &snapshot_content(&w.state, &w.server.data_dir, resumed["snapshot"].as_str().unwrap().parse().unwrap()).await,
        &phone_b.expect().unwrap(),
        "B's resumed snapshot",
    );
}

/// `run` reports in on its own while no iPhone is attached, so the server can tell an
/// idle workstation from a dead one (`LifeboatAgentNotSeen` is judged by this).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_reports_in_every_heartbeat() {
    if !have_postgres() {
        return;
    }
    let w = world(&[], 0, 41).await;
    assert!(w.registry.all().is_empty());
    let db = lifeboat_e2e::embedded_db(&w.server.data_dir).await;
    let seen = async || -> f64 {
        db.query_one("SELECT extract(epoch FROM last_seen_at)::float8 FROM agents", &[]).await.unwrap().get(0)
    };
    let enrolled = seen().await;
    let service = AgentProcess::start(&w.state, &w.mux, &["--heartbeat-seconds", "5", "run"]);
    let mut sightings = vec![enrolled];
    let deadline = Instant::now() + Duration::from_secs(30);
    while sightings.len() < 3 {
        assert!(Instant::now() < deadline, "seen at {sightings:?}: {}", service.log());
        let now = seen().await;
        if now > *sightings.last().unwrap() {
            sightings.push(now);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The two reports after the first come one heartbeat apart.
    let gap = sightings[2] - sightings[1];
    assert!((4.0..8.0).contains(&gap), "{sightings:?}");
    let (ok, _, err) = agent(&w.state, &w.mux, &["--heartbeat-seconds", "2", "status"]).await;
    assert!(!ok && err.contains("heartbeat_seconds must be between 5 and 3600, not 2"), "{err}");
}
