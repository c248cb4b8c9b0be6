//! `com.apple.mobilebackup2`, the device side: the DeviceLink version exchange, `Hello`,
//! and the `Backup` and `Restore` requests, driven the way a real iPhone drives them — the
//! device decides and asks the host to download, upload, move and remove files.
//!
//! Backup: read the previous `Status.plist`, `Manifest.plist` and `Manifest.db` (missing or
//! unfinished means a full backup), ask for free space, create `<T>`, `<T>/00…ff`,
//! `<T>/Snapshot` and its `00…ff`, then `Status.plist` "uploading", the new and changed
//! files into `<T>/Snapshot/xx/<fileID>` in batches, the new manifest, "moving", moves
//! into place, "removing", removal of deleted files and of `Snapshot`, "finished".
//! Restore: read the source backup's manifest, status and Info.plist, check them, download
//! every file the manifest lists, then the device's content *is* the backup's; with
//! `RestoreShouldReboot` the device detaches and attaches again. See the reference §2.6.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use plist::{Dictionary, Value};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::content::FileKey;
use crate::devices::{DeviceState, Registry};
use crate::framing::{self, FrameError};
use crate::manifest::{self, ManifestFile};

/// `___EmptyParameterString___`, DeviceLink's "no value".
pub const EMPTY: &str = "___EmptyParameterString___";
/// Data block of a file stream.
const CODE_FILE_DATA: u8 = 0x0c;
const CODE_SUCCESS: u8 = 0x00;
const CODE_ERROR_LOCAL: u8 = 0x06;
const CODE_ERROR_REMOTE: u8 = 0x0b;
/// Bytes per data block the device sends (hosts read each block whole).
const BLOCK: usize = 32 * 1024;
/// Files per upload, move or remove batch (a real device's default `BatchSize`).
const BATCH: usize = 128;
/// Longest path accepted in a host's file stream.
const MAX_PATH: usize = 4096;
/// Largest metadata file (Status/Manifest/Info.plist, Manifest.db) read into memory.
const MAX_METADATA_BYTES: u64 = 1 << 30;

