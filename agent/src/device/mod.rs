//! The iPhone side of the agent, through idevice: finding a device on usbmuxd, reading
//! its identity over lockdown, and a MobileBackup2 backup into the local mirror (so the
//! phone can make its own incremental backups next time). `staging`: the phone's moves
//! out of `Snapshot/`, a directory at a time where it can. `encryption`: whether the phone
//! encrypts its backups, and ChangePassword with the phone's answer checked.
//! Never here: the server, chunks or keys — finished files go to the pipeline.

pub mod encryption;
pub(crate) mod staging;

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use idevice::provider::IdeviceProvider;
use idevice::services::lockdown::LockdownClient;
use idevice::services::mobilebackup2::{
    BackupDelegate, BackupProgress, DirEntryInfo, FsBackupDelegate, MobileBackup2Client, RestoreOptions,
};
use idevice::usbmuxd::{UsbmuxdAddr, UsbmuxdConnection};
use idevice::{IdeviceError, IdeviceService as _};
use plist::{Dictionary, Value};

use crate::pipeline::FinishedFile;
use crate::progress::{Phase, Progress};
use staging::{Exchanges, Moved};

const LABEL: &str = "lifeboat-agent";

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("USBMUXD_SOCKET_ADDRESS: {0}")]
    Address(String),
    #[error("cannot reach usbmuxd at {addr}: {cause}")]
    Usbmuxd { addr: String, cause: IdeviceError },
    #[error("no iPhone {0} is attached")]
    NotAttached(String),
    #[error("the iPhone went away or the connection broke: {0}")]
    Disconnected(IdeviceError),
    #[error("the iPhone is locked: enter the passcode on it and try again")]
    Locked,
    #[error("the iPhone does not trust this computer yet: unlock it and tap Trust")]
    NotTrusted,
    #[error("the iPhone refused (error {code}): {description}")]
    Refused { code: u64, description: String },
    #[error("the iPhone refused the backup password: {0}")]
    WrongBackupPassword(String),
    #[error("{0}")]
    Failed(String),
}

impl DeviceError {
    /// The run-end reason reported to the server.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Disconnected(_) | Self::NotAttached(_) => "device-disconnected",
            Self::Locked => "needs-passcode",
            Self::NotTrusted => "needs-trust",
            Self::WrongBackupPassword(_) => "needs-backup-password",
            Self::Refused { code: 105, .. } => "out-of-space",
            Self::Refused { .. } => "device-error",
            _ => "backup-failed",
        }
    }
}

fn classify(e: IdeviceError) -> DeviceError {
    match e {
        IdeviceError::DeviceLocked => DeviceError::Locked,
        IdeviceError::Socket(_) => DeviceError::Disconnected(e),
        other => DeviceError::Failed(other.to_string()),
    }
}

/// Where usbmuxd is: `USBMUXD_SOCKET_ADDRESS` (`host:port` or a socket path), else the
/// system's socket.
pub fn usbmuxd_addr() -> Result<UsbmuxdAddr, DeviceError> {
    UsbmuxdAddr::from_env_var().map_err(|e| DeviceError::Address(e.to_string()))
}

/// An idevice provider for one device. idevice's own leaves Nagle's algorithm on for TCP
/// usbmuxd and writes each message's length and body separately, so every exchange waits
/// for a delayed ACK (40 ms); this one sets `TCP_NODELAY`.
#[derive(Debug, Clone)]
pub struct Provider {
    addr: UsbmuxdAddr,
    device_id: u32,
    pub udid: String,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, IdeviceError>> + Send>>;

/// A connection to usbmuxd.
pub async fn mux(addr: &UsbmuxdAddr) -> Result<UsbmuxdConnection, IdeviceError> {
    match addr {
        UsbmuxdAddr::TcpSocket(a) => {
            let stream = tokio::net::TcpStream::connect(a).await?;
            stream.set_nodelay(true)?;
            Ok(UsbmuxdConnection::new(Box::new(stream), 1))
        }
        other => other.connect(1).await,
    }
}

impl IdeviceProvider for Provider {
    fn connect(&self, port: u16) -> BoxFuture<idevice::Idevice> {
        let (addr, device_id) = (self.addr.clone(), self.device_id);
        Box::pin(async move { mux(&addr).await?.connect_to_device(device_id, port, LABEL).await })
    }

