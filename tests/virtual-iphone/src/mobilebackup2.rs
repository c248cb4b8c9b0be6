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

use crate::content::FileKey as ContentKey;
use crate::devices::{DeviceState, Registry};
use crate::encryption::{self, EncryptingReader, Keys};
use crate::framing::{self, FrameError};
use crate::manifest::{self, ManifestFile};
use lifeboat_shared::ios_crypto::{self, ClassKeys, FileKey, Keybag};

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
    /// Into `<dir>/<sha256>`; with keys (one per path), each file decrypted first.
    Blobs(&'a std::path::Path, Option<&'a [FileKey]>),
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
            let key = match &sink {
                Sink::Blobs(_, Some(keys)) => keys.get(out.len()),
                _ => None,
            };
            out.push(self.receive_file(&sink, key).await?);
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

    async fn receive_file(
        &mut self,
        sink: &Sink<'_>,
        key: Option<&FileKey>,
    ) -> Result<Result<Received, String>, BackupError> {
        let mut bytes = Vec::new();
        let mut file: Option<(tempfile::NamedTempFile, ring::digest::Context)> = match sink {
            Sink::Memory => None,
            Sink::Blobs(dir, _) => {
                Some((tempfile::NamedTempFile::new_in(dir)?, ring::digest::Context::new(&ring::digest::SHA256)))
            }
        };
        let mut decrypt = key.map(FileKey::decryptor);
        let mut plain = Vec::new();
        // Bytes kept (the plaintext, when decrypting).
        let mut written = 0u64;
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
                            let data = match &mut decrypt {
                                Some(d) => {
                                    plain.clear();
                                    d.update(&data, &mut plain);
                                    &plain
                                }
                                None => &data,
                            };
                            std::io::Write::write_all(f, data)?;
                            hash.update(data);
                            written += data.len() as u64;
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
        if let (Some(d), Some((f, hash))) = (decrypt, file.as_mut()) {
            plain.clear();
            if let Err(e) = d.finish(&mut plain) {
                return Ok(Err(format!("the file does not decrypt with its key: {e}")));
            }
            std::io::Write::write_all(f, &plain)?;
            hash.update(&plain);
            written += plain.len() as u64;
        }
        Ok(Ok(match file {
            None => Received::Bytes(bytes),
            Some((f, hash)) => {
                let sha256 = hex(hash.finish().as_ref());
                let Sink::Blobs(dir, _) = sink else { unreachable!("a file is only opened for a blob sink") };
                f.persist(dir.join(&sha256)).map_err(|e| e.error)?;
                Received::Blob { sha256, size: written }
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

/// The final `Response` to a request; `Content` carries the text `Info` and `List` return.
fn response(code: u64, description: Option<&str>, content: Option<String>) -> Vec<Value> {
    let mut d = Dictionary::new();
    d.insert("MessageName".into(), "Response".into());
    d.insert("ErrorCode".into(), Value::Integer(code.into()));
    if let Some(text) = description {
        d.insert("ErrorDescription".into(), text.into());
    }
    if let Some(content) = content {
        d.insert("Content".into(), content.into());
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
        let none = |r: Result<(), Failure>| r.map(|()| None);
        let result = match name.as_str() {
            "Hello" => {
                link.send(hello(body)).await?;
                continue;
            }
            "Backup" => none(backup(&mut link, body).await?),
            "ChangePassword" => none(change_password(state, body).await),
            "Restore" => {
                let r = restore(&mut link, body).await?;
                reboot =
                    r.is_ok() && options(body).get("RestoreShouldReboot").and_then(Value::as_boolean) != Some(false);
                none(r)
            }
            "Info" => info(&mut link, body).await?.map(Some),
            "List" => list(&mut link, body).await?.map(Some),
            "Unback" => none(unback(&mut link, body, None).await?),
            "Extract" => {
                let text = |k: &str| body.get(k).and_then(Value::as_string).map(str::to_string);
                match (text("DomainName"), text("RelativePath")) {
                    (Some(d), Some(p)) => none(unback(&mut link, body, Some((d, p))).await?),
                    _ => Err(Failure::new(code::UNSUPPORTED, "Extract needs DomainName and RelativePath")),
                }
            }
            other => Err(Failure::new(code::UNSUPPORTED, format!("{other} is not supported by the virtual iPhone"))),
        };
        match result {
            Ok(content) => link.send(response(code::OK, None, content)).await?,
            Err(f) => {
                tracing::info!(device.udid = %state.device.udid, error.code = f.code, error = %f.description, "MobileBackup2 request failed");
                link.send(response(f.code, Some(&f.description), None)).await?;
            }
        }
    }
    if reboot {
        registry.reboot(&state.device.udid);
    }
    Ok(())
}

/// `ChangePassword`: `OldPassword` and `NewPassword` at the top level of the message.
/// After iOS 13 a phone with a passcode asks for it first.
async fn change_password(state: &DeviceState, body: &Dictionary) -> Result<(), Failure> {
    if !state.wait_for_passcode().await {
        return Err(Failure::new(code::DEVICE_LOCKED, "the passcode was not entered on the device"));
    }
    let text = |k: &str| body.get(k).and_then(Value::as_string);
    let (old, new) = (text("OldPassword"), text("NewPassword"));
    let result = state.encryption().change(old, new).map_err(|(code, text)| Failure::new(code, text));
    tracing::info!(
        device.udid = %state.device.udid, change.old = old.is_some(), change.new = new.is_some(),
        change.ok = result.is_ok(), "ChangePassword"
    );
    result
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

    // 0. With a backup password every backup is encrypted; a profile that forces
    // encryption refuses to back up without one.
    let keys = if state.encryption().will_encrypt() {
        match state.encryption().keys() {
            Some(k) => Some(k),
            None => return Ok(Err(Failure::new(code::UNSUPPORTED, "the backup keybag of this device is damaged"))),
        }
    } else if state.encryption().mdm_forced() {
        return Ok(Err(Failure::new(encryption::FORCED, encryption::FORCED_BACKUP_TEXT)));
    } else {
        None
    };

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
        // An encrypted one opens only with this password's keys (after a change, or from
        // an unencrypted time, the backup is full).
        let db = match (&keys, plist, db) {
            (Some(k), Some(plist), Some(db)) => previous_manifest_db(&k.class_keys, &plist, &db),
            (None, Some(_), Some(db)) => Some(db),
            _ => None,
        };
        if let Some(db) = db
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
    let mut files = content.manifest_files(keys.is_some());
    if let Some(k) = &keys {
        for f in &mut files {
            let (class, record) = k.record(&f.file_id);
            f.encryption = Some(manifest::Encrypted { class, record });
        }
    }
    let files = std::sync::Arc::new(files);
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
    // What goes over the wire: ciphertext is padded to whole blocks.
    let wire_size = |size: u64| if keys.is_some() { ios_crypto::cipher_len(size) } else { size };
    let upload_bytes: u64 = changed.iter().map(|&i| wire_size(files[i].size)).sum();
    tracing::info!(
        device.udid = %state.device.udid, backup.full = is_full, backup.files = files.len(), backup.changed = changed.len(),
        backup.deleted = deleted.len(), backup.bytes = upload_bytes, backup.encrypted = keys.is_some(), "backup plan"
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
        let keys = keys.clone();
        tokio::task::spawn_blocking(move || open_batch(&content, &files, &batch, &blobs, &target, keys.as_deref()))
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
    let db = match manifest_db.await {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return Ok(Err(Failure::new(code::UNSUPPORTED, format!("building Manifest.db: {e}")))),
        Err(e) => return Ok(Err(Failure::new(code::UNSUPPORTED, format!("building Manifest.db: {e}")))),
    };
    // Encrypted: the whole Manifest.db with a fresh key, wrapped with class 4 (ManifestKey).
    let (plist, db) = match &keys {
        Some(k) => {
            let mkey = encryption::manifest_key();
            let Ok(record) = k.class_keys.wrap(MANIFEST_KEY_CLASS, &mkey) else {
                return Ok(Err(Failure::new(code::UNSUPPORTED, "the keybag has no class 4 key")));
            };
            let enc = manifest::PlistEncryption { keybag: &k.keybag_bytes, manifest_key: &record };
            (manifest::manifest_plist(&facts, &content.app_bundles(), SystemTime::now(), Some(enc)), mkey.encrypt(&db))
        }
        None => (manifest::manifest_plist(&facts, &content.app_bundles(), SystemTime::now(), None), db),
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
    keys: Option<&Keys>,
) -> std::io::Result<Opened> {
    let mut streams = Vec::with_capacity(batch.len());
    let mut bytes = 0;
    for f in batch.iter().map(|&i| &files[i]) {
        let key = ContentKey { domain: f.domain.clone(), path: f.path.clone() };
        let mut reader = content.open(blobs, &key)?;
        bytes += f.size;
        if let Some(k) = keys {
            reader = Box::new(EncryptingReader::new(reader, &k.file_key(&f.file_id)));
            bytes += ios_crypto::cipher_len(f.size) - f.size;
        }
        let device_path = format!("/var/mobile/{}/{}", f.domain, f.path);
        streams.push((format!("{target}/Snapshot/{}/{}", &f.file_id[..2], f.file_id), device_path, reader));
    }
    Ok((streams, bytes))
}

/// The protection class Manifest.db's key is wrapped with.
const MANIFEST_KEY_CLASS: u32 = 4;

/// A previous encrypted backup's Manifest.db, decrypted with this password's keys; `None`
/// when it does not open with them (another password, or an unencrypted backup).
fn previous_manifest_db(keys: &ClassKeys, plist: &[u8], db: &[u8]) -> Option<Vec<u8>> {
    let plist = manifest::read_manifest_plist(plist).ok()?;
    if plist.get("IsEncrypted").and_then(Value::as_boolean) != Some(true) {
        return None;
    }
    decrypt_manifest_db(keys, &plist, db).ok()
}

/// Decrypts Manifest.db with `ManifestKey` (its class is the record's prefix).
fn decrypt_manifest_db(keys: &ClassKeys, plist: &Dictionary, db: &[u8]) -> Result<Vec<u8>, String> {
    let record = plist.get("ManifestKey").and_then(Value::as_data).ok_or("Manifest.plist has no ManifestKey")?;
    let (class, _) = ios_crypto::parse_record(record).map_err(|e| format!("ManifestKey: {e}"))?;
    let key = keys.unwrap(class, record).map_err(|e| format!("ManifestKey: {e}"))?;
    key.decrypt(db).map_err(|e| format!("Manifest.db: {e}"))
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
    let Source { unlocked, rows } = match open_source(link, &source, password(body)).await? {
        Ok(s) => s,
        Err(f) => return Ok(Err(f)),
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
        let keys = match &unlocked {
            Some((class_keys, _)) => match file_keys(class_keys, batch) {
                Ok(k) => Some(k),
                Err(f) => return Ok(Err(f)),
            },
            None => None,
        };
        let got = link.download(&paths, Sink::Blobs(&blobs, keys.as_deref()), progress).await?;
        for (f, r) in batch.iter().zip(got) {
            match r {
                Ok(Received::Blob { sha256, size }) => {
                    done += size;
                    restored.insert(
                        ContentKey { domain: f.domain.clone(), path: f.path.clone() },
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
    // The keychain came back with the backup, and with it the backup password.
    if let Some((_, password)) = unlocked
        && let Err(e) = state.encryption().set(Some(password))
    {
        return Ok(Err(Failure::new(code::UNSUPPORTED, format!("keeping the backup password: {e}"))));
    }
    Ok(Ok(()))
}

/// A backup on the host, opened by the device: its files, and the keys of an encrypted one
/// with the password that opened it.
struct Source {
    unlocked: Option<(ClassKeys, String)>,
    rows: Vec<ManifestFile>,
}

/// `Password` from a request's options, or from the message itself (pymobiledevice3's
/// `Unback` and `Extract` put it there).
fn password(body: &Dictionary) -> Option<String> {
    let opts = options(body);
    opts.get("Password").or_else(|| body.get("Password")).and_then(Value::as_string).map(str::to_string)
}

/// Downloads and opens `<source>/Manifest.plist` and `Manifest.db`; an encrypted backup
/// opens only with its password.
async fn open_source<S: AsyncRead + AsyncWrite + Unpin + Send>(
    link: &mut Link<'_, S>,
    source: &str,
    password: Option<String>,
) -> Step<Source> {
    let Some(plist) = link.download_one(format!("{source}/Manifest.plist")).await? else {
        return Ok(Err(Failure::new(
            code::MISSING_BACKUP,
            format!("no backup of {source}: Manifest.plist is missing"),
        )));
    };
    let Ok(plist) = manifest::read_manifest_plist(&plist) else {
        return Ok(Err(Failure::new(code::INCOMPLETE_BACKUP, "Manifest.plist is unreadable")));
    };
    let Some(db) = link.download_one(format!("{source}/Manifest.db")).await? else {
        return Ok(Err(Failure::new(code::MISSING_BACKUP, format!("no backup of {source}: Manifest.db is missing"))));
    };
    let unlocked = if plist.get("IsEncrypted").and_then(Value::as_boolean) == Some(true) {
        match unlock_backup(&plist, password.as_deref()) {
            Ok(keys) => Some((keys, password.unwrap_or_default())),
            Err(f) => return Ok(Err(f)),
        }
    } else {
        None
    };
    let db = match &unlocked {
        Some((keys, _)) => match decrypt_manifest_db(keys, &plist, &db) {
            Ok(db) => db,
            Err(e) => return Ok(Err(Failure::new(code::INCOMPLETE_BACKUP, e))),
        },
        None => db,
    };
    match manifest::read_manifest_db(&db) {
        Ok(rows) => Ok(Ok(Source { unlocked, rows })),
        Err(e) => Ok(Err(Failure::new(code::INCOMPLETE_BACKUP, format!("unreadable Manifest.db: {e}")))),
    }
}

/// The class keys of an encrypted backup's keybag, opened with `password`.
fn unlock_backup(plist: &Dictionary, password: Option<&str>) -> Result<ClassKeys, Failure> {
    let invalid = || Failure::new(encryption::INVALID_PASSWORD, encryption::INVALID_RESTORE_PASSWORD_TEXT);
    let Some(password) = password.filter(|p| !p.is_empty()) else { return Err(invalid()) };
    let Some(bag) = plist.get("BackupKeyBag").and_then(Value::as_data) else {
        return Err(Failure::new(code::INCOMPLETE_BACKUP, "Manifest.plist of an encrypted backup has no BackupKeyBag"));
    };
    let bag = Keybag::parse(bag).map_err(|e| Failure::new(code::INCOMPLETE_BACKUP, format!("BackupKeyBag: {e}")))?;
    bag.open(password).map_err(|e| match e {
        ios_crypto::KeybagError::WrongPassword => invalid(),
        e => Failure::new(code::INCOMPLETE_BACKUP, format!("BackupKeyBag: {e}")),
    })
}

/// Each file's key, unwrapped from its `EncryptionKey` record with its protection class.
fn file_keys(keys: &ClassKeys, files: &[&ManifestFile]) -> Result<Vec<FileKey>, Failure> {
    files
        .iter()
        .map(|f| {
            let Some(e) = &f.encryption else {
                return Err(Failure::new(
                    code::INCOMPLETE_BACKUP,
                    format!("{}/{}: no EncryptionKey", f.domain, f.path),
                ));
            };
            keys.unwrap(e.class, &e.record)
                .map_err(|err| Failure::new(code::INCOMPLETE_BACKUP, format!("{}/{}: {err}", f.domain, f.path)))
        })
        .collect()
}

fn source_of(state: &DeviceState, body: &Dictionary) -> String {
    let text = |k: &str| body.get(k).and_then(Value::as_string);
    text("SourceIdentifier").or_else(|| text("TargetIdentifier")).unwrap_or(&state.device.udid).to_string()
}

/// `Info`: the backup's `Info.plist` (and whether it is encrypted), as XML text in `Content`.
async fn info<S: AsyncRead + AsyncWrite + Unpin + Send>(link: &mut Link<'_, S>, body: &Dictionary) -> Step<String> {
    let source = source_of(link.state, body);
    let Some(info) = link.download_one(format!("{source}/Info.plist")).await? else {
        return Ok(Err(Failure::new(code::MISSING_BACKUP, format!("no backup of {source}: Info.plist is missing"))));
    };
    let Ok(mut info) = plist::from_bytes::<Dictionary>(&info) else {
        return Ok(Err(Failure::new(code::INCOMPLETE_BACKUP, "Info.plist is unreadable")));
    };
    let encrypted = link
        .download_one(format!("{source}/Manifest.plist"))
        .await?
        .and_then(|b| manifest::read_manifest_plist(&b).ok())
        .and_then(|d| d.get("IsEncrypted").and_then(Value::as_boolean))
        .unwrap_or(false);
    info.insert("IsEncrypted".into(), encrypted.into());
    let mut xml = Vec::new();
    if let Err(e) = plist::to_writer_xml(&mut xml, &Value::Dictionary(info)) {
        return Ok(Err(Failure::new(code::UNSUPPORTED, format!("writing Info: {e}"))));
    }
    Ok(Ok(String::from_utf8_lossy(&xml).into_owned()))
}

/// `List`: every file of the backup as CSV in `Content` (an encrypted one needs `Password`).
async fn list<S: AsyncRead + AsyncWrite + Unpin + Send>(link: &mut Link<'_, S>, body: &Dictionary) -> Step<String> {
    let source = source_of(link.state, body);
    let Source { rows, .. } = match open_source(link, &source, password(body)).await? {
        Ok(s) => s,
        Err(f) => return Ok(Err(f)),
    };
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let mut csv = String::from("Domain,RelativePath,FileID,Kind,Size,Mode,LastModified\n");
    for r in &rows {
        let kind = match r.flags {
            manifest::FLAG_FILE => "file",
            manifest::FLAG_DIR => "directory",
            _ => "symlink",
        };
        csv.push_str(&format!(
            "{},{},{},{kind},{},{:o},{}\n",
            quote(&r.domain),
            quote(&r.path),
            r.file_id,
            r.size,
            r.mode,
            r.mtime
        ));
    }
    Ok(Ok(csv))
}

/// `Unback` (every regular file) and `Extract` (one): the files of a backup, decrypted,
/// uploaded to the host as `_unback_/<source>/<domain>/<relativePath>`.
async fn unback<S: AsyncRead + AsyncWrite + Unpin + Send>(
    link: &mut Link<'_, S>,
    body: &Dictionary,
    only: Option<(String, String)>,
) -> Step<()> {
    let state = link.state;
    let source = source_of(state, body);
    let Source { unlocked, rows } = match open_source(link, &source, password(body)).await? {
        Ok(s) => s,
        Err(f) => return Ok(Err(f)),
    };
    // A path that climbs out of its domain is never written on the host.
    let safe = |p: &str| !p.starts_with('/') && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    let files: Vec<&ManifestFile> = rows
        .iter()
        .filter(|r| r.flags == manifest::FLAG_FILE && safe(&r.domain) && safe(&r.path))
        .filter(|r| only.as_ref().is_none_or(|(d, p)| &r.domain == d && &r.path == p))
        .collect();
    if let Some((d, p)) = &only
        && files.is_empty()
    {
        return Ok(Err(Failure::new(code::UNSUPPORTED, format!("{d}/{p} is not a file in the backup of {source}"))));
    }
    // Hosts write an uploaded file only into an existing directory.
    let dirs: std::collections::BTreeSet<String> = files
        .iter()
        .map(|f| {
            let host = format!("_unback_/{source}/{}/{}", f.domain, f.path);
            host.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default()
        })
        .collect();
    for dir in dirs {
        link.request("DLMessageCreateDirectory", vec![dir.into()]).await?;
    }
    let tmp = tempfile::tempdir_in(state.blobs_dir())?;
    let total: u64 = files.iter().map(|f| f.size).sum();
    let mut done = 0u64;
    for batch in files.chunks(BATCH) {
        let paths: Vec<String> = batch.iter().map(|f| format!("{source}/{}/{}", &f.file_id[..2], f.file_id)).collect();
        let keys = match &unlocked {
            Some((class_keys, _)) => match file_keys(class_keys, batch) {
                Ok(k) => Some(k),
                Err(f) => return Ok(Err(f)),
            },
            None => None,
        };
        let progress = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
        let got = link.download(&paths, Sink::Blobs(tmp.path(), keys.as_deref()), progress).await?;
        let mut streams: Vec<(String, String, Box<dyn std::io::Read + Send>)> = Vec::with_capacity(batch.len());
        let mut bytes = 0;
        for (f, r) in batch.iter().zip(got) {
            let Ok(Received::Blob { sha256, size }) = r else {
                return Ok(Err(Failure::new(
                    code::INCOMPLETE_BACKUP,
                    format!("{}/{}: not in the backup", f.domain, f.path),
                )));
            };
            bytes += size;
            let host = format!("_unback_/{source}/{}/{}", f.domain, f.path);
            streams.push((
                host,
                format!("/var/mobile/{}/{}", f.domain, f.path),
                Box::new(std::fs::File::open(tmp.path().join(sha256))?),
            ));
        }
        link.upload(streams, bytes, progress).await?;
        done += bytes;
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