/// MobileBackup2 error codes (MBErrorDomain) the hosts know.
pub mod code {
    pub const OK: u64 = 0;
    pub const UNSUPPORTED: u64 = 1;
    pub const OUT_OF_SPACE: u64 = 105;
    pub const MISSING_BACKUP: u64 = 203;
    pub const BACKUP_STATE: u64 = 204;
    pub const INCOMPLETE_BACKUP: u64 = 205;
    pub const DEVICE_LOCKED: u64 = 208;
    pub const NEWER_BACKUP: u64 = 209;
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("host sent {got} where {expected} was due")]
    Protocol { expected: &'static str, got: String },
    #[error("host answered {message} with status {code}: {detail}")]
    Status { message: &'static str, code: i64, detail: String },
    #[error("connection dropped after {0} bytes (fault injection)")]
    Dropped(u64),
}

fn protocol(expected: &'static str, got: impl std::fmt::Debug) -> BackupError {
    BackupError::Protocol { expected, got: format!("{got:?}") }
}

/// A request that ended with a MobileBackup2 error for the host.
#[derive(Debug)]
struct Failure {
    code: u64,
    description: String,
}

impl Failure {
    fn new(code: u64, description: impl Into<String>) -> Self {
        Self { code, description: description.into() }
    }
}

/// What the device does with a file the host sends.
enum Sink<'a> {
    Memory,
    Blobs(&'a std::path::Path),
}

/// A file the host sent.
enum Received {
    Bytes(Vec<u8>),
    Blob { sha256: String, size: u64 },
}

/// The device's end of one MobileBackup2 connection.
struct Link<'a, S> {
    s: S,
    state: &'a DeviceState,
    /// Bytes of file data sent, for the drop-after fault.
    sent: u64,
    started: tokio::time::Instant,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Link<'_, S> {
    async fn send(&mut self, items: Vec<Value>) -> Result<(), BackupError> {
        Ok(framing::write_binary(&mut self.s, &Value::Array(items)).await?)
    }

    async fn recv(&mut self) -> Result<Option<Vec<Value>>, BackupError> {
        match framing::read_plist(&mut self.s).await? {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(other) => Err(protocol("a DeviceLink array", other)),
        }
    }

    /// Reads the host's `DLMessageStatusResponse` to a device request.
    async fn status(&mut self, message: &'static str) -> Result<Value, BackupError> {
        let Some(reply) = self.recv().await? else { return Err(protocol("DLMessageStatusResponse", "end of stream")) };
        if reply.first().and_then(Value::as_string) != Some("DLMessageStatusResponse") || reply.len() < 4 {
            return Err(protocol("DLMessageStatusResponse", reply));
        }
        // Hosts send the code signed (idevice) or as a u64 wrap of a negative number.
        let code = reply[1].as_signed_integer().or_else(|| reply[1].as_unsigned_integer().map(|u| u as i64));
        match code {
            Some(0) => Ok(reply[3].clone()),
            Some(code) => Err(BackupError::Status { message, code, detail: format!("{:?} {:?}", reply[2], reply[3]) }),
            None => Err(protocol("a status code", &reply[1])),
        }
    }

    async fn request(&mut self, message: &'static str, mut args: Vec<Value>) -> Result<Value, BackupError> {
        args.insert(0, message.into());
        self.send(args).await?;
        self.status(message).await
    }

    async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        let faults = self.state.faults();
        if let Some(limit) = faults.drop_after_bytes
            && self.sent + bytes.len() as u64 > limit
        {
            self.state.clear_drop_fault();
            return Err(BackupError::Dropped(self.sent));
        }
        self.s.write_all(bytes).await?;
        self.sent += bytes.len() as u64;
        // At least 1 kB/s, so any rate a test asks for gives a finite wait.
        if let Some(mbps) = faults.throttle_mb_per_s.filter(|r| r.is_finite() && *r > 0.0) {
            let due = Duration::from_secs_f64(self.sent as f64 / (mbps.max(0.001) * 1e6));
            if let Some(at) = self.started.checked_add(due) {
                tokio::time::sleep_until(at).await;
            }
        }
        Ok(())
    }

    async fn write_name(&mut self, name: &str) -> Result<(), BackupError> {
        let mut b = (name.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(name.as_bytes());
        self.write_raw(&b).await
    }

    /// `DLMessageUploadFiles`: streams `files` (host path, device path, reader) to the host.
    async fn upload(
        &mut self,
        files: Vec<(String, String, Box<dyn std::io::Read + Send>)>,
        total: u64,
        progress: f64,
    ) -> Result<(), BackupError> {
        self.send(vec![
            "DLMessageUploadFiles".into(),
            Value::Dictionary(Dictionary::new()),
            Value::Real(progress),
            Value::Integer(total.into()),
        ])
        .await?;
        let mut buf = vec![0u8; BLOCK + 5];
        for (host_path, device_path, mut reader) in files {
            self.write_name(&device_path).await?;
            self.write_name(&host_path).await?;
            loop {
                let n = read_full(&mut reader, &mut buf[5..])?;
                if n == 0 {
                    break;
                }
                buf[..4].copy_from_slice(&(n as u32 + 1).to_be_bytes());
                buf[4] = CODE_FILE_DATA;
                self.write_raw(&buf[..n + 5]).await?;
            }
            self.write_raw(&[0, 0, 0, 1, CODE_SUCCESS]).await?;
        }
        self.write_raw(&[0, 0, 0, 0]).await?;
        self.s.flush().await?;
        self.status("DLMessageUploadFiles").await.map(drop)
    }

    async fn upload_bytes(&mut self, host_path: String, bytes: Vec<u8>, progress: f64) -> Result<(), BackupError> {
        let total = bytes.len() as u64;
        let device_path = format!("/var/mobile/Library/Backup/{}", host_path.rsplit('/').next().unwrap_or_default());
        self.upload(vec![(host_path, device_path, Box::new(std::io::Cursor::new(bytes)))], total, progress).await
    }

    /// `DLMessageDownloadFiles`: the host streams each path back, or an error for it.
    async fn download(
        &mut self,
        paths: &[String],
        sink: Sink<'_>,
        progress: f64,
    ) -> Result<Vec<Result<Received, String>>, BackupError> {
        let list = paths.iter().map(|p| Value::String(p.clone())).collect();
        self.send(vec![
            "DLMessageDownloadFiles".into(),
            Value::Array(list),
            Value::Dictionary(Dictionary::new()),
            Value::Real(progress),
            Value::Integer(0u64.into()),
        ])
        .await?;
        let mut out = Vec::with_capacity(paths.len());
        loop {
            let len = self.s.read_u32().await? as usize;
            if len == 0 {
                break;
            }
            if len > MAX_PATH {
                return Err(protocol("a path in the file stream", format!("{len} bytes")));
            }
            if out.len() == paths.len() {
                return Err(protocol("no more files than were asked for", paths.len() + 1));
            }
            let mut name = vec![0u8; len];
            self.s.read_exact(&mut name).await?;
            out.push(self.receive_file(&sink).await?);
        }
        if out.len() != paths.len() {
            return Err(protocol("one file per requested path", format!("{} of {}", out.len(), paths.len())));
        }
        // The host adds a multi-status (-13) when some files failed; they are reported above.
        match self.status("DLMessageDownloadFiles").await {
            Ok(_) | Err(BackupError::Status { code: -13, .. }) => Ok(out),
            Err(e) => Err(e),
        }
    }

    async fn receive_file(&mut self, sink: &Sink<'_>) -> Result<Result<Received, String>, BackupError> {
        let mut bytes = Vec::new();
        let mut file: Option<(tempfile::NamedTempFile, ring::digest::Context)> = match sink {
            Sink::Memory => None,
            Sink::Blobs(dir) => {
                Some((tempfile::NamedTempFile::new_in(dir)?, ring::digest::Context::new(&ring::digest::SHA256)))
            }
        };
        let mut size = 0u64;
        let mut error = None;
        loop {
            let nlen = self.s.read_u32().await? as usize;
            if nlen == 0 {
                return Err(protocol("a file block", "an empty block"));
            }
            let code = self.s.read_u8().await?;
            let n = nlen - 1;
            if n > 4 * BLOCK * 8 {
                return Err(protocol("a file block of at most 1 MiB", n));
            }
            let mut data = vec![0u8; n];
            self.s.read_exact(&mut data).await?;
            match code {
                CODE_FILE_DATA => {
                    size += n as u64;
                    match &mut file {
                        None if size > MAX_METADATA_BYTES => return Err(protocol("a smaller metadata file", size)),
                        None => bytes.extend_from_slice(&data),
                        Some((f, hash)) => {
                            std::io::Write::write_all(f, &data)?;
                            hash.update(&data);
                        }
                    }
                }
                CODE_SUCCESS => break,
                CODE_ERROR_LOCAL | CODE_ERROR_REMOTE => {
                    error = Some(String::from_utf8_lossy(&data).into_owned());
                    break;
                }
                other => return Err(protocol("a file block code", other)),
            }
        }
        if let Some(e) = error {
            return Ok(Err(e));
        }
        Ok(Ok(match file {
            None => Received::Bytes(bytes),
            Some((f, hash)) => {
                let sha256 = hex(hash.finish().as_ref());
                let Sink::Blobs(dir) = sink else { unreachable!("a file is only opened for a blob sink") };
                f.persist(dir.join(&sha256)).map_err(|e| e.error)?;
                Received::Blob { sha256, size }
            }
        }))
    }

    async fn download_one(&mut self, path: String) -> Result<Option<Vec<u8>>, BackupError> {
        match self.download(&[path], Sink::Memory, 0.0).await?.pop() {
            Some(Ok(Received::Bytes(b))) => Ok(Some(b)),
            _ => Ok(None),
        }
    }
}

