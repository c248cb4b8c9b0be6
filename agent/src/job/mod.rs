//! One backup of one attached iPhone, from lockdown to a committed snapshot — what both
//! `lifeboat-agent backup` and the service (`run`) do.
//!
//! The phone sends into the local mirror while the pipeline uploads each file it
//! finishes. The run id is kept in `<state>/devices/<udid>.run` until the run ends, so an
//! agent killed mid-upload resumes the same run and the server's stored chunks are not
//! sent again. The device's state goes to the server (and to `<udid>.state`, for
//! `status` in another process) as it changes. `service`: `run`, watching usbmuxd.
//! Never here: protocol frames or the phone's protocol — it drives `device`, `pipeline`
//! and `net`.

pub mod export;
pub mod service;
pub mod started;

pub use started::{run_started, start};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lifeboat_shared::Secret;
use lifeboat_shared::ids::{RunId, SnapshotId, Udid};
use lifeboat_shared::ios_backup::{PlistEncryption, plist_encryption};
use lifeboat_shared::manifest::{DeviceInfo, Manifest};
use lifeboat_shared::wire::{
    DeviceState, ENCRYPTION_POLICY_VERSION, ESCROW_VERSION, ErrorCode, KEYBAG_VERSION, Request, Response, RunEnd,
};
use plist::Value;

use crate::device::{BackupSink, DeviceError, Provider};
use crate::ios::{Decryption, IosError};
use crate::net::{Client, ClientError};
use crate::pipeline::transfer::{self, Keys, TransferError, UploadReport};
use crate::pipeline::{FileCache, Pipeline};
use crate::progress::{Phase, Progress};
use crate::state::AgentState;

/// How long a backup may stay silent before the agent says the iPhone wants its passcode.
pub const PASSCODE_HINT_AFTER: Duration = Duration::from_secs(3);
/// How long the agent waits for the passcode before it gives up (needs-passcode), so a
/// locked phone left on a desk does not hold a backup slot for ever.
pub const PASSCODE_GIVE_UP_AFTER: Duration = Duration::from_secs(600);

/// An enrolled agent, ready to work.
#[derive(Debug, Clone)]
pub struct Agent {
    pub state_dir: PathBuf,
    pub state: AgentState,
    pub keys: Keys,
    /// The most disk one device's mirror may use (bytes).
    pub mirror_budget: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("uploading the backup: {0}")]
    Upload(#[from] TransferError),
    #[error("the server: {0}")]
    Server(#[from] ClientError),
    /// The phone encrypts its backups with a password the server does not know (or
    /// knows wrongly): nothing can be backed up until someone supplies it.
    #[error("{0}")]
    NeedsBackupPassword(String),
    #[error(transparent)]
    Ios(IosError),
    #[error("{0}")]
    Other(String),
}

impl From<IosError> for JobError {
    fn from(e: IosError) -> Self {
        match e {
            IosError::WrongPassword => Self::NeedsBackupPassword(e.to_string()),
            e => Self::Ios(e),
        }
    }
}

/// What to do about a phone that encrypts with a password nobody gave the server.
pub const NEEDS_BACKUP_PASSWORD: &str = "the iPhone encrypts its backups with a password the server does not know: an \
     admin enters it (PUT /api/v1/devices/{udid}/backup-password, or lifeboat-server device backup-password --set), or \
     the user turns it off on the iPhone with Settings > General > Transfer or Reset iPhone > Reset > Reset All Settings";

impl JobError {
    /// The run-end reason reported to the server.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Device(e) => e.reason(),
            Self::Upload(_) | Self::Server(_) => "upload-failed",
            Self::NeedsBackupPassword(_) => "needs-backup-password",
            Self::Ios(_) | Self::Other(_) => "backup-failed",
        }
    }

    /// The device's state after this failure: on the server, and in `<udid>.state`.
    fn states(&self) -> (&'static str, DeviceState) {
        match self {
            Self::Device(DeviceError::Locked) => ("locked", DeviceState::NeedsPasscode),
            Self::NeedsBackupPassword(_) | Self::Device(DeviceError::WrongBackupPassword(_)) => {
                ("needs-backup-password", DeviceState::NeedsBackupPassword)
            }
            _ => ("failing", DeviceState::Failing),
        }
    }

    /// The reason reported for a failed restore job.
    pub fn restore_reason(&self) -> &'static str {
        match self {
            Self::Device(DeviceError::Refused { code: 105, .. }) => "out-of-space",
            Self::Device(e) => e.reason(),
            Self::Upload(_) | Self::Server(_) => "download-failed",
            Self::NeedsBackupPassword(_) => "needs-backup-password",
            Self::Ios(_) | Self::Other(_) => "restore-failed",
        }
    }
}