    fn label(&self) -> &str {
        LABEL
    }

    fn get_pairing_file(&self) -> BoxFuture<idevice::pairing_file::PairingFile> {
        let (addr, udid) = (self.addr.clone(), self.udid.clone());
        Box::pin(async move { mux(&addr).await?.get_pair_record(&udid).await })
    }
}

/// The iPhones usbmuxd lists now.
pub async fn attached(addr: &UsbmuxdAddr) -> Result<Vec<Provider>, DeviceError> {
    let mut conn = mux(addr).await.map_err(|cause| DeviceError::Usbmuxd { addr: describe(addr), cause })?;
    let devices = conn.get_devices().await.map_err(|cause| DeviceError::Usbmuxd { addr: describe(addr), cause })?;
    Ok(devices.into_iter().map(|d| Provider { addr: addr.clone(), device_id: d.device_id, udid: d.udid }).collect())
}

/// Where usbmuxd is, for messages.
pub fn describe(addr: &UsbmuxdAddr) -> String {
    match addr {
        UsbmuxdAddr::TcpSocket(a) => a.to_string(),
        #[allow(unreachable_patterns)]
        _ => "the system socket".to_string(),
    }
}

impl Provider {
    pub fn new(addr: UsbmuxdAddr, device_id: u32, udid: String) -> Self {
        Self { addr, device_id, udid }
    }

    /// Where its usbmuxd is.
    pub fn addr(&self) -> &UsbmuxdAddr {
        &self.addr
    }

    /// usbmuxd's number for the device while it stays attached.
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// The attached device `udid`.
    pub async fn find(addr: UsbmuxdAddr, udid: &str) -> Result<Self, DeviceError> {
        attached(&addr).await?.into_iter().find(|p| p.udid == udid).ok_or_else(|| DeviceError::NotAttached(udid.into()))
    }

    /// The pair record usbmuxd keeps once the user has tapped Trust (its preflight pairs a
    /// newly attached device and the iPhone asks); until then there is none: NotTrusted.
    async fn get_pairing_file_checked(&self) -> Result<idevice::pairing_file::PairingFile, DeviceError> {
        self.get_pairing_file().await.map_err(|e| match e {
            IdeviceError::UnexpectedResponse(_) | IdeviceError::NotFound => DeviceError::NotTrusted,
            other => classify(other),
        })
    }

    /// The device's lockdown values (inside a session, as hosts read them).
    pub async fn values(&self) -> Result<Dictionary, DeviceError> {
        let pairing = self.get_pairing_file_checked().await?;
        let mut lockdown = LockdownClient::connect(self).await.map_err(classify)?;
        lockdown.start_session(&pairing).await.map_err(classify)?;
        match lockdown.get_value(None, None).await.map_err(classify)? {
            Value::Dictionary(d) => Ok(d),
            other => Err(DeviceError::Failed(format!("lockdown values are not a dictionary: {other:?}"))),
        }
    }

    /// The values lockdown gives any host, trusted or not (name, model, iOS version).
    pub async fn public_values(&self) -> Result<Dictionary, DeviceError> {
        let mut lockdown = LockdownClient::connect(self).await.map_err(classify)?;
        match lockdown.get_value(None, None).await.map_err(classify)? {
            Value::Dictionary(d) => Ok(d),
            other => Err(DeviceError::Failed(format!("lockdown values are not a dictionary: {other:?}"))),
        }
    }