fn read_full(r: &mut dyn std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn response(code: u64, description: Option<&str>) -> Vec<Value> {
    let mut d = Dictionary::new();
    d.insert("MessageName".into(), "Response".into());
    d.insert("ErrorCode".into(), Value::Integer(code.into()));
    if let Some(text) = description {
        d.insert("ErrorDescription".into(), text.into());
    }
    vec!["DLMessageProcessMessage".into(), Value::Dictionary(d)]
}

/// Serves one MobileBackup2 connection.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: S,
    state: &DeviceState,
    registry: &std::sync::Arc<Registry>,
) -> Result<(), BackupError> {
    let mut link = Link { s, state, sent: 0, started: tokio::time::Instant::now() };
    link.send(vec!["DLMessageVersionExchange".into(), Value::Integer(300u64.into()), Value::Integer(0u64.into())])
        .await?;
    match link.recv().await? {
        Some(m)
            if m.first().and_then(Value::as_string) == Some("DLMessageVersionExchange")
                && m.get(1).and_then(Value::as_string) == Some("DLVersionsOk") => {}
        other => return Err(protocol("DLVersionsOk", other)),
    }
    link.send(vec!["DLMessageDeviceReady".into()]).await?;
    let mut reboot = false;
    while let Some(msg) = link.recv().await? {
        match msg.first().and_then(Value::as_string) {
            Some("DLMessageDisconnect") => break,
            Some("DLMessageProcessMessage") => {}
            _ => return Err(protocol("DLMessageProcessMessage", msg)),
        }
        let Some(body) = msg.get(1).and_then(Value::as_dictionary) else {
            return Err(protocol("a message dictionary", msg));
        };
        let name = body.get("MessageName").and_then(Value::as_string).unwrap_or_default().to_string();
        tracing::info!(device.udid = %state.device.udid, mobilebackup2.request = %name, "MobileBackup2 request");
        let result = match name.as_str() {
            "Hello" => {
                link.send(hello(body)).await?;
                continue;
            }
            "Backup" => backup(&mut link, body).await?,
            "Restore" => {
                let r = restore(&mut link, body).await?;
                reboot =
                    r.is_ok() && options(body).get("RestoreShouldReboot").and_then(Value::as_boolean) != Some(false);
                r
            }
            other => Err(Failure::new(code::UNSUPPORTED, format!("{other} is not supported by the virtual iPhone"))),
        };
        match result {
            Ok(()) => link.send(response(code::OK, None)).await?,
            Err(f) => {
                tracing::info!(device.udid = %state.device.udid, error.code = f.code, error = %f.description, "MobileBackup2 request failed");
                link.send(response(f.code, Some(&f.description))).await?;
            }
        }
    }
    if reboot {
        registry.reboot(&state.device.udid);
    }
    Ok(())
}