/// What a committed backup did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub snapshot: SnapshotId,
    pub files: u64,
    pub logical_bytes: u64,
    pub upload: UploadReport,
    /// UDP payload bytes this backup's connection sent (all of QUIC's overhead included).
    pub quic_bytes_sent: u64,
    /// Files the local cache spared from being read again.
    pub cached_files: u64,
}

impl Agent {
    pub fn load(state_dir: &Path, mirror_budget: Option<u64>) -> anyhow::Result<Self> {
        let state = AgentState::load(state_dir)?;
        let keys = state.keys().ok_or_else(|| anyhow::anyhow!("{}: damaged keys", state_dir.display()))?;
        Ok(Self { state_dir: state_dir.to_path_buf(), state, keys, mirror_budget })
    }

    /// Where this agent keeps the derived key of a device's backup password.
    pub fn kdf_cache(&self, udid: &Udid) -> crate::ios::KdfCache {
        crate::ios::KdfCache::new(&self.state_dir, udid.as_str(), self.keys.data.clone())
    }

    /// A fresh authenticated connection (each job gets one, so a revoked agent stops at
    /// its next job and an access token never outlives its connection's purpose).
    pub async fn connect(&self) -> Result<Client, ClientError> {
        let damaged = |what: &str| ClientError::Protocol(format!("{}: damaged {what}", self.state_dir.display()));
        let fingerprint = self.state.fingerprint().ok_or_else(|| damaged("fingerprint"))?;
        let auth = self.state.refresh_auth().ok_or_else(|| damaged("refresh secret"))?;
        Client::connect(&self.state.server, fingerprint, auth).await
    }
}

/// Reports a device state to the server; a failure is logged, never fatal. A state the
/// session's version does not know goes as `failing`, with its message.
pub async fn report(client: &Client, udid: &Udid, state: DeviceState, message: &str) {
    let state = match state {
        DeviceState::NeedsBackupPassword if client.accepted.version < ESCROW_VERSION => DeviceState::Failing,
        s => s,
    };
    let req = Request::ReportState { udid: udid.clone(), state, message: Some(message.into()) };
    if let Err(e) = client.request(&req).await {
        tracing::warn!(device.udid = %udid, error = %e, "could not report the device's state");
    }
}

/// Backs up the attached iPhone behind `provider` into a new snapshot (or finishes the
/// run a killed agent left).
pub async fn backup(agent: &Agent, provider: &Provider, progress: Arc<Progress>) -> Result<Outcome, JobError> {
    let udid = provider.udid.as_str();
    let local = LocalState::new(&agent.state_dir, udid);
    progress.set_phase(Phase::Connecting);
    let values = match provider.values().await {
        Ok(v) => v,
        Err(DeviceError::NotTrusted) => {
            report_needs_trust(agent, provider).await;
            return Err(DeviceError::NotTrusted.into());
        }
        Err(e) => return Err(e.into()),
    };
    let info = device_info(udid, &values)?;
    let client = agent.connect().await?;
    register(&client, &info, &values).await?;
    // The run's lease comes first: the server gives a device's backup password only to
    // the agent that holds it.
    let (run, snapshot) = open_run(&client, &agent.state_dir, &info).await?;
    let prepared = match prepare_encryption(provider, &client, &info.udid).await {
        Ok(Prepared::Unknown) => {
            // The phone still makes its backup: into the mirror, where the next one builds
            // on it, and with the keybag an admin's password is checked against.
            if client.accepted.version >= KEYBAG_VERSION && keybag_due(udid) {
                local.set("backing-up");
                match mirror_keybag(agent, provider, &values, progress.clone()).await {
                    Ok(keybag) => {
                        report_keybag(&client, &info.udid, keybag).await;
                        keybags_read().insert(udid.to_string(), std::time::Instant::now());
                    }
                    Err(e) => tracing::warn!(device.udid = %udid, error = %e, "could not read the backup keybag"),
                }
            }
            Err(JobError::NeedsBackupPassword(NEEDS_BACKUP_PASSWORD.into()))
        }
        Ok(Prepared::Password(p)) => Ok(p),
        Err(e) => Err(e),
    };
    let password = match prepared {
        Ok(p) => p,
        Err(e) => {
            let (local_state, server_state) = e.states();
            local.finish(local_state);
            report(&client, &info.udid, server_state, &e.to_string()).await;
            end_failed_run(&client, &agent.state_dir, udid, run, &e).await;
            client.close().await;
            tracing::warn!(device.udid = %udid, run.id = %run, reason = e.reason(), error = %e, "not backed up");
            return Err(e);
        }
    };
    let tried = password.as_ref().map(digest);
    tracing::info!(device.udid = %udid, run.id = %run, device.name = %info.name, "backup started");
    local.set("backing-up");
    report(&client, &info.udid, DeviceState::BackingUp, "backing up").await;

    let result = back_up(agent, provider, &client, &info, run, snapshot, &values, password, progress.clone())
        .await
        .and_then(|(upload, committed)| match committed {
            Response::Committed { snapshot, files, logical_bytes } => Ok((upload, snapshot, files, logical_bytes)),
            other => Err(JobError::Other(format!("the server did not commit the snapshot: {other:?}"))),
        });
    let quic_bytes_sent = client.bytes_sent();
    match result {
        Ok((upload, snapshot, files, logical_bytes)) => {
            let cached_files = upload.files_from_cache;
            RunFile::remove(&agent.state_dir, udid);
            local.finish("idle");
            progress.set_phase(Phase::Done);
            report(&client, &info.udid, DeviceState::Idle, "backed up").await;
            client.close().await;
            tracing::info!(
                device.udid = %udid, run.id = %run, snapshot.id = %snapshot, files, logical_bytes,
                chunks_sent = upload.chunks_sent, bytes_sent = upload.blob_bytes_sent, "backup committed"
            );
            Ok(Outcome { snapshot, files, logical_bytes, upload, quic_bytes_sent, cached_files })
        }
        Err(e) => {
            // Say why it stopped; the chunks already stored stay on the server for the next run.
            let (local_state, server_state) = e.states();
            if let (JobError::NeedsBackupPassword(_), Some(tried)) = (&e, tried) {
                wrong_passwords().insert(udid.to_string(), tried);
            }
            local.finish(local_state);
            report(&client, &info.udid, server_state, &e.to_string()).await;
            end_failed_run(&client, &agent.state_dir, udid, run, &e).await;
            client.close().await;
            tracing::warn!(device.udid = %udid, run.id = %run, reason = e.reason(), error = %e, "backup failed");
            Err(e)
        }
    }
}

