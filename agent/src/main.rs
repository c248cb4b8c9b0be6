//! The `lifeboat-agent` command: `enroll` a workstation with a one-time token, `backup` an
//! attached iPhone now, `status` of the attached iPhones, `restore` a snapshot onto one.
//! The long-running service is not built yet.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lifeboat_agent::client::Client;
use lifeboat_agent::device::{self, DeviceError, Provider, version_older};
use lifeboat_agent::state::AgentState;
use lifeboat_agent::transfer;
use lifeboat_shared::manifest::DeviceInfo;
use lifeboat_shared::token::EnrollToken;
use lifeboat_shared::wire::{Auth, Request, Response, RunEnd};
use plist::Value;

/// Lifeboat agent: backs up iPhones attached to this workstation to a Lifeboat server.
#[derive(Debug, Parser)]
#[command(name = "lifeboat-agent", version)]
struct Cli {
    /// Where the agent keeps its identity, keys and local backup mirror.
    #[arg(long, global = true, env = "LIFEBOAT_AGENT_STATE_DIR", default_value = "./lifeboat-agent")]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enrol this workstation with a one-time token from `lifeboat-server token create`.
    Enroll {
        /// The `lbe1_…` token.
        token: String,
    },
    /// Restore a snapshot onto an attached iPhone (also of another model): a replacement
    /// phone gets the old one's data.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["snapshot", "from_device"])))]
    Restore {
        /// The UDID of the iPhone to restore onto.
        #[arg(long)]
        device: String,
        /// The snapshot to restore.
        #[arg(long)]
        snapshot: Option<String>,
        /// Restore the latest snapshot of this device (the old phone's UDID).
        #[arg(long)]
        from_device: Option<String>,
        /// Do not restart the iPhone afterwards.
        #[arg(long)]
        no_reboot: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The attached iPhones, their last backup and when the next is due.
    Status {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Back up an attached iPhone now (usbmuxd: the system's, or USBMUXD_SOCKET_ADDRESS).
    Backup {
        /// The iPhone's UDID.
        #[arg(long)]
        device: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LIFEBOAT_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    // quinn and idevice both use rustls: one process-wide provider, ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Enroll { token } => enroll(&cli.state_dir, &token).await,
            Command::Backup { device, json } => backup(&cli.state_dir, &device, json).await,
            Command::Status { json } => status(&cli.state_dir, json).await,
            Command::Restore { device, snapshot, from_device, no_reboot, json } => {
                restore(&cli.state_dir, &device, snapshot, from_device, !no_reboot, json).await
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

async fn enroll(state_dir: &std::path::Path, token: &str) -> anyhow::Result<()> {
    if AgentState::path(state_dir).exists() {
        anyhow::bail!("{} is already enrolled; use another --state-dir or remove it", state_dir.display());
    }
    let token = EnrollToken::decode(token)?;
    // The token is spent on first use: make sure the identity can be kept before using it.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let probe = state_dir.join(".write-test");
    std::fs::write(&probe, b"").with_context(|| format!("{} is not writable", state_dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    let auth = Auth::Enroll {
        token_secret: token.secret.to_vec(),
        hostname: hostname(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    };
    let client = Client::connect(&token.server, token.cert_sha256, auth)
        .await
        .with_context(|| format!("enrolling with {}", token.server))?;
    let accepted = client.accepted.clone();
    let enrolled = accepted.enrolled.as_ref().context("the server accepted the token but sent no keys")?;
    AgentState::new(token.server.clone(), token.cert_sha256, accepted.agent, accepted.tenant, enrolled)
        .save(state_dir)?;
    client.close().await;
    println!("enrolled as agent {} with {}; state in {}", accepted.agent, token.server, state_dir.display());
    Ok(())
}

async fn backup(state_dir: &std::path::Path, udid: &str, json: bool) -> anyhow::Result<()> {
    let state = AgentState::load(state_dir)?;
    let keys = state.keys().context("damaged keys")?;
    let auth = state.refresh_auth().context("damaged refresh secret")?;
    let fingerprint = state.fingerprint().context("damaged fingerprint")?;
    let provider = Provider::find(device::usbmuxd_addr()?, udid).await?;
    let values = provider.values().await?;
    let text = |k: &str| values.get(k).and_then(Value::as_string).unwrap_or_default().to_string();
    let info = DeviceInfo {
        udid: udid.parse().map_err(|e| anyhow::anyhow!("{udid} is not a UDID: {e}"))?,
        name: text("DeviceName"),
        product_type: text("ProductType"),
        ios_version: text("ProductVersion"),
    };
    let client = Client::connect(&state.server, fingerprint, auth)
        .await
        .with_context(|| format!("connecting to {}", state.server))?;
    let serial = Some(text("SerialNumber")).filter(|s| !s.is_empty());
    client.request(&Request::RegisterDevice { device: info.clone(), serial_number: serial }).await?;
    let (run, snapshot) = match client.request(&Request::OpenRun { udid: info.udid.clone(), resume: None }).await? {
        Response::RunOpened { run, snapshot, .. } => (run, snapshot),
        other => anyhow::bail!("the server did not open a run: {other:?}"),
    };
    eprintln!("backing up {} ({}, iOS {}) …", info.name, info.product_type, info.ios_version);
    let (started_tx, mut started) = tokio::sync::watch::channel(false);
    let mirror = state_dir.join("mirror");
    let backup = provider.backup(&mirror, &values, started_tx);
    tokio::pin!(backup);
    let local = LocalState::new(state_dir, udid);
    local.set("backing-up");
    // iOS 16.1 and later ask for the passcode before a backup starts; until the device asks
    // for its first file it is waiting for it. Say so here, to the server, and in `status`.
    let result = tokio::select! {
        r = &mut backup => r,
        () = tokio::time::sleep(PASSCODE_HINT_AFTER) => {
            let mut result = None;
            if !*started.borrow() {
                eprintln!("Enter the passcode on the iPhone to start the backup.");
                local.set("needs-passcode");
                report(&client, &info, lifeboat_shared::wire::DeviceState::NeedsPasscode, "waiting for the passcode").await;
                tokio::select! {
                    r = &mut backup => result = Some(r),
                    _ = started.wait_for(|s| *s) => {}
                }
                if result.is_none() {
                    eprintln!("passcode entered; backing up …");
                    local.set("backing-up");
                    report(&client, &info, lifeboat_shared::wire::DeviceState::BackingUp, "backing up").await;
                }
            }
            match result {
                Some(r) => r,
                None => backup.await,
            }
        }
    };
    use lifeboat_shared::wire::DeviceState as Ds;
    let dir = match result {
        Ok(dir) => dir,
        Err(e) => {
            let (local_state, server_state) =
                if matches!(e, DeviceError::Locked) { ("locked", Ds::NeedsPasscode) } else { ("failing", Ds::Failing) };
            local.finish(local_state);
            report(&client, &info, server_state, &e.to_string()).await;
            end_failed(&client, run, &e).await;
            return Err(e.into());
        }
    };
    let uploaded =
        transfer::upload_dir(&client, &keys, run, snapshot, info.clone(), &dir, transfer::now_unix_ms()).await;
    let (report_, committed) = match uploaded {
        Ok(r) => r,
        Err(e) => {
            // Say why it stopped; the chunks already sent stay on the server for the next run.
            local.finish("failing");
            report(&client, &info, Ds::Failing, &e.to_string()).await;
            let end = RunEnd::Failed { reason: "upload-failed".into(), message: e.to_string() };
            let _ = client.request(&Request::EndRun { run, end }).await;
            return Err(anyhow::Error::new(e).context("uploading the backup"));
        }
    };
    let Response::Committed { snapshot, files, logical_bytes } = committed else {
        local.finish("failing");
        anyhow::bail!("the server did not commit the snapshot: {committed:?}");
    };
    local.finish("idle");
    report(&client, &info, Ds::Idle, "backed up").await;
    client.close().await;
    let report = report_;
    if json {
        let out = serde_json::json!({
            "snapshot": snapshot.to_string(), "files": files, "logical_bytes": logical_bytes,
            "chunks": report.chunks, "chunks_sent": report.chunks_sent, "blob_bytes_sent": report.blob_bytes_sent,
        });
        println!("{out}");
    } else {
        println!(
            "snapshot {snapshot}: {files} files, {logical_bytes} bytes; sent {} of {} chunks ({} bytes)",
            report.chunks_sent, report.chunks, report.blob_bytes_sent
        );
    }
    Ok(())
}

/// How long a backup may stay silent before the agent says the iPhone wants its passcode.
const PASSCODE_HINT_AFTER: std::time::Duration = std::time::Duration::from_secs(3);

async fn report(client: &Client, info: &DeviceInfo, state: lifeboat_shared::wire::DeviceState, message: &str) {
    let req = Request::ReportState { udid: info.udid.clone(), state, message: Some(message.into()) };
    if let Err(e) = client.request(&req).await {
        tracing::warn!(device.udid = %info.udid, error = %e, "could not report the device's state");
    }
}

/// What a running `backup` says about its device, for `status` in another process:
/// `<state>/devices/<udid>.state`.
struct LocalState {
    path: PathBuf,
}

impl LocalState {
    fn new(state_dir: &std::path::Path, udid: &str) -> Self {
        Self { path: state_dir.join("devices").join(format!("{udid}.state")) }
    }

    /// A state while this process works on the device (`backing-up`, `needs-passcode`):
    /// recorded with its pid, so a killed backup does not look busy forever.
    fn set(&self, state: &str) {
        self.write(&format!("{state} {}", std::process::id()));
    }

    /// How the backup ended (`idle`, `failing`, `locked`): kept until the next one.
    fn finish(&self, state: &str) {
        self.write(state);
    }

    fn write(&self, line: &str) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = self.path.with_extension("tmp");
        if std::fs::write(&tmp, format!("{line}\n")).and_then(|()| std::fs::rename(&tmp, &self.path)).is_err() {
            tracing::warn!(path = %self.path.display(), "could not record the device's state");
        }
    }

    /// The state a backup recorded; an in-progress one whose process is gone no longer
    /// counts (`locked` reads as needs-passcode: the next backup will ask again).
    fn get(state_dir: &std::path::Path, udid: &str) -> Option<String> {
        let text = std::fs::read_to_string(Self::new(state_dir, udid).path).ok()?;
        match text.trim().split_once(' ') {
            Some((state, pid)) => std::path::Path::new("/proc").join(pid).exists().then(|| state.to_string()),
            None if text.trim() == "locked" => Some("needs-passcode".into()),
            None => Some(text.trim().to_string()),
        }
    }
}

async fn end_failed(client: &Client, run: lifeboat_shared::ids::RunId, e: &DeviceError) {
    let end = RunEnd::Failed { reason: e.reason().into(), message: e.to_string() };
    if let Err(err) = client.request(&Request::EndRun { run, end }).await {
        tracing::warn!(run.id = %run, error = %err, "could not report the failed run");
    }
}

/// Backups are due when the last successful one is older than this (the default policy).
const BACKUP_INTERVAL_MS: i64 = 24 * 3600 * 1000;

async fn status(state_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let state = AgentState::load(state_dir)?;
    let addr = device::usbmuxd_addr()?;
    let mut devices = Vec::new();
    for provider in device::attached(&addr).await? {
        // A phone unplugged since the listing shows without its values.
        let values = provider.values().await.ok();
        let udid = provider.udid.clone();
        let text =
            |k: &str| values.as_ref().and_then(|v| v.get(k)).and_then(Value::as_string).unwrap_or_default().to_string();
        devices.push((udid, text("DeviceName"), text("ProductType"), text("ProductVersion")));
    }
    // The server knows each device's last backup; without it, say so rather than guess.
    let server = match (state.fingerprint(), state.refresh_auth()) {
        (Some(fp), Some(auth)) => Client::connect(&state.server, fp, auth).await.map_err(|e| e.to_string()),
        _ => Err("damaged agent state".to_string()),
    };
    let now = transfer::now_unix_ms();
    let mut rows = Vec::new();
    for (udid, name, model, ios) in devices {
        let last = match (&server, udid.parse()) {
            (Ok(client), Ok(parsed)) => match client.request(&Request::LatestSnapshot { udid: parsed }).await {
                Ok(Response::Snapshot { created_unix_ms, .. }) => Some(created_unix_ms),
                _ => None,
            },
            _ => None,
        };
        let next_due = last.map_or(now, |t| t + BACKUP_INTERVAL_MS);
        let local = LocalState::get(state_dir, &udid).filter(|s| s != "idle");
        let state = match local.as_deref() {
            Some(s) => s.to_string(),
            None if next_due <= now => "due".into(),
            None => "idle".into(),
        };
        rows.push(serde_json::json!({
            "udid": udid, "name": name, "product_type": model, "ios_version": ios, "state": state,
            "last_backup_unix_ms": last, "next_backup_due_unix_ms": next_due,
        }));
    }
    let server_state = match &server {
        Ok(_) => serde_json::json!({"address": state.server, "reachable": true}),
        Err(e) => serde_json::json!({"address": state.server, "reachable": false, "error": e}),
    };
    if let Ok(client) = server {
        client.close().await;
    }
    if json {
        println!("{}", serde_json::json!({"agent": state.agent.to_string(), "server": server_state, "devices": rows}));
        return Ok(());
    }
    println!(
        "agent {} → {} ({})",
        state.agent,
        state.server,
        if server_state["reachable"] == true { "reachable" } else { "unreachable" }
    );
    if rows.is_empty() {
        println!("no iPhone attached");
    }
    for r in &rows {
        let last = match r["last_backup_unix_ms"].as_i64() {
            Some(ms) => format!("last backup {} min ago", (now - ms) / 60_000),
            None => "never backed up".to_string(),
        };
        println!(
            "{}  {} ({}, iOS {})  {}  {last}",
            r["udid"].as_str().unwrap_or_default(),
            r["name"].as_str().unwrap_or_default(),
            r["product_type"].as_str().unwrap_or_default(),
            r["ios_version"].as_str().unwrap_or_default(),
            r["state"].as_str().unwrap_or_default(),
        );
    }
    Ok(())
}

async fn restore(
    state_dir: &std::path::Path,
    target: &str,
    snapshot: Option<String>,
    from_device: Option<String>,
    reboot: bool,
    json: bool,
) -> anyhow::Result<()> {
    let state = AgentState::load(state_dir)?;
    let keys = state.keys().context("damaged keys")?;
    let auth = state.refresh_auth().context("damaged refresh secret")?;
    let fingerprint = state.fingerprint().context("damaged fingerprint")?;
    let addr = device::usbmuxd_addr()?;
    let provider = Provider::find(addr.clone(), target).await?;
    let values = provider.values().await?;
    let target_ios = values.get("ProductVersion").and_then(Value::as_string).unwrap_or_default().to_string();
    let client = Client::connect(&state.server, fingerprint, auth)
        .await
        .with_context(|| format!("connecting to {}", state.server))?;
    let snapshot: lifeboat_shared::ids::SnapshotId = match (snapshot, from_device) {
        (Some(id), _) => id.parse().map_err(|e| anyhow::anyhow!("{id} is not a snapshot id: {e}"))?,
        (None, Some(udid)) => {
            let parsed = udid.parse().map_err(|e| anyhow::anyhow!("{udid} is not a UDID: {e}"))?;
            match client.request(&Request::LatestSnapshot { udid: parsed }).await? {
                Response::Snapshot { snapshot, .. } => snapshot,
                other => anyhow::bail!("no snapshot of {udid}: {other:?}"),
            }
        }
        (None, None) => anyhow::bail!("say which snapshot: --snapshot ID or --from-device UDID"),
    };

    // Download and verify every chunk into a restore directory, then pre-flight.
    let root = state_dir.join("restore").join(snapshot.to_string());
    let _ = std::fs::remove_dir_all(&root);
    // The download is the phone's data in the clear: it goes, however the restore ends.
    let _cleanup = RemoveOnDrop(root.clone());
    let download = root.join("download");
    eprintln!("downloading snapshot {snapshot} …");
    let manifest =
        transfer::download_snapshot(&client, &keys, snapshot, &download).await.context("downloading the snapshot")?;
    client.close().await;
    let source = manifest.device.udid.as_str().to_string();
    if version_older(&target_ios, &manifest.device.ios_version) {
        anyhow::bail!(
            "the snapshot is from iOS {}, newer than the target's iOS {target_ios}: update the iPhone first",
            manifest.device.ios_version
        );
    }
    std::fs::rename(&download, root.join(&source)).context("preparing the restore directory")?;
    eprintln!(
        "restoring {} ({}, iOS {}) onto {target} (iOS {target_ios}) …",
        manifest.device.name, manifest.device.product_type, manifest.device.ios_version
    );
    provider.restore(&root, &source, reboot).await?;
    if reboot {
        eprintln!("the iPhone restarts …");
        device::wait_for_reboot(&addr, target, std::time::Duration::from_secs(180)).await?;
    }
    let files = manifest.files.len();
    if json {
        println!(
            "{}",
            serde_json::json!({"snapshot": snapshot.to_string(), "source": source, "target": target, "files": files, "rebooted": reboot})
        );
    } else {
        println!("restored snapshot {snapshot} of {source} onto {target}: {files} files");
    }
    Ok(())
}

/// Removes a directory tree when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