    /// Backs the device up into `mirror/<udid>` (incremental when the mirror holds the
    /// previous backup), checks the device's verdict and Status.plist, and writes the
    /// Info.plist hosts write. Returns the backup directory. Each file the phone finishes
    /// goes to `sink.finished` while the phone goes on.
    pub async fn backup(&self, mirror: &Path, values: &Dictionary, sink: BackupSink) -> Result<PathBuf, DeviceError> {
        std::fs::create_dir_all(mirror).map_err(|e| DeviceError::Failed(format!("{}: {e}", mirror.display())))?;
        let mut client = MobileBackup2Client::connect(self).await.map_err(classify)?;
        let delegate = MirrorDelegate {
            sink,
            current: std::sync::Mutex::new(None),
            handoff: std::sync::Mutex::default(),
            known: KnownDirs::default(),
            staged: Exchanges::default(),
        };
        let reply = client.backup_from_path(mirror, Some(&self.udid), None, &delegate).await.map_err(classify)?;
        let _ = client.disconnect().await;
        // Staged files the phone did not move are put back where it left them (a phone
        // removes its staging directory at the end, so normally there are none).
        delegate.staged.settle_all().map_err(|e| {
            DeviceError::Failed(format!("putting staged files back into the mirror's Snapshot directory: {e}"))
        })?;
        let reply = reply.ok_or_else(|| DeviceError::Failed("the iPhone ended the backup without a verdict".into()))?;
        let code = reply.get("ErrorCode").and_then(Value::as_unsigned_integer).unwrap_or(0);
        if code == 208 {
            return Err(DeviceError::Locked);
        }
        if code != 0 {
            let description =
                reply.get("ErrorDescription").and_then(Value::as_string).unwrap_or("no description").to_string();
            return Err(DeviceError::Refused { code, description });
        }
        let dir = mirror.join(&self.udid);
        let status: Dictionary = plist::from_file(dir.join("Status.plist"))
            .map_err(|e| DeviceError::Failed(format!("the backup has no readable Status.plist: {e}")))?;
        if status.get("SnapshotState").and_then(Value::as_string) != Some("finished") {
            return Err(DeviceError::Failed("the backup's Status.plist does not say finished".into()));
        }
        plist::to_file_xml(dir.join("Info.plist"), &info_plist(&self.udid, values))
            .map_err(|e| DeviceError::Failed(format!("writing Info.plist: {e}")))?;
        Ok(dir)
    }
}

impl Provider {
    /// Restores the backup in `root/<source>` onto this device (which may be another
    /// model), as a MobileBackup2 Restore with `source` as SourceIdentifier. With `reboot`
    /// the device restarts afterwards; see [`wait_for_reboot`].
    pub async fn restore(
        &self,
        root: &Path,
        source: &str,
        reboot: bool,
        password: Option<&lifeboat_shared::Secret<String>>,
    ) -> Result<(), DeviceError> {
        let mut client = MobileBackup2Client::connect(self).await.map_err(classify)?;
        let mut options = RestoreOptions::new().with_reboot(reboot).with_system_files(true);
        if let Some(p) = password {
            // idevice logs what it sends at debug level: the agent never writes those lines.
            options = options.with_password(p.expose().clone());
        }
        let reply =
            client.restore_from_path(root, Some(source), Some(options), &FsBackupDelegate).await.map_err(classify)?;
        let _ = client.disconnect().await;
        let reply =
            reply.ok_or_else(|| DeviceError::Failed("the iPhone ended the restore without a verdict".into()))?;
        match reply.get("ErrorCode").and_then(Value::as_unsigned_integer).unwrap_or(0) {
            0 => Ok(()),
            208 => Err(DeviceError::Locked),
            encryption::WRONG_PASSWORD => Err(DeviceError::WrongBackupPassword(
                reply.get("ErrorDescription").and_then(Value::as_string).unwrap_or("no description").into(),
            )),
            code => Err(DeviceError::Refused {
                code,
                description: reply
                    .get("ErrorDescription")
                    .and_then(Value::as_string)
                    .unwrap_or("no description")
                    .into(),
            }),
        }
    }
}

/// What a backup hands the device side: where finished files go, live counters, and how
/// much disk the mirror may use.
#[derive(Debug, Clone)]
pub struct BackupSink {
    /// Signalled when the device begins (on iOS 16.1 and later it first waits for its
    /// passcode).
    pub started: tokio::sync::watch::Sender<bool>,
    /// Every file the phone finishes, as its path in the mirror; none for an encrypted
    /// backup, whose files' keys arrive only with Manifest.db, after the last file.
    pub finished: Option<crate::pipeline::Feed>,
    pub progress: Arc<Progress>,
    /// The most the mirror may hold (bytes); the phone is told there is no more room.
    pub budget: Option<u64>,
    /// What the mirror holds now (bytes), counted against the budget.
    pub mirror_bytes: u64,
}

/// The host side of a MobileBackup2 backup into the local mirror. File operations are
/// plain system calls on the calling thread (each takes microseconds; idevice's
/// `FsBackupDelegate` pays a blocking-pool round trip for each, which caps a backup of
/// many small files at about 80 MB/s here). Finished files go to the upload pipeline
/// while the phone sends the next ones, a few at a time ([`HANDOFF_FILES`]).
struct MirrorDelegate {
    sink: BackupSink,
    /// The file being written, handed on when the phone says it is complete, with a
    /// second handle to it for the pipeline to read (no second path lookup) and the bytes
    /// received before it.
    current: std::sync::Mutex<Option<(PathBuf, Option<std::fs::File>, u64)>>,
    /// Finished files not yet handed on, and their bytes.
    handoff: std::sync::Mutex<(Vec<FinishedFile>, u64)>,
    /// Directories the mirror has, as far as this backup knows.
    known: KnownDirs,
    /// Staging directories swapped whole with their destinations (the phone's moves).
    staged: Exchanges,
}

/// What this backup knows of the mirror's directories, so that the thread talking to the
/// phone makes fewer system calls.
///
/// - idevice asks for its parent directory before every file it receives and every move
///   (100,000 times for a 50,000-file backup), and `create_dir_all` of a directory that
///   exists is a `mkdir` that fails and a `stat`. A known directory costs a hash lookup.
/// - idevice removes every file's path before creating it, and the phone puts each file
///   into a staging directory (`Snapshot/xx`) that it had the host make for this backup.
///   A directory this backup made was empty then, so a name in it exists only if this
///   backup put it there; removing any other name is skipped (50,000 `unlink`s that find
///   nothing, each a directory lookup).
///
/// Every ancestor of a known directory is known too, so renaming or removing a path that
/// is not known cannot make any entry wrong. Should the mirror change behind the agent's
/// back, the file create or rename that then fails with NotFound forgets everything and
/// tries once more. A name put behind its back into a directory it made is the one thing
/// it would miss: the next file of that name is then written over it, in place. Paths
/// are compared byte for byte, so the mirror must be on a case-sensitive file system
/// (the phone's names are lowercase hex and fixed words; a case-insensitive one would
/// only make two spellings of one name look like two names).
#[derive(Default)]
struct KnownDirs(std::sync::Mutex<Known>);

#[derive(Default)]
struct Known {
    /// Directories that exist.
    dirs: HashSet<PathBuf>,
    /// Of those, the ones this backup made.
    made: HashSet<PathBuf>,
    /// Hashes of the paths this backup put into directories it made (files, moves,
    /// copies, subdirectories). Two paths with one hash only cost an `unlink` in vain.
    placed: HashSet<u64>,
    /// The directories it made that it has put something into.
    filled: HashSet<PathBuf>,
}

/// The key of a path in [`Known::placed`] (SipHash with fixed keys: the same in every run).
fn path_hash(path: &Path) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::hash::DefaultHasher::new();
    path.hash(&mut h);
    h.finish()
}

