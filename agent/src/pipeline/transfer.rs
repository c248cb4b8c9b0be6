//! Moving a directory tree (an iPhone backup directory) to the server as a snapshot, and
//! a snapshot back into a directory.
//!
//! Upload: the backup pipeline ([`crate::pipeline`]) given the whole tree: cut each file
//! into content-defined chunks; ask the server in batches which chunk ids it lacks; seal
//! and upload only those, on parallel streams; then seal the manifest and commit. Memory
//! is bounded by the batches in flight, not by file or tree size.
//!
//! Download: open the manifest, fetch the chunks of a batch of files, verify every chunk
//! (decrypt, decompress, re-hash) and write the files; a restore never writes a byte
//! that does not match its id. Planning, verifying and reassembling are
//! `lifeboat_shared::restore`, the read path restore tests and the API run too. The files
//! of an iOS-encrypted snapshot are written as stored (plaintext) or, with
//! [`Rebuild::AsThePhoneMadeThem`], encrypted again with their own keys: the phone's bytes.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use lifeboat_shared::chunk::{DataKey, IdKey};
use lifeboat_shared::ids::{ChunkId, RunId, SnapshotId};
use lifeboat_shared::ios_crypto::ClassKeys;
use lifeboat_shared::manifest::{DeviceInfo, FileEntry, Manifest};
use lifeboat_shared::restore;
use lifeboat_shared::wire::{MAX_IDS_PER_REQUEST, Response};

use crate::net::{Client, ClientError};
use crate::pipeline::{FileCache, Pipeline};

/// Download streams in flight at once.
const PARALLEL_STREAMS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TransferError + '_ {
    move |cause| TransferError::Io { path: path.to_path_buf(), cause }
}

/// The tenant keys an enrolled agent holds.
#[derive(Debug, Clone)]
pub struct Keys {
    pub id: IdKey,
    pub data: Arc<DataKey>,
}

impl Keys {
    pub fn from_bytes(id: [u8; 32], data: [u8; 32]) -> Self {
        Self { id: IdKey::from_bytes(id), data: Arc::new(DataKey::from_bytes(&data)) }
    }
}

/// What an upload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadReport {
    pub files: u64,
    pub logical_bytes: u64,
    pub chunks: u64,
    pub chunks_sent: u64,
    pub blob_bytes_sent: u64,
    /// Files whose chunks came from the local cache (not read at all).
    pub files_from_cache: u64,
    /// Files read only after the phone was done: the agent's own Info.plist, a file
    /// that changed while it was read, one that waited without a handle (more than 256
    /// waiting) and was moved before it was read, and every file of `upload_dir`.
    pub files_read_at_end: u64,
    /// How long each part of a device backup took, in milliseconds: the phone sending
    /// (with what the pipeline did meanwhile), opening an encrypted backup's keys once
    /// it was done, and what was left to chunk, upload and commit after that.
    pub phone_ms: u64,
    pub keys_ms: u64,
    pub after_phone_ms: u64,
}

pub(crate) fn nonce() -> Result<[u8; 12], TransferError> {
    let mut n = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut n)
        .map_err(|_| TransferError::Invalid("the system random number generator failed".into()))?;
    Ok(n)
}