fn hello(body: &Dictionary) -> Vec<Value> {
    let offered: Vec<f64> = body
        .get("SupportedProtocolVersions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_real)
        .collect();
    let best = offered
        .iter()
        .copied()
        .filter(|v| (2.0..=2.1).contains(v))
        .fold(None, |acc: Option<f64>, v| Some(acc.map_or(v, |a| a.max(v))));
    let mut d = Dictionary::new();
    d.insert("MessageName".into(), "Response".into());
    match best {
        Some(v) => {
            d.insert("ErrorCode".into(), Value::Integer(0u64.into()));
            d.insert("ProtocolVersion".into(), Value::Real(v));
        }
        None => {
            d.insert("ErrorCode".into(), Value::Integer(code::UNSUPPORTED.into()));
            d.insert("ErrorDescription".into(), "no protocol version in common".into());
        }
    }
    vec!["DLMessageProcessMessage".into(), Value::Dictionary(d)]
}

fn options(body: &Dictionary) -> Dictionary {
    body.get("Options").and_then(Value::as_dictionary).cloned().unwrap_or_default()
}

/// Turns a link error into the connection's end, and host-side refusals into failures.
type Step<T> = Result<Result<T, Failure>, BackupError>;

async fn backup<S: AsyncRead + AsyncWrite + Unpin + Send>(link: &mut Link<'_, S>, body: &Dictionary) -> Step<()> {
    let state = link.state;
    let target = body.get("TargetIdentifier").and_then(Value::as_string).unwrap_or(&state.device.udid).to_string();
    if !state.wait_for_passcode().await {
        return Ok(Err(Failure::new(code::DEVICE_LOCKED, "the passcode was not entered on the device")));
    }
    let force_full = options(body).get("ForceFullBackup").and_then(Value::as_boolean) == Some(true);

    // 1. The previous backup decides between full and incremental.
    let mut previous: HashMap<String, ManifestFile> = HashMap::new();
    let status = link.download_one(format!("{target}/Status.plist")).await?;
    let finished = status
        .as_deref()
        .and_then(|b| manifest::read_status_plist(b).ok())
        .is_some_and(|s| s.snapshot_state == "finished" && s.version.parse::<f64>().is_ok_and(|v| v >= 3.3));
    if finished && !force_full {
        let plist = link.download_one(format!("{target}/Manifest.plist")).await?;
        let db = link.download_one(format!("{target}/Manifest.db")).await?;
        if let (Some(_), Some(db)) = (plist, db)
            && let Ok(rows) = manifest::read_manifest_db(&db)
        {
            previous = rows.into_iter().filter(|r| r.flags == 1).map(|r| (r.file_id.clone(), r)).collect();
        }
    }
    let is_full = previous.is_empty();

    // 2. What changed.
    let content = match state.content() {
        Ok(c) => c,
        Err(e) => return Ok(Err(Failure::new(code::UNSUPPORTED, format!("reading the device's content: {e}")))),
    };
    let files = std::sync::Arc::new(content.manifest_files());
    // The new Manifest.db describes every file, sent or not, so it is built on another
    // thread while the files go out: the host does not wait for this simulator's SQLite
    // after the last file (a phone does this work on its own CPU).
    let manifest_db = {
        let files = files.clone();
        tokio::task::spawn_blocking(move || manifest::build_manifest_db(&files))
    };
    let changed: Vec<usize> = (0..files.len())
        .filter(|&i| {
            let f = &files[i];
            previous.get(&f.file_id).is_none_or(|p| p.size != f.size || p.mtime != f.mtime)
        })
        .collect();
    let current: std::collections::HashSet<&str> = files.iter().map(|f| f.file_id.as_str()).collect();
    let deleted: Vec<&str> = previous.keys().map(String::as_str).filter(|id| !current.contains(id)).collect();
    let upload_bytes: u64 = changed.iter().map(|&i| files[i].size).sum();
    tracing::info!(
        device.udid = %state.device.udid, backup.full = is_full, backup.files = files.len(), backup.changed = changed.len(),
        backup.deleted = deleted.len(), backup.bytes = upload_bytes, "backup plan"
    );

    // 3. Room on the host.
    let free = link.request("DLMessageGetFreeDiskSpace", vec![Value::Dictionary(Dictionary::new())]).await?;
    if let Some(free) = free.as_unsigned_integer()
        && free < upload_bytes
    {
        return Ok(Err(Failure::new(
            code::OUT_OF_SPACE,
            format!("not enough space on the host for the backup: {upload_bytes} bytes needed, {free} free"),
        )));
    }

    // 4. Directories: the backup, its 256 fan-out directories, the snapshot and its fan-out.
    let mut dirs = vec![target.clone()];
    dirs.extend((0..=255u8).map(|b| format!("{target}/{b:02x}")));
    dirs.push(format!("{target}/Snapshot"));
    dirs.extend((0..=255u8).map(|b| format!("{target}/Snapshot/{b:02x}")));
    for dir in dirs {
        link.request("DLMessageCreateDirectory", vec![dir.into()]).await?;
    }

    let uuid = uuid::Uuid::new_v4().to_string().to_uppercase();
    let status = |snapshot: &str| manifest::status_plist(snapshot, is_full, &uuid, SystemTime::now());
    link.upload_bytes(format!("{target}/Status.plist"), status("uploading"), 0.0).await?;

    // 5. New and changed files into the snapshot. Each batch's files are opened (this
    // simulator builds its text, plist and SQLite bodies then) on another thread while
    // the batch before goes out, as a phone reads ahead from its flash.
    let open_next = |batch: Vec<usize>| {
        let (content, files, blobs, target) = (content.clone(), files.clone(), state.blobs_dir(), target.clone());
        tokio::task::spawn_blocking(move || open_batch(&content, &files, &batch, &blobs, &target))
    };
    let mut batches = changed.chunks(BATCH).map(<[usize]>::to_vec);
    let mut next = batches.next().map(&open_next);
    let mut done = 0u64;
    while let Some(opening) = next.take() {
        let (streams, batch_bytes) = opening.await.map_err(std::io::Error::other)??;
        next = batches.next().map(&open_next);
        let progress = if upload_bytes == 0 { 100.0 } else { done as f64 * 100.0 / upload_bytes as f64 };
        link.upload(streams, batch_bytes, progress).await?;
        done += batch_bytes;
    }

    // 6. The new manifest, then moves into place.
    let facts = state.facts();
    let plist = manifest::manifest_plist(&facts, &content.app_bundles(), SystemTime::now());
    let db = match manifest_db.await {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return Ok(Err(Failure::new(code::UNSUPPORTED, format!("building Manifest.db: {e}")))),
        Err(e) => return Ok(Err(Failure::new(code::UNSUPPORTED, format!("building Manifest.db: {e}")))),
    };
    link.upload_bytes(format!("{target}/Snapshot/Manifest.plist"), plist, 100.0).await?;
    link.upload_bytes(format!("{target}/Snapshot/Manifest.db"), db, 100.0).await?;
    link.upload_bytes(format!("{target}/Status.plist"), status("moving"), 100.0).await?;
    for batch in changed.chunks(BATCH) {
        let moves: Dictionary = batch
            .iter()
            .map(|&i| {
                let f = &files[i];
                let rel = format!("{}/{}", &f.file_id[..2], f.file_id);
                (format!("{target}/Snapshot/{rel}"), Value::String(format!("{target}/{rel}")))
            })
            .collect();
        move_items(link, moves).await?;
    }
    let moves: Dictionary = ["Manifest.plist", "Manifest.db"]
        .iter()
        .map(|n| (format!("{target}/Snapshot/{n}"), Value::String(format!("{target}/{n}"))))
        .collect();
    move_items(link, moves).await?;

    // 7. Removals: files deleted on the device, then the snapshot directory.
    link.upload_bytes(format!("{target}/Status.plist"), status("removing"), 100.0).await?;
    for batch in deleted.chunks(BATCH) {
        let paths = batch.iter().map(|id| Value::String(format!("{target}/{}/{id}", &id[..2]))).collect();
        remove_items(link, paths).await?;
    }
    remove_items(link, vec![Value::String(format!("{target}/Snapshot"))]).await?;
    link.upload_bytes(format!("{target}/Status.plist"), status("finished"), 100.0).await?;
    state.record_backup(changed.len() as u64, upload_bytes);
    Ok(Ok(()))
}

/// A batch's files, opened for sending: (host path, device path, reader) each, and their bytes.
type Opened = (Vec<(String, String, Box<dyn std::io::Read + Send>)>, u64);

fn open_batch(
    content: &crate::content::Content,
    files: &[ManifestFile],
    batch: &[usize],
    blobs: &std::path::Path,
    target: &str,
) -> std::io::Result<Opened> {
    let mut streams = Vec::with_capacity(batch.len());
    let mut bytes = 0;
    for f in batch.iter().map(|&i| &files[i]) {
        let key = FileKey { domain: f.domain.clone(), path: f.path.clone() };
        let reader = content.open(blobs, &key)?;
        let device_path = format!("/var/mobile/{}/{}", f.domain, f.path);
        streams.push((format!("{target}/Snapshot/{}/{}", &f.file_id[..2], f.file_id), device_path, reader));
        bytes += f.size;
    }
    Ok((streams, bytes))
}

async fn move_items<S: AsyncRead + AsyncWrite + Unpin + Send>(
    link: &mut Link<'_, S>,
    moves: Dictionary,
) -> Result<(), BackupError> {
    link.request(
        "DLMessageMoveItems",
        vec![Value::Dictionary(moves), Value::Dictionary(Dictionary::new()), Value::Real(100.0)],
    )
    .await
    .map(drop)
}

async fn remove_items<S: AsyncRead + AsyncWrite + Unpin + Send>(
    link: &mut Link<'_, S>,
    paths: Vec<Value>,
) -> Result<(), BackupError> {
    link.request(
        "DLMessageRemoveItems",
        vec![Value::Array(paths), Value::Dictionary(Dictionary::new()), Value::Real(100.0)],
    )
    .await
    .map(drop)
}

async fn restore<S: AsyncRead + AsyncWrite + Unpin + Send>(link: &mut Link<'_, S>, body: &Dictionary) -> Step<()> {
    let state = link.state;
    let target = body.get("TargetIdentifier").and_then(Value::as_string).unwrap_or(&state.device.udid).to_string();
    let source = body.get("SourceIdentifier").and_then(Value::as_string).unwrap_or(&target).to_string();
    if !state.wait_for_passcode().await {
        return Ok(Err(Failure::new(code::DEVICE_LOCKED, "the passcode was not entered on the device")));
    }

    // 1. The backup's manifest, status and Info.plist.
    let Some(_) = link.download_one(format!("{source}/Manifest.plist")).await? else {
        return Ok(Err(Failure::new(
            code::MISSING_BACKUP,
            format!("no backup of {source}: Manifest.plist is missing"),
        )));
    };
    let Some(db) = link.download_one(format!("{source}/Manifest.db")).await? else {
        return Ok(Err(Failure::new(code::MISSING_BACKUP, format!("no backup of {source}: Manifest.db is missing"))));
    };
    let rows = match manifest::read_manifest_db(&db) {
        Ok(rows) => rows,
        Err(e) => return Ok(Err(Failure::new(code::INCOMPLETE_BACKUP, format!("unreadable Manifest.db: {e}")))),
    };
    let status = link.download_one(format!("{source}/Status.plist")).await?;
    match status.as_deref().map(manifest::read_status_plist) {
        Some(Ok(s)) if s.snapshot_state == "finished" && s.backup_state == "new" => {}
        Some(Ok(s)) => {
            return Ok(Err(Failure::new(
                code::BACKUP_STATE,
                format!("backup is not finished (SnapshotState {}, BackupState {})", s.snapshot_state, s.backup_state),
            )));
        }
        _ => return Ok(Err(Failure::new(code::INCOMPLETE_BACKUP, "Status.plist is missing or unreadable"))),
    }
    let info = link.download_one(format!("{source}/Info.plist")).await?;
    let backup_version = info
        .as_deref()
        .and_then(|b| plist::from_bytes::<Dictionary>(b).ok())
        .and_then(|d| d.get("Product Version").and_then(Value::as_string).map(str::to_string));
    if let Some(v) = &backup_version
        && version_newer(v, &state.device.ios_version)
    {
        return Ok(Err(Failure::new(
            code::NEWER_BACKUP,
            format!("the backup was made with iOS {v}, newer than this device's iOS {}", state.device.ios_version),
        )));
    }

    // 2. Every regular file, in batches, into the device's storage.
    let files: Vec<&ManifestFile> = rows.iter().filter(|r| r.flags == 1).collect();
    let total: u64 = files.iter().map(|f| f.size).sum();
    let space = state.faults().restore_space_bytes;
    let blobs = state.blobs_dir();
    let mut restored = BTreeMap::new();
    let mut done = 0u64;
    for batch in files.chunks(BATCH) {
        let paths: Vec<String> = batch.iter().map(|f| format!("{source}/{}/{}", &f.file_id[..2], f.file_id)).collect();
        let progress = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
        let got = link.download(&paths, Sink::Blobs(&blobs), progress).await?;
        for (f, r) in batch.iter().zip(got) {
            match r {
                Ok(Received::Blob { sha256, size }) => {
                    done += size;
                    restored.insert(
                        FileKey { domain: f.domain.clone(), path: f.path.clone() },
                        (sha256, size, f.mtime, f.mode),
                    );
                }
                Ok(Received::Bytes(_)) => unreachable!("restore downloads into blobs"),
                Err(e) => {
                    return Ok(Err(Failure::new(code::INCOMPLETE_BACKUP, format!("{}/{}: {e}", f.domain, f.path))));
                }
            }
        }
        if let Some(space) = space
            && done > space
        {
            return Ok(Err(Failure::new(
                code::OUT_OF_SPACE,
                format!("not enough space on the device: the backup needs {total} bytes, {space} are free"),
            )));
        }
    }
    if let Err(e) = state.restore_content(restored) {
        return Ok(Err(Failure::new(code::OUT_OF_SPACE, format!("keeping the restored files: {e}"))));
    }
    Ok(Ok(()))
}

/// Whether dotted version `a` is newer than `b` ("17.6" > "17.5.1").
fn version_newer(a: &str, b: &str) -> bool {
    let parse = |v: &str| v.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
    let (mut a, mut b) = (parse(a), parse(b));
    let n = a.len().max(b.len());
    a.resize(n, 0);
    b.resize(n, 0);
    a > b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(version_newer("17.10", "17.9.1"));
        assert!(version_newer("18", "17.6"));
        assert!(!version_newer("17.5", "17.5.0"));
        assert!(!version_newer("16.7.8", "17.5.1"));
    }

    #[test]
    fn hello_picks_the_highest_common_version_as_a_real() {
        let mut body = Dictionary::new();
        body.insert("SupportedProtocolVersions".into(), Value::Array(vec![Value::Real(2.0), Value::Real(2.1)]));
        let r = hello(&body);
        let d = r[1].as_dictionary().unwrap();
        assert_eq!(d["ErrorCode"].as_unsigned_integer(), Some(0));
        assert_eq!(d["ProtocolVersion"], Value::Real(2.1));
        body.insert("SupportedProtocolVersions".into(), Value::Array(vec![Value::Real(3.0)]));
        let r = hello(&body);
        assert_eq!(r[1].as_dictionary().unwrap()["ErrorCode"].as_unsigned_integer(), Some(code::UNSUPPORTED));
    }
}