impl KnownDirs {
    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn contains(&self, dir: &Path) -> bool {
        self.lock().dirs.contains(dir)
    }
    /// `dir` and its ancestors exist.
    fn insert(&self, dir: &Path) {
        let mut known = self.lock();
        for a in dir.ancestors().filter(|a| !a.as_os_str().is_empty()) {
            // Its ancestors are in already.
            if !known.dirs.insert(a.to_path_buf()) {
                break;
            }
        }
    }
    /// `path` is about to be moved or removed, or replaced by a move: it and everything
    /// under it may go.
    fn forget(&self, path: &Path) {
        let mut known = self.lock();
        if known.dirs.remove(path) {
            known.dirs.retain(|d| !d.starts_with(path));
            known.made.retain(|d| !d.starts_with(path));
            known.filled.retain(|d| !d.starts_with(path));
        }
    }
    fn clear(&self) {
        *self.lock() = Known::default();
    }
    /// This backup put something at `path`.
    fn placed(&self, path: &Path) {
        let mut known = self.lock();
        if let Some(parent) = path.parent().filter(|p| known.made.contains(*p)) {
            if !known.filled.contains(parent) {
                known.filled.insert(parent.to_path_buf());
            }
            known.placed.insert(path_hash(path));
        }
    }
    /// `dir` was made by this backup.
    fn made(&self, dir: &Path) -> bool {
        self.lock().made.contains(dir)
    }
    /// `dir` was made by this backup, which has put nothing into it.
    fn made_empty(&self, dir: &Path) -> bool {
        let known = self.lock();
        known.made.contains(dir) && !known.filled.contains(dir)
    }
    /// False when nothing can be at `path`: its directory was made by this backup, which
    /// put nothing there by that name.
    fn may_exist(&self, path: &Path) -> bool {
        let known = self.lock();
        !path.parent().is_some_and(|p| known.made.contains(p))
            || known.dirs.contains(path)
            || known.placed.contains(&path_hash(path))
    }
    /// `create_dir_all` that remembers, and remembers which directories it made.
    fn create(&self, dir: &Path) -> std::io::Result<()> {
        if self.contains(dir) {
            return Ok(());
        }
        let made = match std::fs::create_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match dir.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => {
                    // A parent it knew is gone: the mirror changed behind its back.
                    if self.contains(parent) {
                        self.clear();
                    }
                    self.create(parent)?;
                    std::fs::create_dir(dir)
                }
                _ => Err(e),
            },
            other => other,
        };
        match made {
            Ok(()) => {
                self.placed(dir);
                self.insert(dir);
                self.lock().made.insert(dir.to_path_buf());
                Ok(())
            }
            // There already (as `create_dir_all` has it, a symlink to a directory counts).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {
                self.insert(dir);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
    /// Runs `op`, and once more after re-creating `path`'s parent if it failed with
    /// NotFound while the parent was thought to exist.
    fn retry_parent<T>(&self, path: &Path, op: impl Fn() -> std::io::Result<T>) -> std::io::Result<T> {
        match op() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.parent().is_some_and(|p| self.contains(p)) => {
                self.clear();
                match path.parent() {
                    Some(parent) => self.create(parent)?,
                    None => return Err(e),
                }
                op()
            }
            other => other,
        }
    }
}

type DelegateFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

fn internal(e: std::io::Error) -> IdeviceError {
    IdeviceError::InternalError(e.to_string())
}

/// Finished files are handed to the pipeline several at a time (one wake-up of its
/// chunker thread, not one per file): at this many, at this many bytes (so a large file
/// goes at once), at the end of each batch the phone sends, and when the backup ends.
const HANDOFF_FILES: usize = 32;
const HANDOFF_BYTES: u64 = 1024 * 1024;

impl Drop for MirrorDelegate {
    fn drop(&mut self) {
        // A backup that failed: the mirror is left as the phone knows it.
        if let Err(e) = self.staged.settle_all() {
            tracing::warn!(error = %e, "could not put staged files back into the mirror's Snapshot directory");
        }
        self.hand_off();
    }
}

impl MirrorDelegate {
    fn hand_off(&self) {
        let files = std::mem::take(&mut *self.handoff.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).0;
        // The pipeline may have stopped (an upload failed): the backup ends anyway.
        if !files.is_empty()
            && let Some(feed) = &self.sink.finished
        {
            let _ = feed.files(files);
        }
    }
    /// Before anything but a move touches `path`: staged files a swap moved early go back.
    fn settle(&self, path: &Path) -> Result<(), IdeviceError> {
        self.staged.settle_touching(path).map_err(internal)
    }
    /// [`Self::settle`] for a question that cannot fail: the answer is then what the file
    /// system holds, and the failure, kept, fails the backup at its end.
    fn settle_to_ask(&self, path: &Path) {
        if let Err(e) = self.settle(path) {
            tracing::warn!(error = %e, "could not put staged files back into the mirror's Snapshot directory");
        }
    }
    fn seen(&self) {
        if self.sink.started.send_if_modified(|s| !std::mem::replace(s, true)) {
            self.sink.progress.set_phase(Phase::Receiving);
        }
    }
}