/// Regular files under `root`, as sorted `/`-separated relative paths.
pub fn list_files(root: &Path) -> Result<Vec<String>, TransferError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let path = entry.path();
            let ft = entry.file_type().map_err(io(&path))?;
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let rel = path.strip_prefix(root).map_err(|e| TransferError::Invalid(e.to_string()))?;
                let rel =
                    rel.to_str().ok_or_else(|| TransferError::Invalid(format!("{} is not UTF-8", path.display())))?;
                out.push(rel.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Bytes of the regular files under `root` (0 if it does not exist).
pub fn dir_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => total += entry.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// Uploads the tree at `root` into an open run and commits it as `snapshot` (the
/// pipeline of a backup, given the whole directory at once).
pub async fn upload_dir(
    client: &Client,
    keys: &Keys,
    run: RunId,
    snapshot: SnapshotId,
    device: DeviceInfo,
    root: &Path,
    created_unix_ms: i64,
) -> Result<(UploadReport, Response), TransferError> {
    let progress = Arc::new(crate::progress::Progress::new());
    let pipeline = Pipeline::start(client.clone(), keys.clone(), run, FileCache::default(), progress);
    let (files, _keys, report) = pipeline.finish(root, None).await?;
    let committed = commit(client, keys, run, &Manifest { snapshot, device, created_unix_ms, files }).await?;
    Ok((report, committed))
}

/// Seals `manifest` and commits it as the run's snapshot.
pub async fn commit(client: &Client, keys: &Keys, run: RunId, manifest: &Manifest) -> Result<Response, TransferError> {
    let sealed = manifest.seal(&keys.data, nonce()?).map_err(|e| TransferError::Invalid(e.to_string()))?;
    tracing::debug!(run.id = %run, files = manifest.files.len(), manifest.bytes = sealed.len(), "manifest sealed; committing");
    Ok(client.commit(run, manifest.snapshot, &sealed).await?)
}

/// How the files of an iOS-encrypted snapshot are written.
#[derive(Debug, Clone, Copy)]
pub enum Rebuild<'a> {
    /// As stored: the plaintext.
    Plaintext,
    /// Each file with a key record encrypted again with its key, unwrapped with these
    /// class keys (AES-256-CBC, IV 0, PKCS7): byte for byte what the phone made.
    AsThePhoneMadeThem(&'a ClassKeys),
}

/// Downloads `snapshot` into `dest` (which must be empty or absent), verifying every chunk.
pub async fn download_snapshot(
    client: &Client,
    keys: &Keys,
    snapshot: SnapshotId,
    dest: &Path,
) -> Result<Manifest, TransferError> {
    let manifest = open_manifest(client, keys, snapshot).await?;
    download_files(client, keys, &manifest, dest, Rebuild::Plaintext, &|_| {}).await?;
    Ok(manifest)
}

/// Fetches and opens the manifest of `snapshot`.
pub async fn open_manifest(client: &Client, keys: &Keys, snapshot: SnapshotId) -> Result<Manifest, TransferError> {
    let sealed = client.get_manifest(snapshot).await?;
    let data = keys.data.clone();
    tokio::task::spawn_blocking(move || Manifest::open(&data, &snapshot, &sealed))
        .await
        .map_err(|e| TransferError::Invalid(format!("opening the manifest: {e}")))?
        .map_err(|e| TransferError::Invalid(e.to_string()))
}

/// The bytes of one file of `manifest` as stored (a small one: Manifest.plist), every
/// chunk verified.
pub async fn read_file(
    client: &Client,
    keys: &Keys,
    manifest: &Manifest,
    path: &str,
) -> Result<Vec<u8>, TransferError> {
    let Some(i) = manifest.files.iter().position(|f| f.path == path) else {
        return Err(TransferError::Invalid(format!("snapshot {} has no {path}", manifest.snapshot)));
    };
    let files = &manifest.files[i..=i];
    let mut out = Vec::new();
    let mut batches = Batches::of(client, keys, manifest.snapshot, files);
    while let Some(batch) = batches.next().await {
        let (range, plain) = batch?;
        for f in &files[range] {
            let parts = restore::parts(f, &plain).map_err(|e| TransferError::Invalid(format!("{}: {e}", f.path)))?;
            parts.into_iter().for_each(|p| out.extend_from_slice(p));
        }
    }
    Ok(out)
}

/// Writes the files of `manifest` into `dest` (which must be empty or absent), every chunk
/// verified before a byte of its file is written; `written` hears of each file done.
pub async fn download_files(
    client: &Client,
    keys: &Keys,
    manifest: &Manifest,
    dest: &Path,
    rebuild: Rebuild<'_>,
    written: &(dyn Fn(&FileEntry) + Sync),
) -> Result<(), TransferError> {
    std::fs::create_dir_all(dest).map_err(io(dest))?;
    let files = &manifest.files;
    let mut batches = Batches::of(client, keys, manifest.snapshot, files);
    while let Some(batch) = batches.next().await {
        let (range, plain) = batch?;
        for f in &files[range] {
            write_file(dest, f, &plain, rebuild)?;
            written(f);
        }
    }
    Ok(())
}

/// The batches of a download (`lifeboat_shared::restore::plan`), each fetched and
/// verified when asked for: one batch's chunks in memory at a time.
struct Batches {
    client: Client,
    keys: Keys,
    snapshot: SnapshotId,
    plan: std::vec::IntoIter<restore::Batch>,
}

impl Batches {
    fn of(client: &Client, keys: &Keys, snapshot: SnapshotId, files: &[FileEntry]) -> Self {
        Self {
            client: client.clone(),
            keys: keys.clone(),
            snapshot,
            plan: restore::plan(files, restore::BATCH_BYTES, MAX_IDS_PER_REQUEST).into_iter(),
        }
    }

    /// The next batch's files and their chunks, verified.
    async fn next(&mut self) -> Option<Result<(std::ops::Range<usize>, HashMap<ChunkId, Vec<u8>>), TransferError>> {
        let batch = self.plan.next()?;
        Some(fetch_batch(&self.client, &self.keys, self.snapshot, batch).await)
    }
}

async fn fetch_batch(
    client: &Client,
    keys: &Keys,
    snapshot: SnapshotId,
    batch: restore::Batch,
) -> Result<(std::ops::Range<usize>, HashMap<ChunkId, Vec<u8>>), TransferError> {
    // The one read path (`lifeboat_shared::restore`): batches within the memory budget,
    // every blob verified before a byte of its file is written.
    // Up to PARALLEL_STREAMS downloads at once; each answers with its chunks as a stream.
    let per_stream = batch.chunks.len().div_ceil(PARALLEL_STREAMS).clamp(1, MAX_IDS_PER_REQUEST);
    let mut blobs = Vec::with_capacity(batch.chunks.len());
    for result in join_all(batch.chunks.chunks(per_stream).map(|ids| client.get_chunks(ids))).await {
        blobs.extend(result?);
    }
    // Decrypting and re-hashing up to 64 MiB: on the blocking pool.
    let k = keys.clone();
    let (batch, opened) = tokio::task::spawn_blocking(move || {
        let opened = restore::open(&k.data, &k.id, &batch, blobs);
        (batch, opened)
    })
    .await
    .map_err(|e| TransferError::Invalid(format!("verifying chunks: {e}")))?;
    if let Some(id) = opened.unasked.first() {
        return Err(TransferError::Invalid(format!("the server sent chunk {id}, which was not asked for")));
    }
    if let Some((_, e)) = opened.failed.first() {
        return Err(TransferError::Invalid(format!("restoring {snapshot}: {e}")));
    }
    Ok((batch.files, opened.plain))
}

fn write_file(
    dest: &Path,
    f: &FileEntry,
    plain: &HashMap<ChunkId, Vec<u8>>,
    rebuild: Rebuild<'_>,
) -> Result<(), TransferError> {
    // Manifest::open validated the path: relative, no `..`, no empty components.
    let path = dest.join(&f.path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let parts = restore::parts(f, plain).map_err(|e| TransferError::Invalid(format!("{}: {e}", f.path)))?;
    let mut out = std::fs::File::create(&path).map_err(io(&path))?;
    match (rebuild, &f.ios_key) {
        (Rebuild::AsThePhoneMadeThem(classes), Some(k)) => {
            let key =
                classes.unwrap(k.class, &k.record).map_err(|e| TransferError::Invalid(format!("{}: {e}", f.path)))?;
            let mut encryptor = key.encryptor();
            let mut cipher = Vec::new();
            for part in parts {
                encryptor.update(part, &mut cipher);
                out.write_all(&cipher).map_err(io(&path))?;
                cipher.clear();
            }
            encryptor.finish(&mut cipher);
            out.write_all(&cipher).map_err(io(&path))?;
        }
        _ => {
            for part in parts {
                out.write_all(part).map_err(io(&path))?;
            }
        }
    }
    out.set_permissions(std::fs::Permissions::from_mode(f.mode & 0o7777)).map_err(io(&path))?;
    let mtime = UNIX_EPOCH + Duration::from_secs(f.mtime_unix_seconds.max(0) as u64);
    out.set_modified(mtime).map_err(io(&path))?;
    Ok(())
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