/// Tells the server why the run failed (ending its lease); the run file stays if it
/// cannot, so the next run resumes it.
async fn end_failed_run(client: &Client, state_dir: &Path, udid: &str, run: RunId, e: &JobError) {
    let end = RunEnd::Failed { reason: e.reason().into(), message: e.to_string() };
    match client.request(&Request::EndRun { run, end }).await {
        Ok(_) => RunFile::remove(state_dir, udid),
        Err(err) => tracing::warn!(run.id = %run, error = %err, "could not report the failed run"),
    }
}

/// Devices whose escrowed password opened no backup in this process, with a digest of
/// that password (in memory only): not backed up again until the server's answer changes,
/// since each try would be a whole backup for nothing.
static WRONG_PASSWORDS: std::sync::Mutex<std::collections::BTreeMap<String, [u8; 32]>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn digest(password: &Secret<String>) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, password.expose().as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn wrong_passwords() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<String, [u8; 32]>> {
    WRONG_PASSWORDS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How often the agent lets a phone whose password the server does not know make a backup
/// into the mirror, to report its current keybag (a password changed on the phone makes
/// a new one): once per process, then at most this often.
const KEYBAG_REFRESH: Duration = Duration::from_secs(6 * 3600);

/// Devices whose keybag this process reported, and when.
static KEYBAGS_READ: std::sync::Mutex<std::collections::BTreeMap<String, std::time::Instant>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn keybags_read() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<String, std::time::Instant>> {
    KEYBAGS_READ.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn keybag_due(udid: &str) -> bool {
    keybags_read().get(udid).is_none_or(|at| at.elapsed() >= KEYBAG_REFRESH)
}

/// Tells the server the keybag of a backup the phone encrypted with a password the agent
/// does not have; a failure is logged, never fatal (the password is then kept unchecked).
async fn report_keybag(client: &Client, udid: &Udid, keybag: Vec<u8>) {
    if client.accepted.version < KEYBAG_VERSION {
        return;
    }
    match client.request(&Request::ReportKeybag { udid: udid.clone(), keybag }).await {
        Ok(_) => {
            tracing::info!(device.udid = %udid, "reported the backup keybag an admin's password is checked against")
        }
        Err(e) => tracing::warn!(device.udid = %udid, error = %e, "could not report the backup keybag"),
    }
}

/// Fails with [`DeviceError::Locked`] when the phone has not begun after
/// [`PASSCODE_GIVE_UP_AFTER`] (it waits for its passcode); never returns otherwise.
async fn give_up_unless_started(mut waiting: tokio::sync::watch::Receiver<bool>) -> DeviceError {
    let started = async { waiting.wait_for(|s| *s).await.is_ok() };
    match tokio::time::timeout(PASSCODE_GIVE_UP_AFTER, started).await {
        Err(_) => DeviceError::Locked,
        Ok(_) => std::future::pending().await,
    }
}

/// Lets a phone that encrypts with a password the server does not know make its backup
/// into the mirror — no run on the server, nothing uploaded — and reads the keybag from
/// its Manifest.plist.
async fn mirror_keybag(
    agent: &Agent,
    provider: &Provider,
    values: &plist::Dictionary,
    progress: Arc<Progress>,
) -> Result<Vec<u8>, JobError> {
    let udid = provider.udid.as_str();
    let mirror = agent.state_dir.join("mirror");
    let mirror_bytes = if agent.mirror_budget.is_some() { transfer::dir_bytes(&mirror.join(udid)) } else { 0 };
    let (started, waiting) = tokio::sync::watch::channel(false);
    let sink = BackupSink { started, finished: None, progress, budget: agent.mirror_budget, mirror_bytes };
    let dir = tokio::select! {
        r = provider.backup(&mirror, values, sink) => r?,
        e = give_up_unless_started(waiting) => return Err(e.into()),
    };
    let plist = std::fs::read(dir.join("Manifest.plist"))
        .map_err(|e| JobError::Other(format!("the backup has no readable Manifest.plist: {e}")))?;
    match plist_encryption(&plist) {
        Ok(PlistEncryption::Encrypted { keybag, .. }) => Ok(keybag),
        Ok(PlistEncryption::None) => {
            Err(JobError::Other("the iPhone says it encrypts, but made an unencrypted backup".into()))
        }
        Err(e) => Err(JobError::Other(e)),
    }
}

/// What a backup needs to know about the phone's encryption.
enum Prepared {
    /// The password the phone encrypts with, or `None` when it does not encrypt.
    Password(Option<Secret<String>>),
    /// The phone encrypts with a password the server does not know.
    Unknown,
}

/// Before a backup: the password the phone will encrypt it with, if it encrypts. A phone
/// that encrypts needs its escrowed password; under a tenant policy of `required`, a
/// phone that does not is given a generated one, escrowed on the server first (so a
/// password the phone has is never one the server lacks), then set with ChangePassword.
async fn prepare_encryption(provider: &Provider, client: &Client, udid: &Udid) -> Result<Prepared, JobError> {
    let encrypts = provider.will_encrypt().await?;
    let version = client.accepted.version;
    if version < ESCROW_VERSION {
        // A server without escrow: a phone that encrypts cannot be read.
        return if encrypts { Ok(Prepared::Unknown) } else { Ok(Prepared::Password(None)) };
    }
    if encrypts {
        let escrowed = match client.request(&Request::GetBackupPassword { udid: udid.clone() }).await? {
            Response::BackupPassword { password } => password,
            other => return Err(JobError::Other(format!("unexpected answer {other:?}"))),
        };
        let Some(password) = escrowed else { return Ok(Prepared::Unknown) };
        if wrong_passwords().get(udid.as_str()) == Some(&digest(&password)) {
            return Err(JobError::NeedsBackupPassword(IosError::WrongPassword.to_string()));
        }
        return Ok(Prepared::Password(Some(password)));
    }
    let required = version >= ENCRYPTION_POLICY_VERSION
        && match client.request(&Request::GetEncryptionPolicy { udid: udid.clone() }).await? {
            Response::EncryptionPolicy { required } => required,
            other => return Err(JobError::Other(format!("unexpected answer {other:?}"))),
        };
    if !required {
        return Ok(Prepared::Password(None));
    }
    let password = crate::device::encryption::generate_password()?;
    client.request(&Request::PutBackupPassword { udid: udid.clone(), password: password.clone() }).await?;
    provider.change_password(None, Some(&password)).await?;
    tracing::info!(device.udid = %udid, "turned the iPhone's backup encryption on, with a password escrowed on the server");
    Ok(Prepared::Password(Some(password)))
}

fn device_info(udid: &str, values: &plist::Dictionary) -> Result<DeviceInfo, JobError> {
    let text = |k: &str| values.get(k).and_then(Value::as_string).unwrap_or_default().to_string();
    Ok(DeviceInfo {
        udid: udid.parse().map_err(|e| JobError::Other(format!("{udid} is not a UDID: {e}")))?,
        name: text("DeviceName"),
        product_type: text("ProductType"),
        ios_version: text("ProductVersion"),
    })
}

async fn register(client: &Client, info: &DeviceInfo, values: &plist::Dictionary) -> Result<(), JobError> {
    let serial = values.get("SerialNumber").and_then(Value::as_string).filter(|s| !s.is_empty()).map(String::from);
    client.request(&Request::RegisterDevice { device: info.clone(), serial_number: serial }).await?;
    Ok(())
}

/// The iPhone does not trust this computer yet: register it with what lockdown tells
/// anyone, and say it needs its user to tap Trust (in the log, to the server, in `status`).
pub async fn report_needs_trust(agent: &Agent, provider: &Provider) {
    LocalState::new(&agent.state_dir, &provider.udid).set("needs-trust");
    let udid = provider.udid.as_str();
    tracing::info!(device.udid = %udid, "the iPhone does not trust this computer yet: unlock it and tap Trust");
    let reported = async {
        let values = provider.public_values().await?;
        let info = device_info(udid, &values)?;
        let client = agent.connect().await?;
        register(&client, &info, &values).await?;
        report(&client, &info.udid, DeviceState::NeedsTrust, "unlock the iPhone and tap Trust").await;
        client.close().await;
        Ok::<_, JobError>(())
    };
    if let Err(e) = reported.await {
        tracing::warn!(device.udid = %udid, error = %e, "could not report needs-trust");
    }
}

#[allow(clippy::too_many_arguments)]
async fn back_up(
    agent: &Agent,
    provider: &Provider,
    client: &Client,
    info: &DeviceInfo,
    run: RunId,
    snapshot: SnapshotId,
    values: &plist::Dictionary,
    password: Option<Secret<String>>,
    progress: Arc<Progress>,
) -> Result<(UploadReport, Response), JobError> {
    let udid = provider.udid.as_str();
    let cache = FileCache::load(&agent.state_dir, udid);
    let mirror = agent.state_dir.join("mirror");
    // What the mirror holds counts against its budget (walked only when there is one).
    let mirror_bytes = if agent.mirror_budget.is_some() { transfer::dir_bytes(&mirror.join(udid)) } else { 0 };
    let mut pipeline = Pipeline::start(client.clone(), agent.keys.clone(), run, cache, progress.clone());
    let (started_tx, started) = tokio::sync::watch::channel(false);
    let waiting = started.clone();
    let sink = BackupSink {
        started: started_tx,
        // An encrypted backup's files are read once their keys are known, at the end.
        finished: password.is_none().then(|| pipeline.feed()),
        progress: progress.clone(),
        budget: agent.mirror_budget,
        mirror_bytes,
    };
    // The passcode watch reports on its own connection's streams, never holding up the phone.
    let watch = tokio::spawn(passcode_watch(
        client.clone(),
        info.udid.clone(),
        LocalState::new(&agent.state_dir, udid),
        started,
        progress.clone(),
    ));
    let phone = async {
        tokio::select! {
            r = provider.backup(&mirror, values, sink) => r,
            e = give_up_unless_started(waiting) => Err(e),
        }
    };
    let began = std::time::Instant::now();
    let received = pipeline.run_until(phone).await;
    watch.abort();
    let dir = received??;
    let phone_done = std::time::Instant::now();
    progress.set_phase(Phase::Uploading);
    let decryption = open_backup(agent, client, &info.udid, &dir, password).await?;
    let keys_done = std::time::Instant::now();
    let (files, file_keys, mut upload) = pipeline.finish(&dir, decryption.as_ref()).await?;
    progress.set_phase(Phase::Committing);
    let manifest = Manifest { snapshot, device: info.clone(), created_unix_ms: transfer::now_unix_ms(), files };
    let committed = match transfer::commit(client, &agent.keys, run, &manifest).await {
        Err(TransferError::Client(e)) if e.code() == Some(ErrorCode::MissingChunks) => {
            // The cache promised chunks the server does not hold: forget it; the retry
            // reads every file.
            FileCache::remove(&agent.state_dir, udid);
            return Err(TransferError::Client(e).into());
        }
        other => other?,
    };
    let ms = |d: Duration| d.as_millis() as u64;
    upload.phone_ms = ms(phone_done - began);
    upload.keys_ms = ms(keys_done - phone_done);
    upload.after_phone_ms = ms(keys_done.elapsed());
    tracing::debug!(
        phone_ms = upload.phone_ms,
        keys_ms = upload.keys_ms,
        after_phone_ms = upload.after_phone_ms,
        "backup phases"
    );
    let cache = FileCache::from_snapshot(file_keys, manifest.files);
    if let Err(e) = cache.save(&agent.state_dir, udid) {
        tracing::warn!(device.udid = %udid, error = %e, "could not save the file cache; the next backup reads every file");
    }
    Ok((upload, committed))
}

/// The keys of the backup the phone just made in `dir`, if it encrypted it. A backup the
/// phone encrypted although none was expected (its encryption was turned on behind our
/// back) needs its password like any other.
async fn open_backup(
    agent: &Agent,
    client: &Client,
    udid: &Udid,
    dir: &Path,
    password: Option<Secret<String>>,
) -> Result<Option<Decryption>, JobError> {
    let plist = std::fs::read(dir.join("Manifest.plist"))
        .map_err(|e| JobError::Other(format!("the backup has no readable Manifest.plist: {e}")))?;
    let keybag = match plist_encryption(&plist) {
        Ok(PlistEncryption::None) => None,
        Ok(PlistEncryption::Encrypted { keybag, .. }) => Some(keybag),
        // Damaged: Decryption::open says how.
        Err(_) => Some(Vec::new()),
    };
    let Some(keybag) = keybag else { return Ok(None) };
    let Some(password) = password else {
        if !keybag.is_empty() {
            report_keybag(client, udid, keybag).await;
        }
        return Err(JobError::NeedsBackupPassword(NEEDS_BACKUP_PASSWORD.into()));
    };
    let (dir, scratch) = (dir.to_path_buf(), agent.state_dir.join("scratch"));
    let cache = agent.kdf_cache(udid);
    let opened = tokio::task::spawn_blocking(move || Decryption::open(&dir, &password, &scratch, Some(&cache)))
        .await
        .map_err(|e| JobError::Other(format!("opening the encrypted backup failed: {e}")))?;
    let opened = match opened {
        Err(IosError::WrongPassword) => {
            // The phone's password changed: the server checks the next one against this keybag.
            report_keybag(client, udid, keybag).await;
            return Err(IosError::WrongPassword.into());
        }
        other => other?,
    };
    if let Some(d) = &opened {
        tracing::debug!(files = d.len(), "the encrypted backup's keys are unwrapped");
    }
    Ok(opened)
}

/// Until the phone asks for its first file it is waiting for its passcode (iOS 16.1
/// and later): after [`PASSCODE_HINT_AFTER`] say so, and say when it goes on.
async fn passcode_watch(
    client: Client,
    udid: Udid,
    local: LocalState,
    mut started: tokio::sync::watch::Receiver<bool>,
    progress: Arc<Progress>,
) {
    if tokio::time::timeout(PASSCODE_HINT_AFTER, started.wait_for(|s| *s)).await.is_ok() {
        return;
    }
    progress.set_phase(Phase::WaitingForPasscode);
    progress.passcode_asked.store(true, std::sync::atomic::Ordering::Relaxed);
    local.set("needs-passcode");
    tracing::info!(device.udid = %udid, "waiting for the passcode to be entered on the iPhone");
    report(&client, &udid, DeviceState::NeedsPasscode, "waiting for the passcode").await;
    if started.wait_for(|s| *s).await.is_ok() {
        local.set("backing-up");
        report(&client, &udid, DeviceState::BackingUp, "backing up").await;
    }
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    pub snapshot: SnapshotId,
    /// The UDID of the iPhone the snapshot was taken from.
    pub source: String,
    pub files: usize,
    pub rebooted: bool,
}

/// Restores `snapshot` onto the attached iPhone behind `provider` (which may be another
/// model than the snapshot's): pre-flight (room for the download here, the target's iOS
/// not older than the snapshot's), download with every chunk verified, MobileBackup2
/// Restore with the snapshot's device as source, and with `reboot` the wait through the
/// restart. The download — the phone's data in the clear — is removed however it ends.
pub async fn restore(
    agent: &Agent,
    provider: &Provider,
    snapshot: SnapshotId,
    reboot: bool,
    say: &(dyn Fn(&str) + Sync),
) -> Result<Restored, JobError> {
    let target = provider.udid.clone();
    let values = provider.values().await?;
    let target_ios = values.get("ProductVersion").and_then(Value::as_string).unwrap_or_default().to_string();
    let client = agent.connect().await?;
    let sealed = client.get_manifest(snapshot).await?;
    let manifest = Manifest::open(&agent.keys.data, &snapshot, &sealed)
        .map_err(|e| JobError::Other(format!("snapshot {snapshot}: {e}")))?;
    if crate::device::version_older(&target_ios, &manifest.device.ios_version) {
        return Err(JobError::Other(format!(
            "the snapshot is from iOS {}, newer than the target's iOS {target_ios}: update the iPhone first",
            manifest.device.ios_version
        )));
    }
    let ios = snapshot_encryption(agent, &client, &manifest).await?;
    let needed: u64 = manifest.files.iter().map(|f| f.size).sum();
    let restore_dir = agent.state_dir.join("restore");
    std::fs::create_dir_all(&restore_dir).map_err(|e| JobError::Other(format!("{}: {e}", restore_dir.display())))?;
    let free = idevice::services::mobilebackup2::BackupDelegate::get_free_disk_space(
        &idevice::services::mobilebackup2::FsBackupDelegate,
        &restore_dir,
    );
    if free < needed.saturating_add(needed / 20) {
        return Err(JobError::Other(format!(
            "the snapshot needs {needed} bytes in {} for the restore, and only {free} are free",
            restore_dir.display()
        )));
    }
    let root = restore_dir.join(snapshot.to_string());
    let _ = std::fs::remove_dir_all(&root);
    let _cleanup = RemoveOnDrop(root.clone());
    let download = root.join("download");
    say(&format!("downloading snapshot {snapshot} ({} files) …", manifest.files.len()));
    let rebuild = match &ios {
        Some((_, classes)) => transfer::Rebuild::AsThePhoneMadeThem(classes),
        None => transfer::Rebuild::Plaintext,
    };
    transfer::download_files(&client, &agent.keys, &manifest, &download, rebuild, &|_| {}).await?;
    client.close().await;
    let source = manifest.device.udid.as_str().to_string();
    std::fs::rename(&download, root.join(&source))
        .map_err(|e| JobError::Other(format!("preparing the restore directory: {e}")))?;
    say(&format!(
        "restoring {} ({}, iOS {}) onto {target} (iOS {target_ios}) …",
        manifest.device.name, manifest.device.product_type, manifest.device.ios_version
    ));
    let local = LocalState::new(&agent.state_dir, &target);
    local.set("restoring");
    let result = async {
        provider.restore(&root, &source, reboot, ios.as_ref().map(|(password, _)| password)).await?;
        if reboot {
            say("the iPhone restarts …");
            crate::device::wait_for_reboot(provider.addr(), &target, Duration::from_secs(180)).await?;
        }
        Ok::<_, JobError>(())
    }
    .await;
    local.finish(if result.is_ok() { "idle" } else { "failing" });
    result?;
    tracing::info!(device.udid = %target, snapshot.id = %snapshot, source = %source, "restore done");
    Ok(Restored { snapshot, source, files: manifest.files.len(), rebooted: reboot })
}

/// For a snapshot of a backup the phone encrypted: its escrowed password and the class
/// keys its keybag (in the snapshot's Manifest.plist) opens with it, for the phone's
/// bytes to be rebuilt. `None` for a snapshot of an unencrypted backup.
pub async fn snapshot_encryption(
    agent: &Agent,
    client: &Client,
    manifest: &Manifest,
) -> Result<Option<(Secret<String>, lifeboat_shared::ios_crypto::ClassKeys)>, JobError> {
    if !manifest.ios_encrypted() {
        return Ok(None);
    }
    let udid = &manifest.device.udid;
    let escrowed = if client.accepted.version < ESCROW_VERSION {
        None
    } else {
        match client.request(&Request::GetBackupPassword { udid: udid.clone() }).await? {
            Response::BackupPassword { password } => password,
            other => return Err(JobError::Other(format!("unexpected answer {other:?}"))),
        }
    };
    let Some(password) = escrowed else {
        return Err(JobError::NeedsBackupPassword(format!(
            "snapshot {} is of an encrypted backup and the server knows no backup password for {udid}",
            manifest.snapshot
        )));
    };
    let plist = transfer::read_file(client, &agent.keys, manifest, "Manifest.plist").await?;
    let keybag = match plist_encryption(&plist) {
        Ok(PlistEncryption::Encrypted { keybag, .. }) => keybag,
        Ok(_) => return Err(JobError::Other("the snapshot's Manifest.plist says it is not encrypted".into())),
        Err(e) => return Err(JobError::Other(format!("the snapshot's Manifest.plist: {e}"))),
    };
    let (p, cache) = (password.clone(), agent.kdf_cache(udid));
    let classes = tokio::task::spawn_blocking(move || crate::ios::unlock(&keybag, &p, Some(&cache)))
        .await
        .map_err(|e| JobError::Other(format!("opening the keybag failed: {e}")))??;
    Ok(Some((password, classes)))
}

/// Removes a directory tree when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Opens the run: the one a killed agent left for this device if the server still
/// holds it open, else a new one.
async fn open_run(client: &Client, state_dir: &Path, info: &DeviceInfo) -> Result<(RunId, SnapshotId), JobError> {
    let udid = info.udid.as_str();
    if let Some(run) = RunFile::load(state_dir, udid) {
        match client.request(&Request::OpenRun { udid: info.udid.clone(), resume: Some(run) }).await {
            Ok(Response::RunOpened { run, snapshot, .. }) => {
                tracing::info!(device.udid = %udid, run.id = %run, "resuming the interrupted run");
                return Ok((run, snapshot));
            }
            Ok(other) => return Err(JobError::Other(format!("the server did not reopen the run: {other:?}"))),
            Err(e) => {
                tracing::info!(device.udid = %udid, run.id = %run, error = %e, "the interrupted run is gone; starting anew")
            }
        }
    }
    match client.request(&Request::OpenRun { udid: info.udid.clone(), resume: None }).await? {
        Response::RunOpened { run, snapshot, .. } => {
            RunFile::save(state_dir, udid, run);
            Ok((run, snapshot))
        }
        other => Err(JobError::Other(format!("the server did not open a run: {other:?}"))),
    }
}

/// The open run of a device: `<state>/devices/<udid>.run`, there from the run's start to
/// its end, so a killed agent finds it again.
struct RunFile;

impl RunFile {
    fn path(state_dir: &Path, udid: &str) -> PathBuf {
        state_dir.join("devices").join(format!("{udid}.run"))
    }

    fn load(state_dir: &Path, udid: &str) -> Option<RunId> {
        std::fs::read_to_string(Self::path(state_dir, udid)).ok()?.trim().parse().ok()
    }

    fn save(state_dir: &Path, udid: &str, run: RunId) {
        let path = Self::path(state_dir, udid);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_extension("run-tmp");
        if std::fs::write(&tmp, format!("{run}\n")).and_then(|()| std::fs::rename(&tmp, &path)).is_err() {
            tracing::warn!(path = %path.display(), "could not record the run; a killed agent would start anew");
        }
    }

    fn remove(state_dir: &Path, udid: &str) {
        let _ = std::fs::remove_file(Self::path(state_dir, udid));
    }
}

/// What the agent says about a device, for `status` in another process:
/// `<state>/devices/<udid>.state`.
#[derive(Debug, Clone)]
pub struct LocalState {
    path: PathBuf,
}

impl LocalState {
    pub fn new(state_dir: &Path, udid: &str) -> Self {
        Self { path: state_dir.join("devices").join(format!("{udid}.state")) }
    }

    /// A state while this process works on the device (`backing-up`, `needs-passcode`,
    /// `needs-trust`): recorded with its pid, so a killed agent does not look busy forever.
    pub fn set(&self, state: &str) {
        self.write(&format!("{state} {}", std::process::id()));
    }

    /// How the backup ended (`idle`, `failing`, `locked`): kept until the next one.
    pub fn finish(&self, state: &str) {
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

    /// The state recorded; an in-progress one whose process is gone no longer counts
    /// (`locked` reads as needs-passcode: the next backup will ask again).
    pub fn get(state_dir: &Path, udid: &str) -> Option<String> {
        let text = std::fs::read_to_string(Self::new(state_dir, udid).path).ok()?;
        match text.trim().split_once(' ') {
            Some((state, pid)) => Path::new("/proc").join(pid).exists().then(|| state.to_string()),
            None if text.trim() == "locked" => Some("needs-passcode".into()),
            None => Some(text.trim().to_string()),
        }
    }
}

#[cfg(test)]
mod reason_tests {
    use lifeboat_shared::wire::REASONS;

    use super::*;
    use crate::pipeline::transfer::TransferError;

    /// Every reason the agent reports is one the server counts by name (others are
    /// counted as `other`).
    #[test]
    fn every_reason_the_agent_sends_is_a_known_one() {
        let device = [
            DeviceError::NotAttached("u".into()),
            DeviceError::Locked,
            DeviceError::NotTrusted,
            DeviceError::Refused { code: 105, description: "full".into() },
            DeviceError::Refused { code: 1, description: "no".into() },
            DeviceError::WrongBackupPassword("no".into()),
            DeviceError::Failed("x".into()),
            DeviceError::Address("x".into()),
        ];
        let mut errors: Vec<JobError> = device.into_iter().map(JobError::Device).collect();
        errors.push(JobError::Upload(TransferError::Invalid("x".into())));
        errors.push(JobError::NeedsBackupPassword("x".into()));
        errors.push(JobError::Other("x".into()));
        for e in &errors {
            assert!(REASONS.contains(&e.reason()), "{} from {e:?}", e.reason());
            assert!(REASONS.contains(&e.restore_reason()), "{} from {e:?}", e.restore_reason());
        }
    }
}