impl BackupDelegate for MirrorDelegate {
    fn get_free_disk_space(&self, path: &Path) -> u64 {
        self.seen();
        let free = FsBackupDelegate.get_free_disk_space(path);
        match self.sink.budget {
            // The mirror may grow to its budget: the room left is the budget less what
            // it holds now.
            Some(budget) => free.min(budget.saturating_sub(self.sink.mirror_bytes)),
            None => free,
        }
    }
    fn open_file_read<'a>(
        &'a self,
        path: &'a Path,
    ) -> DelegateFuture<'a, Result<Box<dyn std::io::Read + Send>, IdeviceError>> {
        self.seen();
        Box::pin(async move {
            self.settle(path)?;
            // Missing files must be NotFound: that is how "no previous backup" reads.
            match std::fs::File::open(path) {
                Ok(f) => Ok(Box::new(f) as Box<dyn std::io::Read + Send>),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(IdeviceError::NotFound),
                Err(e) => Err(internal(e)),
            }
        })
    }
    fn create_file_write<'a>(
        &'a self,
        path: &'a Path,
    ) -> DelegateFuture<'a, Result<Box<dyn std::io::Write + Send>, IdeviceError>> {
        self.seen();
        Box::pin(async move {
            self.settle(path)?;
            let file =
                self.known.retry_parent(path, || crate::pipeline::create_for_reading_back(path)).map_err(internal)?;
            self.known.placed(path);
            let reader = file.try_clone().ok();
            let before = self.sink.progress.bytes_received.load(std::sync::atomic::Ordering::Relaxed);
            *self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some((path.to_path_buf(), reader, before));
            Ok(Box::new(Counted { file, progress: self.sink.progress.clone() }) as Box<dyn std::io::Write + Send>)
        })
    }
    fn create_dir_all<'a>(&'a self, path: &'a Path) -> DelegateFuture<'a, Result<(), IdeviceError>> {
        // Not a sign of the device: idevice creates the backup directory before it asks.
        Box::pin(async move {
            // idevice asks for the destination's directory before every move: one that
            // exists is left alone, swapped or not.
            if !self.known.contains(path) {
                self.settle(path)?;
            }
            self.known.create(path).map_err(internal)
        })
    }
    fn remove<'a>(&'a self, path: &'a Path) -> DelegateFuture<'a, Result<(), IdeviceError>> {
        Box::pin(async move {
            // idevice removes every file's path before creating it, mostly in vain: no
            // system call where nothing can be, one for a file, a second for a directory.
            self.settle(path)?;
            if !self.known.may_exist(path) {
                return Err(internal(std::io::ErrorKind::NotFound.into()));
            }
            match std::fs::remove_file(path) {
                // A symlink to a directory may have been known as one.
                Ok(()) => {
                    self.known.forget(path);
                    Ok(())
                }
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => match std::fs::symlink_metadata(path) {
                    Ok(m) if m.is_dir() => {
                        self.known.forget(path);
                        std::fs::remove_dir_all(path)
                    }
                    _ => Err(e),
                },
                done => done,
            }
            .map_err(internal)
        })
    }
    fn rename<'a>(&'a self, from: &'a Path, to: &'a Path) -> DelegateFuture<'a, Result<(), IdeviceError>> {
        Box::pin(async move {
            Progress::add(&self.sink.progress.files_moved, 1);
            let dest_made = |d: &Path| self.known.made_empty(d);
            match self.staged.try_move(from, to, |s| self.known.made(s), dest_made).map_err(internal)? {
                // The names a swap brings in (`to`'s among them) are recorded once, then.
                (Moved::Done, swapped_in) => {
                    if let Some(dest) = to.parent() {
                        for name in swapped_in {
                            self.known.placed(&dest.join(name));
                        }
                    }
                    Progress::add(&self.sink.progress.files_moved_by_swap, 1);
                    return Ok(());
                }
                (Moved::NotHere, _) => {
                    self.settle(from)?;
                    self.settle(to)?;
                }
            }
            self.known.forget(from);
            // A directory moved over another replaces what the cache knew of it.
            self.known.forget(to);
            match self.known.retry_parent(to, || std::fs::rename(from, to)) {
                Ok(()) => {}
                // Debug: a resumed backup may ask again for every file it staged.
                Err(e) if staging::moved_before(from, to, &e) => {
                    tracing::debug!(from = %from.display(), to = %to.display(), "a move the iPhone asked for again was done before");
                }
                Err(e) => return Err(internal(e)),
            }
            self.known.placed(to);
            Ok(())
        })
    }
    fn copy<'a>(&'a self, src: &'a Path, dst: &'a Path) -> DelegateFuture<'a, Result<(), IdeviceError>> {
        Box::pin(async move {
            self.settle(src)?;
            self.settle(dst)?;
            if std::fs::metadata(src).is_ok_and(|m| m.is_dir()) {
                self.known.create(dst)
            } else {
                // Placed first: a copy that fails halfway leaves a file behind.
                self.known.placed(dst);
                self.known.retry_parent(dst, || std::fs::copy(src, dst).map(|_| ()))
            }
            .map_err(internal)
        })
    }
    fn exists<'a>(&'a self, path: &'a Path) -> DelegateFuture<'a, bool> {
        Box::pin(async move {
            self.settle_to_ask(path);
            path.exists()
        })
    }
    fn is_dir<'a>(&'a self, path: &'a Path) -> DelegateFuture<'a, bool> {
        Box::pin(async move {
            self.settle_to_ask(path);
            path.is_dir()
        })
    }
    fn list_dir<'a>(&'a self, path: &'a Path) -> DelegateFuture<'a, Result<Vec<DirEntryInfo>, IdeviceError>> {
        Box::pin(async move {
            self.settle(path)?;
            let mut out = Vec::new();
            for entry in std::fs::read_dir(path).map_err(internal)? {
                let entry = entry.map_err(internal)?;
                let meta = entry.metadata().ok();
                out.push(DirEntryInfo {
                    name: entry.file_name().to_string_lossy().into_owned(),
                    is_dir: meta.as_ref().is_some_and(|m| m.is_dir()),
                    is_file: meta.as_ref().is_some_and(|m| m.is_file()),
                    size: meta.as_ref().map_or(0, |m| m.len()),
                    modified: meta.and_then(|m| m.modified().ok()),
                });
            }
            Ok(out)
        })
    }
    fn on_file_received(&self, _path: &str, _count: u32) {
        Progress::add(&self.sink.progress.files_received, 1);
        let current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some((path, reader, before)) = current
            && self.sink.finished.is_some()
        {
            let size =
                self.sink.progress.bytes_received.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(before);
            let full = {
                let mut handoff = self.handoff.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                handoff.0.push((path, reader));
                handoff.1 += size;
                handoff.0.len() >= HANDOFF_FILES || handoff.1 >= HANDOFF_BYTES
            };
            if full {
                self.hand_off();
            }
        }
    }
    fn on_progress(&self, progress: BackupProgress) {
        // Called at the end of each batch of files the phone sends, and within a large one.
        self.hand_off();
        let p = &self.sink.progress;
        if progress.session_bytes_total > 0 {
            p.bytes_expected.store(progress.session_bytes_total, std::sync::atomic::Ordering::Relaxed);
        }
        if progress.overall_progress >= 0.0 {
            p.device_percent_x100
                .store((progress.overall_progress.min(100.0) * 100.0) as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A file being received, counting its bytes.
struct Counted {
    file: std::fs::File,
    progress: Arc<Progress>,
}

impl std::io::Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        Progress::add(&self.progress.bytes_received, n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Waits until `udid` has left usbmuxd's list and come back (a reboot), at most `timeout`.
pub async fn wait_for_reboot(addr: &UsbmuxdAddr, udid: &str, timeout: std::time::Duration) -> Result<(), DeviceError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut gone = false;
    while tokio::time::Instant::now() < deadline {
        let present = attached(addr).await?.iter().any(|p| p.udid == udid);
        if !present {
            gone = true;
        } else if gone {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Err(DeviceError::Failed(format!(
        "the iPhone did not come back within {} s after the restore; check it",
        timeout.as_secs()
    )))
}

/// Whether dotted version `a` is older than `b` ("17.5.1" < "17.6").
pub fn version_older(a: &str, b: &str) -> bool {
    let parse = |v: &str| v.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
    let (mut a, mut b) = (parse(a), parse(b));
    let n = a.len().max(b.len());
    a.resize(n, 0);
    b.resize(n, 0);
    a < b
}

/// Info.plist as libimobiledevice and pymobiledevice3 write it (restores read it).
pub fn info_plist(udid: &str, values: &Dictionary) -> Dictionary {
    let text = |k: &str| values.get(k).and_then(Value::as_string).unwrap_or_default().to_string();
    let mut info = Dictionary::new();
    info.insert("Build Version".into(), text("BuildVersion").into());
    info.insert("Device Name".into(), text("DeviceName").into());
    info.insert("Display Name".into(), text("DeviceName").into());
    info.insert("GUID".into(), uuid::Uuid::new_v4().simple().to_string().to_uppercase().into());
    info.insert("Product Type".into(), text("ProductType").into());
    info.insert("Product Version".into(), text("ProductVersion").into());
    info.insert("Serial Number".into(), text("SerialNumber").into());
    info.insert("Target Identifier".into(), udid.into());
    info.insert("Target Type".into(), "Device".into());
    info.insert("Unique Identifier".into(), udid.to_uppercase().into());
    info.insert("Last Backup Date".into(), Value::Date(std::time::SystemTime::now().into()));
    info.insert("Installed Applications".into(), Value::Array(Vec::new()));
    info.insert("Applications".into(), Value::Dictionary(Dictionary::new()));
    info.insert("iTunes Version".into(), "12.13".into());
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(version_older("17.5.1", "17.6"));
        assert!(version_older("9.3", "17.0"));
        assert!(!version_older("17.10", "17.9"));
        assert!(!version_older("17.5", "17.5.0"));
    }

    #[test]
    fn known_directories_are_remembered_with_their_ancestors_and_forgotten_with_them() {
        let tmp = tempfile::tempdir().unwrap();
        let known = KnownDirs::default();
        let deep = tmp.path().join("T/Snapshot/ab");
        known.create(&deep).unwrap();
        assert!(deep.is_dir());
        assert!(known.contains(&deep) && known.contains(&tmp.path().join("T/Snapshot")) && known.contains(tmp.path()));
        // Moving a directory away forgets it and what is under it, not its siblings.
        known.create(&tmp.path().join("T/cd")).unwrap();
        known.forget(&tmp.path().join("T/Snapshot"));
        assert!(!known.contains(&deep) && !known.contains(&tmp.path().join("T/Snapshot")));
        assert!(known.contains(&tmp.path().join("T/cd")) && known.contains(&tmp.path().join("T")));
        // A path that is not known (a file) forgets nothing.
        known.forget(&tmp.path().join("T/cd/file"));
        assert!(known.contains(&tmp.path().join("T/cd")));
    }

    #[test]
    fn a_name_in_a_directory_this_backup_made_exists_only_once_the_backup_put_it_there() {
        let tmp = tempfile::tempdir().unwrap();
        let known = KnownDirs::default();
        // Made now, with the parents it lacked: nothing can be in it yet.
        let staging = tmp.path().join("T/Snapshot/ab");
        known.create(&staging).unwrap();
        let file = staging.join("ab01");
        assert!(!known.may_exist(&file) && !known.may_exist(&staging.join("ab02")));
        known.placed(&file);
        assert!(known.may_exist(&file) && !known.may_exist(&staging.join("ab02")));
        // A directory made in one made by this backup is a name there too.
        assert!(known.may_exist(&tmp.path().join("T/Snapshot")));
        assert!(!known.may_exist(&tmp.path().join("T/Manifest.db")));
        // A directory that was there before may hold anything.
        assert!(known.may_exist(&tmp.path().join("anything")));
        let before = tmp.path().join("before");
        std::fs::create_dir(&before).unwrap();
        known.create(&before).unwrap();
        assert!(known.may_exist(&before.join("x")));
        // Moved away (or replaced by a move), it is no longer one this backup made.
        known.forget(&staging);
        assert!(known.may_exist(&staging.join("ab02")));
        // Once the cache is dropped, no directory is known to be made: any name may exist.
        known.clear();
        assert!(known.may_exist(&file));
    }

    #[test]
    fn a_directory_removed_behind_the_cache_is_made_again_for_the_next_file() {
        let tmp = tempfile::tempdir().unwrap();
        let known = KnownDirs::default();
        let dir = tmp.path().join("T/ab");
        known.create(&dir).unwrap();
        std::fs::remove_dir_all(tmp.path().join("T")).unwrap();
        // The cache still says it exists: the create fails once, then succeeds.
        assert!(known.contains(&dir));
        let file = dir.join("abcdef");
        known.retry_parent(&file, || std::fs::write(&file, b"x")).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
        // So is a directory below one that is gone.
        std::fs::remove_dir_all(tmp.path().join("T")).unwrap();
        known.create(&dir.join("cd")).unwrap();
        assert!(dir.join("cd").is_dir());
        // A rename whose source is missing still fails as it should.
        let missing = tmp.path().join("T/ab/missing");
        let err = known.retry_parent(&dir.join("to"), || std::fs::rename(&missing, dir.join("to"))).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
