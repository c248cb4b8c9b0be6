//! The `lifeboat-agent` command: `enroll` a workstation with a one-time token, `run` the
//! service that backs up every iPhone attached, `backup` one now, `status` of the
//! attached iPhones, `restore` a snapshot onto one, `export` one as a backup folder.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lifeboat_agent::config::{Config, Overrides};
use lifeboat_agent::device::{self, Provider};
use lifeboat_agent::job::service;
use lifeboat_agent::job::{self, Agent, LocalState};
use lifeboat_agent::net::Client;
use lifeboat_agent::pipeline::transfer;
use lifeboat_agent::progress::{Phase, Progress};
use lifeboat_agent::state::AgentState;
use lifeboat_shared::token::EnrollToken;
use lifeboat_shared::wire::{Auth, JobRequest, JobSource, Request, Response};
use plist::Value;

/// Lifeboat agent: backs up iPhones attached to this workstation to a Lifeboat server.
#[derive(Debug, Parser)]
#[command(name = "lifeboat-agent", version)]
struct Cli {
    #[command(flatten)]
    settings: Overrides,
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
    /// The service: back up every iPhone attached to this workstation whenever it is due
    /// (the server's policy: by default when its last backup is older than a day), retry
    /// failures, resume interrupted uploads. Stops on Ctrl-C or SIGTERM.
    Run,
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
        /// A file holding your help-desk API credential: a restore reads an employee's
        /// data, so the server checks who asks and records it as the job's creator.
        #[arg(long, env = "LIFEBOAT_CREDENTIAL_FILE")]
        credential: Option<std::path::PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot as a standard Finder/iTunes backup folder, DIR/<UDID>/: an
    /// encrypted backup exactly as the phone encrypted it (it opens with the escrowed
    /// password), or with --decrypted as plaintext.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["snapshot", "device"])))]
    Export {
        /// The snapshot to export.
        #[arg(long)]
        snapshot: Option<String>,
        /// Export the latest snapshot of this device (its UDID).
        #[arg(long)]
        device: Option<String>,
        /// Write the files of an encrypted backup in the clear.
        #[arg(long)]
        decrypted: bool,
        /// A file holding your help-desk API credential (an export reads an employee's
        /// data: the server checks who asks and records it as the job's creator).
        #[arg(long, env = "LIFEBOAT_CREDENTIAL_FILE")]
        credential: Option<std::path::PathBuf>,
        /// Print the result as JSON (and no progress bar).
        #[arg(long)]
        json: bool,
        /// The directory to write DIR/<UDID>/ into.
        dir: std::path::PathBuf,
    },
    /// The attached iPhones, their state, last backup and when the next is due.
    Status {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Back up an attached iPhone now, with a progress bar.
    Backup {
        /// The iPhone's UDID.
        #[arg(long)]
        device: String,
        /// Print the result as JSON (and no progress bar).
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.settings) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // idevice warns about what is normal (no Status.plist before a first backup).
    let default_log = if matches!(cli.command, Command::Run) { "info,idevice=error" } else { "warn,idevice=error" };
    let filter = config
        .log
        .as_deref()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| default_log.into());
    // idevice logs every plist it sends at debug level, a restore's Password included:
    // whatever the filter asks, nothing of idevice's below info is ever written.
    let secrets_out = tracing_subscriber::filter::filter_fn(|m| {
        !(m.target().starts_with("idevice") && *m.level() > tracing::Level::INFO)
    });
    {
        use tracing_subscriber::Layer as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_filter(filter)
                    .with_filter(secrets_out),
            )
            .init();
    }
    // quinn and idevice both use rustls: one process-wide provider, ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let state_dir = config.state_dir.clone();
    let result = rt.block_on(async {
        match cli.command {
            Command::Enroll { token } => enroll(&state_dir, &token).await,
            Command::Run => run(&config).await,
            Command::Backup { device, json } => backup(&config, &device, json).await,
            Command::Status { json } => status(&config, json).await,
            Command::Restore { device, snapshot, from_device, no_reboot, credential, json } => {
                restore(&config, &device, snapshot, from_device, !no_reboot, credential.as_deref(), json).await
            }
            Command::Export { snapshot, device, decrypted, credential, json, dir } => {
                export(&config, snapshot, device, decrypted, credential.as_deref(), json, &dir).await
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

async fn run(config: &Config) -> anyhow::Result<()> {
    let agent = Arc::new(Agent::load(&config.state_dir, config.mirror_budget)?);
    let addr = config.usbmuxd_addr()?;
    let shutdown = async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot handle SIGTERM");
                return std::future::pending().await;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping; interrupted backups resume at the next start");
    };
    service::run(agent, addr, config.service.clone(), shutdown).await
}

async fn backup(config: &Config, udid: &str, json: bool) -> anyhow::Result<()> {
    let agent = Agent::load(&config.state_dir, config.mirror_budget)?;
    let provider = Provider::find(config.usbmuxd_addr()?, udid).await?;
    let progress = Arc::new(Progress::new());
    let bar = tokio::spawn(show_progress(progress.clone(), !json));
    let result = job::backup(&agent, &provider, progress.clone()).await;
    progress.set_phase(Phase::Done);
    let _ = bar.await;
    let o = result?;
    if json {
        let out = serde_json::json!({
            "snapshot": o.snapshot.to_string(), "files": o.files, "logical_bytes": o.logical_bytes,
            "chunks": o.upload.chunks, "chunks_sent": o.upload.chunks_sent,
            "blob_bytes_sent": o.upload.blob_bytes_sent, "quic_bytes_sent": o.quic_bytes_sent,
            "cached_files": o.cached_files, "files_read_at_end": o.upload.files_read_at_end,
            "phone_seconds": o.upload.phone_ms as f64 / 1e3, "keys_seconds": o.upload.keys_ms as f64 / 1e3,
            "after_phone_seconds": o.upload.after_phone_ms as f64 / 1e3,
            "files_moved": Progress::get(&progress.files_moved),
            "files_moved_by_swap": Progress::get(&progress.files_moved_by_swap),
        });
        println!("{out}");
    } else {
        println!(
            "snapshot {}: {} files, {}; sent {} of {} chunks ({})",
            o.snapshot,
            o.files,
            indicatif::HumanBytes(o.logical_bytes),
            o.upload.chunks_sent,
            o.upload.chunks,
            indicatif::HumanBytes(o.upload.blob_bytes_sent)
        );
    }
    Ok(())
}

/// The progress bar of `backup`: phase, files, bytes, rate and ETA (hidden with `--json`
/// or when stderr is not a terminal; what the user must do is printed either way).
async fn show_progress(progress: Arc<Progress>, visible: bool) {
    let bar = if visible { indicatif::ProgressBar::new(0) } else { indicatif::ProgressBar::hidden() };
    let say = |line: &str| bar.suspend(|| eprintln!("{line}"));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg:<22} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let (mut asked, mut entered) = (false, false);
    loop {
        let phase = progress.phase();
        if !asked && progress.passcode_asked.load(std::sync::atomic::Ordering::Relaxed) {
            say("Enter the passcode on the iPhone to start the backup.");
            asked = true;
        }
        if asked && !entered && matches!(phase, Phase::Receiving | Phase::Uploading | Phase::Committing) {
            say("passcode entered; backing up …");
            entered = true;
        }
        let received = Progress::get(&progress.bytes_received);
        let (pos, len) = match phase {
            Phase::Uploading | Phase::Committing | Phase::Done => {
                (Progress::get(&progress.bytes_chunked), received.max(Progress::get(&progress.bytes_chunked)))
            }
            _ => (received, Progress::get(&progress.bytes_expected).max(received)),
        };
        bar.set_length(len);
        bar.set_position(pos);
        bar.set_message(format!(
            "{} · {} files · {} sent",
            phase.as_str(),
            Progress::get(&progress.files_received),
            indicatif::HumanBytes(Progress::get(&progress.bytes_uploaded))
        ));
        if phase == Phase::Done {
            bar.finish_and_clear();
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn status(config: &Config, json: bool) -> anyhow::Result<()> {
    let state_dir = config.state_dir.as_path();
    let state = AgentState::load(state_dir)?;
    let addr = config.usbmuxd_addr()?;
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
    let interval = match &server {
        Ok(client) => service::policy_interval(client).await.unwrap_or(service::DEFAULT_INTERVAL),
        Err(_) => service::DEFAULT_INTERVAL,
    };
    let interval_ms = interval.as_millis() as i64;
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
        let next_due = last.map_or(now, |t| t + interval_ms);
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
            Some(ms) => format!("last backup {} ago", ago(now - ms)),
            None => "never backed up".to_string(),
        };
        let due = match r["next_backup_due_unix_ms"].as_i64() {
            Some(ms) if ms > now => format!("next due in {}", ago(ms - now)),
            _ => "due now".to_string(),
        };
        println!(
            "{}  {} ({}, iOS {})  {}  {last}, {due}",
            r["udid"].as_str().unwrap_or_default(),
            r["name"].as_str().unwrap_or_default(),
            r["product_type"].as_str().unwrap_or_default(),
            r["ios_version"].as_str().unwrap_or_default(),
            r["state"].as_str().unwrap_or_default(),
        );
    }
    Ok(())
}

/// A duration in milliseconds for people: "42 s", "17 min", "5 h 3 min", "3 d".
fn ago(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d", s / 86400),
    }
}

async fn restore(
    config: &Config,
    target: &str,
    snapshot: Option<String>,
    from_device: Option<String>,
    reboot: bool,
    credential: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<()> {
    let source = job_source(snapshot, from_device, "--from-device")?;
    let Some(credential) = credential else { anyhow::bail!("{}", needs_a_person("restore")) };
    let agent = Agent::load(&config.state_dir, config.mirror_budget)?;
    let provider = Provider::find(config.usbmuxd_addr()?, target).await?;
    let udid: lifeboat_shared::ids::Udid =
        target.parse().map_err(|e| anyhow::anyhow!("{target} is not a UDID: {e}"))?;
    let request = JobRequest::Restore { target: udid, source };
    let (job_id, snapshot) = job::start(&agent, credential, request).await?;
    let result = job::run_started(&agent, job_id, Some(target), async {
        job::restore(&agent, &provider, snapshot, reboot, &|line| eprintln!("{line}")).await
    })
    .await;
    let r = result?;
    if json {
        println!(
            "{}",
            serde_json::json!({"snapshot": r.snapshot.to_string(), "source": r.source, "target": target, "files": r.files, "rebooted": r.rebooted, "job": job_id.to_string()})
        );
    } else {
        println!("restored snapshot {} of {} onto {target}: {} files (job {job_id})", r.snapshot, r.source, r.files);
    }
    Ok(())
}

/// What to do when a restore or export is asked for without a help-desk credential.
fn needs_a_person(what: &str) -> String {
    format!(
        "a {what} reads an employee's data, so it needs a help-desk user: pass --credential FILE \
         (a file holding your API credential with the helpdesk or admin role, from \
         `lifeboat-server user create --role helpdesk`), or ask the help desk to start it \
         from the API (POST /api/v1/restores)"
    )
}

/// The snapshot `--snapshot ID` names, or the latest of the device `device` names.
fn job_source(snapshot: Option<String>, device: Option<String>, device_flag: &str) -> anyhow::Result<JobSource> {
    Ok(match (snapshot, device) {
        (Some(id), _) => {
            JobSource::Snapshot(id.parse().map_err(|e| anyhow::anyhow!("{id} is not a snapshot id: {e}"))?)
        }
        (None, Some(udid)) => {
            JobSource::LatestOf(udid.parse().map_err(|e| anyhow::anyhow!("{udid} is not a UDID: {e}"))?)
        }
        (None, None) => anyhow::bail!("say which snapshot: --snapshot ID or {device_flag} UDID"),
    })
}

async fn export(
    config: &Config,
    snapshot: Option<String>,
    device: Option<String>,
    decrypted: bool,
    credential: Option<&std::path::Path>,
    json: bool,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let source = job_source(snapshot, device, "--device")?;
    let Some(credential) = credential else { anyhow::bail!("{}", needs_a_person("export")) };
    let agent = Agent::load(&config.state_dir, config.mirror_budget)?;
    let (job_id, snapshot) = job::start(&agent, credential, JobRequest::Export { source }).await?;
    let visible = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = if visible { indicatif::ProgressBar::new(0) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} exporting [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let progress = |total: u64, file: Option<&lifeboat_shared::manifest::FileEntry>| {
        bar.set_length(total);
        if let Some(f) = file {
            bar.inc(f.size);
        }
    };
    let e =
        job::run_started(&agent, job_id, None, job::export::export(&agent, snapshot, dir, decrypted, &progress)).await;
    bar.finish_and_clear();
    let e = e?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "snapshot": e.snapshot.to_string(), "udid": e.udid, "dir": e.dir, "files": e.files,
                "bytes": e.bytes, "encrypted": e.encrypted, "plaintext": e.plaintext,
            })
        );
    } else {
        let how = match (e.encrypted, e.plaintext) {
            (true, false) => "encrypted as the iPhone made it: it opens with the escrowed backup password",
            (true, true) => "decrypted: the files are in the clear, keep the folder safe",
            _ => "the iPhone did not encrypt this backup",
        };
        println!(
            "exported snapshot {} of {} to {}: {} files, {} ({how})",
            e.snapshot,
            e.udid,
            e.dir.display(),
            e.files,
            indicatif::HumanBytes(e.bytes)
        );
    }
    Ok(())
}
