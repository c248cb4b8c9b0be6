//! The upload pipeline of a backup: files go in as the phone finishes them, a snapshot
//! comes out.
//!
//! One thread reads each file back and cuts it into content-defined chunks with their
//! keyed ids (the CPU-heavy part, off the async runtime). The async side gathers new
//! chunks into batches, asks the server which it lacks, seals those (zstd, AES-GCM, on
//! the blocking pool) and uploads them on parallel streams, at most
//! [`BATCHES_IN_FLIGHT`] batches at a time, so memory stays bounded whatever the phone
//! sends: a bounded channel stops the chunker when uploads fall behind.
//!
//! Files are known by (device, inode), size and modification time. A file the phone
//! finished in the `Snapshot/` staging directory keeps its inode when the phone moves it
//! into place, so the final walk of the backup directory finds it already chunked. A
//! file unchanged since the last committed snapshot of this device (the local cache,
//! [`FileCache`]) is not read at all: its chunks are on the server already.
//!
//! An encrypted backup's files are chunked only after the phone is done (their keys
//! arrive with Manifest.db, last): [`Pipeline::finish`] is given the backup's
//! [`Decryption`] and the chunker reads each file's plaintext, which is what is stored
//! (so dedup works across backups and previews can read it), with its key record in the
//! manifest entry.
//!
//! `transfer`: a whole directory up as a snapshot, and a snapshot back into a directory
//! through `lifeboat_shared::restore`. Never here: the phone's protocol (that is `device`).

pub mod transfer;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use lifeboat_shared::chunk::{read_chunks, seal_chunk};
use lifeboat_shared::ids::{ChunkId, RunId};
use lifeboat_shared::manifest::{ChunkRef, FileEntry};
use lifeboat_shared::wire::{MAX_IDS_PER_REQUEST, Request, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::ios::{DecryptingReader, Decryption};
use crate::net::Client;
use crate::pipeline::transfer::{Keys, TransferError, UploadReport, list_files, nonce};
use crate::progress::Progress;

/// Plaintext of new chunks per missing-chunks round trip.
const BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Batches being asked about, sealed or uploaded at once.
const BATCHES_IN_FLIGHT: usize = 3;
/// Upload streams per batch.
const STREAMS_PER_BATCH: usize = 4;
/// Files are read in blocks of this size (smaller ones whole) and cut in memory.
const READ_BLOCK_BYTES: u64 = 8 * 1024 * 1024;
/// Messages of pieces the chunker may run ahead of the uploads.
const PIECES_QUEUED: usize = 16;
/// A message of pieces goes out at this many bytes of new chunks (an average chunk: a
/// large file's chunks mostly go one to a message, as all pieces did before messages) or
/// this many pieces (small files), and whenever the chunker runs out of files.
const MESSAGE_BYTES: usize = lifeboat_shared::format::CHUNK_AVG_BYTES as usize;
const MESSAGE_PIECES: usize = 64;
/// A batch not yet full goes out once the chunker has been this long without a new piece
/// (the phone is between files, or moving them into place at the end of a backup), so
/// the last chunks are not all left for after the phone is done.
const IDLE_FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(100);
/// Finished files waiting with an open handle (surviving the phone's renames), across all
/// backups of the process; beyond that they wait by path alone, so slow uploads cannot
/// exhaust file descriptors.
static OPEN_HANDLES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(256);

/// One of the [`OPEN_HANDLES`], given back when dropped.
struct HandleSlot;

impl HandleSlot {
    fn take() -> Option<Self> {
        use std::sync::atomic::Ordering::Relaxed;
        OPEN_HANDLES.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1)).ok().map(|_| Self)
    }
}

impl Drop for HandleSlot {
    fn drop(&mut self) {
        OPEN_HANDLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An open file of a finished file; one opened early holds a slot until it is dropped,
/// whether or not it was read.
struct Handle {
    file: std::fs::File,
    _slot: Option<HandleSlot>,
}

/// What identifies a file's content without reading it: the inode survives the phone's
/// renames; its birth time (statx, where the file system keeps one) tells a reused inode
/// number from the file that had it before; size and mtime catch rewrites. One is kept
/// per file of the backup, so it is kept small: times in nanoseconds as `i64` (years
/// 1677–2262; outside them they saturate, and the device, inode, size and birth time
/// still tell files apart).
/// Cache files written with the `i128` times of earlier versions read the same (postcard
/// writes both as zigzag varints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    btime_ns: Option<i64>,
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> Self {
        let btime_ns = meta
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec()),
            btime_ns,
        }
    }
}

/// The chunks of the files of this device's last committed snapshot, as they lie in the
/// mirror: `<state>/cache/<udid>.bin`. Only ever trusted for files whose key still
/// matches, and those chunks are on the server (the commit checked).
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCache {
    files: Vec<(FileKey, Vec<ChunkRef>)>,
}

impl FileCache {
    fn path(state_dir: &Path, udid: &str) -> PathBuf {
        state_dir.join("cache").join(format!("{udid}.bin"))
    }

    /// The cache, or an empty one if there is none or it does not read (it is only a
    /// cache); entries whose chunks do not add up to the file's size are dropped.
    pub fn load(state_dir: &Path, udid: &str) -> Self {
        let mut cache: Self = std::fs::read(Self::path(state_dir, udid))
            .ok()
            .and_then(|bytes| postcard::from_bytes(&bytes).ok())
            .unwrap_or_default();
        // A file the phone encrypted is kept as its plaintext, one to sixteen bytes of
        // padding shorter (`Pipeline::finish` checks which it is).
        cache.files.retain(|(key, chunks)| {
            let sum = chunks.iter().map(|c| u64::from(c.length)).sum::<u64>();
            sum == key.size || lifeboat_shared::ios_crypto::cipher_len(sum) == key.size
        });
        cache
    }

    pub fn save(&self, state_dir: &Path, udid: &str) -> std::io::Result<()> {
        let path = Self::path(state_dir, udid);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let bytes = postcard::to_allocvec(self).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)
    }

    /// Forgets the cache (a commit found chunks missing that it promised).
    pub fn remove(state_dir: &Path, udid: &str) {
        let _ = std::fs::remove_file(Self::path(state_dir, udid));
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// The bytes of the files it describes: what the mirror holds.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(k, _)| k.size).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The cache after a commit: `keys[i]` is the key of `files[i]`, whose chunk lists
    /// are moved, not copied.
    pub fn from_snapshot(keys: Vec<FileKey>, files: Vec<FileEntry>) -> Self {
        debug_assert_eq!(keys.len(), files.len(), "a key per file");
        Self { files: keys.into_iter().zip(files).map(|(key, f)| (key, f.chunks)).collect() }
    }
}

enum Job {
    /// A finished file, opened before the phone could move it, or by path; with the key
    /// its plaintext is read with if the phone encrypted it.
    File(PathBuf, Option<Handle>, Option<lifeboat_shared::ios_crypto::FileKey>),
    /// Several, handed on together (one wake-up of the chunker).
    Files(Vec<(PathBuf, Option<Handle>)>),
    /// Answer [`Piece::Flushed`] once every earlier file is done.
    Flush,
}

enum Piece {
    /// A chunk not seen before in this run.
    Chunk(ChunkId, Bytes),
    /// A file's chunk list, exactly as long as it is (one is kept per file).
    File(FileKey, Box<[ChunkRef]>),
    /// The file went away or changed before it could be read; the final walk decides.
    Skipped(PathBuf, std::io::Error),
    Flushed,
}

/// A finished file, with a handle to read it by if its writer has one.
pub type FinishedFile = (PathBuf, Option<std::fs::File>);

/// Where finished files go; cloneable and usable from synchronous code.
#[derive(Debug, Clone)]
pub struct Feed {
    jobs: mpsc::UnboundedSender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p, _, _) => write!(f, "File({})", p.display()),
            Self::Files(files) => write!(f, "Files({})", files.len()),
            Self::Flush => f.write_str("Flush"),
        }
    }
}

impl Feed {
    /// Queues finished files, each with a handle to read it by if the caller has one (the
    /// chunker reads from the start, whatever its offset), in one message (one wake-up of
    /// the chunker). Returns false when the pipeline has stopped.
    pub fn files(&self, files: Vec<FinishedFile>) -> bool {
        let files = files
            .into_iter()
            .map(|(path, open)| {
                let handle = Self::handle(&path, open);
                (path, handle)
            })
            .collect();
        self.jobs.send(Job::Files(files)).is_ok()
    }

    /// The handle a queued file waits with, if a slot is free: the caller's, or one opened
    /// now. A file that does not open now is tried again by path (its slot goes back).
    fn handle(path: &Path, open: Option<std::fs::File>) -> Option<Handle> {
        HandleSlot::take().and_then(|slot| {
            open.map_or_else(|| open_for_reading(path), Ok).ok().map(|file| Handle { file, _slot: Some(slot) })
        })
    }
}

/// Opens a mirror file to be read without touching its access time (an inode write per
/// file otherwise: the phone's files are read back right after they are written).
fn open_for_reading(path: &Path) -> std::io::Result<std::fs::File> {
    with_noatime(std::fs::OpenOptions::new().read(true), path)
}

/// Creates (or truncates) a mirror file for the phone to write, readable through the
/// same open file (`try_clone`) by the pipeline afterwards, access times not kept.
pub(crate) fn create_for_reading_back(path: &Path) -> std::io::Result<std::fs::File> {
    with_noatime(std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true), path)
}

/// Opens with `O_NOATIME` where there is one, and without it where the kernel refuses it
/// (a file someone else owns).
fn with_noatime(options: &mut std::fs::OpenOptions, path: &Path) -> std::io::Result<std::fs::File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        match options.clone().custom_flags(nix::libc::O_NOATIME).open(path) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => {}
            other => return other,
        }
    }
    options.open(path)
}

/// A backup's upload pipeline for one run. Dropping it stops its uploads (a `JoinSet`)
/// and, once the device side lets go of its [`Feed`], the chunker.
pub struct Pipeline {
    client: Client,
    keys: Keys,
    run: RunId,
    progress: Arc<Progress>,
    feed: Feed,
    pieces: mpsc::Receiver<Vec<Piece>>,
    /// Pieces received and not yet taken: a message is taken a piece at a time, and only
    /// while the batch has room.
    inbox: std::collections::VecDeque<Piece>,
    /// Files chunked (this run) or cached (last snapshot; `true`), by key.
    known: HashMap<FileKey, (Box<[ChunkRef]>, bool)>,
    batch: Vec<(ChunkId, Bytes)>,
    batch_bytes: usize,
    /// When the last piece came, and a timer that checks it (reset at most once per
    /// [`IDLE_FLUSH_AFTER`], not per piece).
    last_piece: tokio::time::Instant,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
    uploads: JoinSet<Result<BatchReport, TransferError>>,
    report: UploadReport,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("run", &self.run)
            .field("known_files", &self.known.len())
            .field("batch_bytes", &self.batch_bytes)
            .field("uploads", &self.uploads.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct BatchReport {
    chunks_sent: u64,
    blob_bytes_sent: u64,
}

impl Pipeline {
    /// Starts the pipeline for `run`, knowing the files of `cache`.
    pub fn start(client: Client, keys: Keys, run: RunId, cache: FileCache, progress: Arc<Progress>) -> Self {
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
        let (pieces_tx, pieces) = mpsc::channel(PIECES_QUEUED);
        let mut seen = HashSet::new();
        let mut known = HashMap::with_capacity(cache.files.len());
        for (key, chunks) in cache.files {
            seen.extend(chunks.iter().map(|c| c.id));
            known.insert(key, (chunks.into_boxed_slice(), true));
        }
        {
            // Ends when every sender of jobs is gone.
            let (keys, progress) = (keys.clone(), progress.clone());
            tokio::task::spawn_blocking(move || chunker(jobs_rx, pieces_tx, keys, seen, progress));
        }
        Self {
            client,
            keys,
            run,
            progress,
            feed: Feed { jobs: jobs_tx },
            pieces,
            inbox: std::collections::VecDeque::new(),
            known,
            batch: Vec::new(),
            batch_bytes: 0,
            last_piece: tokio::time::Instant::now(),
            idle: Box::pin(tokio::time::sleep(IDLE_FLUSH_AFTER)),
            uploads: JoinSet::new(),
            report: UploadReport::default(),
        }
    }

    /// Where the device side hands finished files.
    pub fn feed(&self) -> Feed {
        self.feed.clone()
    }

    /// Works through finished files until `done` resolves (the phone finished or failed),
    /// then returns its output. Upload errors end it early: when one is ready in the same
    /// poll as the phone's result, the upload error is returned (the pipeline's branches
    /// are polled first) and the phone's result is dropped with `done`.
    pub async fn run_until<T>(&mut self, done: impl Future<Output = T>) -> Result<T, TransferError> {
        tokio::pin!(done);
        loop {
            self.take_received();
            let blocked = self.blocked();
            let may_flush = !self.batch.is_empty() && self.uploads.len() < BATCHES_IN_FLIGHT;
            // The pipeline's branches first: they are quick, while the phone's loop, with
            // data always ready (a large file), would use up the task's whole cooperative
            // budget on every poll and leave them none: no chunk would go out until the
            // phone paused.
            tokio::select! {
                biased;
                Some(r) = self.uploads.join_next(), if !self.uploads.is_empty() => self.settled(r)?,
                message = self.pieces.recv(), if !blocked && self.inbox.is_empty() => match message {
                    Some(pieces) => self.inbox.extend(pieces),
                    None => return Err(TransferError::Invalid("the chunker stopped".into())),
                },
                () = &mut self.idle, if may_flush => {
                    let due = self.last_piece + IDLE_FLUSH_AFTER;
                    if tokio::time::Instant::now() >= due {
                        self.flush_batch();
                    } else {
                        self.idle.as_mut().reset(due);
                    }
                }
                out = &mut done => return Ok(out),
            }
        }
    }

    /// After the phone is done: every file under `root` in the snapshot, with its chunks
    /// (read now only if not chunked before), all uploads finished. Returns the manifest
    /// entries, sorted by path, and each one's key (for [`FileCache::from_snapshot`]
    /// after the commit). What is kept per file on the way is only what the manifest
    /// needs: a backup of many files must not need memory for several copies of its list.
    /// With `decryption` (an encrypted backup), the files it has keys for are stored as
    /// their plaintext, each entry with its key record.
    pub async fn finish(
        mut self,
        root: &Path,
        decryption: Option<&Decryption>,
    ) -> Result<(Vec<FileEntry>, Vec<FileKey>, UploadReport), TransferError> {
        // Everything the phone handed on is chunked first, so the walk below finds it.
        let _ = self.feed.jobs.send(Job::Flush);
        loop {
            match self.next_piece().await? {
                Piece::Flushed => break,
                p => self.take(p),
            }
        }
        // The manifest entries are made as the walk finds the files; their chunk lists
        // are filled in once every file is chunked.
        let rels = list_files(root)?;
        let mut files = Vec::with_capacity(rels.len());
        let mut keys = Vec::with_capacity(rels.len());
        let mut pending = 0usize;
        for rel in rels {
            let path = root.join(&rel);
            let meta =
                std::fs::symlink_metadata(&path).map_err(|cause| TransferError::Io { path: path.clone(), cause })?;
            let key = FileKey::of(&meta);
            let encrypted = decryption.and_then(|d| d.get(&rel));
            // What is known must be what this backup stores: the plaintext of a file the
            // phone encrypted (padded to the file's size), the file's bytes otherwise.
            let fits = |chunks: &[ChunkRef]| {
                let sum: u64 = chunks.iter().map(|c| u64::from(c.length)).sum();
                key.size == if encrypted.is_some() { lifeboat_shared::ios_crypto::cipher_len(sum) } else { sum }
            };
            if !self.known.get(&key).is_some_and(|(chunks, _)| fits(chunks)) {
                self.known.remove(&key);
                pending += 1;
                let _ = self.feed.jobs.send(Job::File(path, None, encrypted.map(|(_, k)| k.clone())));
            }
            files.push(FileEntry {
                path: rel,
                size: key.size,
                mode: meta.permissions().mode() & 0o7777,
                mtime_unix_seconds: meta.mtime(),
                chunks: Vec::new(),
                ios_key: encrypted.map(|(record, _)| Box::new(*record)),
            });
            keys.push(key);
        }
        let _ = self.feed.jobs.send(Job::Flush);
        loop {
            match self.next_piece().await? {
                Piece::Flushed => break,
                Piece::Skipped(path, cause) => return Err(TransferError::Io { path, cause }),
                p => self.take(p),
            }
        }
        tracing::debug!(files = files.len(), read_at_end = pending, "backup directory chunked");
        self.report.files_read_at_end = pending as u64;
        self.flush_batch();
        while let Some(r) = self.uploads.join_next().await {
            self.settled(r)?;
        }
        tracing::debug!(run.id = %self.run, "every new chunk uploaded");
        // Each chunk list moves from the map into its manifest entry.
        let mut known = std::mem::take(&mut self.known);
        let mut from_cache = Vec::with_capacity(files.len());
        for i in 0..files.len() {
            let key = keys[i];
            let (chunks, cached) = match known.remove(&key) {
                Some((chunks, cached)) => (Vec::from(chunks), cached),
                // A second name of a file already listed (a hard link; phones make none,
                // so the scan back is rare).
                None => match keys[..i].iter().rposition(|k| *k == key) {
                    Some(j) => (files[j].chunks.clone(), from_cache[j]),
                    None => {
                        return Err(TransferError::Io {
                            path: root.join(&files[i].path),
                            cause: std::io::Error::other("the file changed while it was read"),
                        });
                    }
                },
            };
            self.report.files_from_cache += u64::from(cached);
            self.report.files += 1;
            if files[i].ios_key.is_some() {
                files[i].size = chunks.iter().map(|c| u64::from(c.length)).sum();
            }
            self.report.logical_bytes += files[i].size;
            self.report.chunks += chunks.len() as u64;
            files[i].chunks = chunks;
            from_cache.push(cached);
        }
        Ok((files, keys, self.report))
    }

    /// Takes the pieces received, one at a time while the batch has room (a message holds
    /// up to [`MESSAGE_PIECES`]; a batch must not outgrow one request's ids).
    fn take_received(&mut self) {
        while !self.blocked() {
            match self.inbox.pop_front() {
                Some(piece) => self.take(piece),
                None => break,
            }
        }
    }

    async fn next_piece(&mut self) -> Result<Piece, TransferError> {
        loop {
            let blocked = self.blocked();
            if !blocked && let Some(piece) = self.inbox.pop_front() {
                return Ok(piece);
            }
            tokio::select! {
                biased;
                Some(r) = self.uploads.join_next(), if !self.uploads.is_empty() => self.settled(r)?,
                message = self.pieces.recv(), if !blocked && self.inbox.is_empty() => {
                    self.inbox.extend(message.ok_or_else(|| TransferError::Invalid("the chunker stopped".into()))?);
                }
            }
        }
    }

    fn batch_full(&self) -> bool {
        self.batch_bytes >= BATCH_BYTES || self.batch.len() >= MAX_IDS_PER_REQUEST
    }

    /// Back-pressure: with a full batch waiting and every upload slot busy, no more
    /// pieces are taken, so the bounded channel stops the chunker. The phone is never
    /// held up: its finished files queue by path.
    fn blocked(&self) -> bool {
        self.batch_full() && self.uploads.len() >= BATCHES_IN_FLIGHT
    }

    fn flush_if_full(&mut self) {
        if self.batch_full() && self.uploads.len() < BATCHES_IN_FLIGHT {
            self.flush_batch();
        }
    }

    fn take(&mut self, piece: Piece) {
        self.last_piece = tokio::time::Instant::now();
        match piece {
            Piece::Chunk(id, data) => {
                self.batch_bytes += data.len();
                self.batch.push((id, data));
                self.flush_if_full();
            }
            Piece::File(key, chunks) => {
                self.known.insert(key, (chunks, false));
            }
            Piece::Skipped(path, cause) => {
                tracing::debug!(path = %path.display(), error = %cause, "left for the final walk");
            }
            Piece::Flushed => {}
        }
    }

    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let (client, keys, run, progress) = (self.client.clone(), self.keys.clone(), self.run, self.progress.clone());
        self.uploads.spawn(send_batch(client, keys, run, batch, progress));
    }

    fn settled(
        &mut self,
        r: Result<Result<BatchReport, TransferError>, tokio::task::JoinError>,
    ) -> Result<(), TransferError> {
        let b = r.map_err(|e| TransferError::Invalid(format!("an upload task failed: {e}")))??;
        self.report.chunks_sent += b.chunks_sent;
        self.report.blob_bytes_sent += b.blob_bytes_sent;
        self.flush_if_full();
        Ok(())
    }
}

async fn send_batch(
    client: Client,
    keys: Keys,
    run: RunId,
    batch: Vec<(ChunkId, Bytes)>,
    progress: Arc<Progress>,
) -> Result<BatchReport, TransferError> {
    let ids: Vec<ChunkId> = batch.iter().map(|(id, _)| *id).collect();
    let missing: HashSet<ChunkId> = match client.request(&Request::MissingChunks { run, ids }).await? {
        Response::Missing { ids } => ids.into_iter().collect(),
        other => return Err(TransferError::Invalid(format!("unexpected answer {other:?}"))),
    };
    let wanted: Vec<(ChunkId, Bytes)> = batch.into_iter().filter(|(id, _)| missing.contains(id)).collect();
    if wanted.is_empty() {
        return Ok(BatchReport::default());
    }
    let sealed = tokio::task::spawn_blocking(move || -> Result<Vec<(ChunkId, Vec<u8>)>, TransferError> {
        wanted.into_iter().map(|(id, plain)| Ok((id, seal_chunk(&keys.data, &id, &plain, nonce()?)))).collect()
    })
    .await
    .map_err(|e| TransferError::Invalid(format!("sealing failed: {e}")))??;
    let report = BatchReport {
        chunks_sent: sealed.len() as u64,
        blob_bytes_sent: sealed.iter().map(|(_, b)| b.len() as u64).sum(),
    };
    let per_stream = sealed.len().div_ceil(STREAMS_PER_BATCH).max(1);
    let mut streams = JoinSet::new();
    let mut sealed = sealed.into_iter();
    loop {
        let part: Vec<(ChunkId, Vec<u8>)> = sealed.by_ref().take(per_stream).collect();
        if part.is_empty() {
            break;
        }
        let (client, progress) = (client.clone(), progress.clone());
        streams.spawn(async move {
            let bytes = part.iter().map(|(_, b)| b.len() as u64).sum();
            client.put_chunks(run, part).await?;
            Progress::add(&progress.bytes_uploaded, bytes);
            Ok::<_, TransferError>(())
        });
    }
    while let Some(r) = streams.join_next().await {
        r.map_err(|e| TransferError::Invalid(format!("an upload stream failed: {e}")))??;
    }
    Ok(report)
}

/// Pieces on their way from the chunker to the pipeline, several to a message: the
/// pipeline's task is woken once per message, not twice per small file.
struct Outbox {
    tx: mpsc::Sender<Vec<Piece>>,
    pieces: Vec<Piece>,
    bytes: usize,
}

/// The pipeline stopped (an upload failed, or the backup ended).
struct Stopped;

impl Outbox {
    fn new(tx: mpsc::Sender<Vec<Piece>>) -> Self {
        Self { tx, pieces: Vec::with_capacity(MESSAGE_PIECES), bytes: 0 }
    }
    /// Queues `piece`, and sends the message once it is full.
    fn push(&mut self, piece: Piece) -> Result<(), Stopped> {
        if let Piece::Chunk(_, data) = &piece {
            self.bytes += data.len();
        }
        self.pieces.push(piece);
        if self.bytes >= MESSAGE_BYTES || self.pieces.len() >= MESSAGE_PIECES { self.send() } else { Ok(()) }
    }
    /// Sends what is queued (waiting while the pipeline holds [`PIECES_QUEUED`] messages).
    fn send(&mut self) -> Result<(), Stopped> {
        if self.pieces.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        let message = std::mem::replace(&mut self.pieces, Vec::with_capacity(MESSAGE_PIECES));
        self.tx.blocking_send(message).map_err(|_| Stopped)
    }
}

/// The chunker thread: reads each queued file and emits its new chunks and its chunk list.
/// What it has made goes out when a message is full and whenever it runs out of files.
fn chunker(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    pieces: mpsc::Sender<Vec<Piece>>,
    keys: Keys,
    seen: HashSet<ChunkId>,
    progress: Arc<Progress>,
) {
    let seed = keys.id.chunker_seed();
    let mut chunker = Chunker { keys, seed, seen, progress, out: Outbox::new(pieces) };
    let mut next = jobs.blocking_recv();
    while let Some(job) = next {
        let done = match job {
            Job::Flush => chunker.out.push(Piece::Flushed),
            Job::File(path, handle, key) => chunker.file(path, handle, key.as_ref()),
            Job::Files(files) => files.into_iter().try_for_each(|(path, handle)| chunker.file(path, handle, None)),
        };
        if done.is_err() {
            return;
        }
        next = match jobs.try_recv() {
            Ok(job) => Some(job),
            Err(_) => {
                if chunker.out.send().is_err() {
                    return;
                }
                jobs.blocking_recv()
            }
        };
    }
    let _ = chunker.out.send();
}

/// What the chunker thread keeps from file to file.
struct Chunker {
    keys: Keys,
    /// The content-defined cut points' seed, derived from the id key once.
    seed: u64,
    /// Chunk ids already emitted (this run) or known from the cache.
    seen: HashSet<ChunkId>,
    progress: Arc<Progress>,
    out: Outbox,
}

impl Chunker {
    /// Reads one file (its plaintext, with `decrypt`): its new chunks, then its chunk list
    /// (or why it was skipped).
    fn file(
        &mut self,
        path: PathBuf,
        handle: Option<Handle>,
        decrypt: Option<&lifeboat_shared::ios_crypto::FileKey>,
    ) -> Result<(), Stopped> {
        let Self { keys, seed, seen, progress, out } = self;
        let seed = *seed;
        let opened = match handle {
            Some(h) => Ok(h),
            None => open_for_reading(&path).map(|file| Handle { file, _slot: None }),
        };
        let handle = match opened {
            Ok(f) => f,
            Err(e) => return out.push(Piece::Skipped(path, e)),
        };
        let mut file = &handle.file;
        let mut stopped = false;
        let result = (|| -> Result<(FileKey, Box<[ChunkRef]>), std::io::Error> {
            // A handle the phone's file was written through is at its end.
            std::io::Seek::rewind(&mut file)?;
            let before = FileKey::of(&file.metadata()?);
            let mut chunks = Vec::new();
            let mut fresh = Vec::new();
            let mut emit = |buf: &Bytes, ranges: &[std::ops::Range<usize>]| -> Result<(), std::io::Error> {
                fresh.clear();
                for range in ranges {
                    let id = keys.id.chunk_id(&buf[range.clone()]);
                    chunks.push(ChunkRef { id, length: range.len() as u32 });
                    Progress::add(&progress.bytes_chunked, range.len() as u64);
                    if seen.insert(id) {
                        fresh.push((id, range.clone()));
                    }
                }
                // New chunks are slices of the read buffer, which each keeps whole: when
                // they are less than half of it (a big file changed here and there), they
                // are copied out instead, so memory follows the chunks queued.
                let fresh_bytes: usize = fresh.iter().map(|(_, r)| r.len()).sum();
                let slice = 2 * fresh_bytes >= buf.len();
                for (id, range) in fresh.drain(..) {
                    let chunk = if slice { buf.slice(range) } else { Bytes::copy_from_slice(&buf[range]) };
                    if out.push(Piece::Chunk(id, chunk)).is_err() {
                        stopped = true;
                        return Err(std::io::Error::other("the pipeline stopped"));
                    }
                }
                Ok(())
            };
            // A small file (most of a phone's) is read whole into a buffer of its size,
            // a larger one in blocks; new chunks are mostly slices of those buffers. At
            // most one byte past the size is read: a growing file is refused below.
            let block = before.size.saturating_add(1).min(READ_BLOCK_BYTES) as usize;
            let limited = std::io::Read::take(file, before.size.saturating_add(1));
            match decrypt {
                None => read_chunks(limited, seed, block, &mut emit)?,
                Some(key) => read_chunks(DecryptingReader::new(limited, key), seed, block, &mut emit)?,
            };
            // A file written to while it was read is not what its chunks say.
            let after = FileKey::of(&file.metadata()?);
            let read: u64 = chunks.iter().map(|c| u64::from(c.length)).sum();
            let stored = if decrypt.is_some() { lifeboat_shared::ios_crypto::cipher_len(read) } else { read };
            if after != before || stored != before.size {
                return Err(std::io::Error::other("the file changed while it was read"));
            }
            Ok((before, chunks.into_boxed_slice()))
        })();
        if stopped {
            return Err(Stopped);
        }
        Progress::add(&progress.files_chunked, 1);
        out.push(match result {
            Ok((key, chunks)) => Piece::File(key, chunks),
            Err(e) => Piece::Skipped(path, e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_shared::ids::ChunkId;

    fn key_of(path: &Path) -> FileKey {
        FileKey::of(&std::fs::metadata(path).unwrap())
    }

    #[test]
    fn the_cache_keeps_consistent_entries_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, vec![7u8; 1000]).unwrap();
        let good = (key_of(&file), vec![ChunkRef { id: ChunkId([1; 32]), length: 1000 }]);
        let bad = (FileKey { size: 5, ..key_of(&file) }, vec![ChunkRef { id: ChunkId([2; 32]), length: 4 }]);
        FileCache { files: vec![good.clone(), bad] }.save(dir.path(), "u").unwrap();
        let loaded = FileCache::load(dir.path(), "u");
        assert_eq!(loaded.files, vec![good]);
        assert_eq!(loaded.bytes(), 1000);
        std::fs::write(FileCache::path(dir.path(), "u"), b"not postcard").unwrap();
        assert!(FileCache::load(dir.path(), "u").is_empty(), "a damaged cache is an empty one");
    }

    #[test]
    fn the_cache_made_from_a_snapshot_pairs_each_key_with_its_files_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, vec![1u8; 10]).unwrap();
        std::fs::write(&b, vec![2u8; 20]).unwrap();
        let entry = |path: &str, size: u64, id: u8| FileEntry {
            path: path.into(),
            size,
            mode: 0o644,
            mtime_unix_seconds: 0,
            chunks: vec![ChunkRef { id: ChunkId([id; 32]), length: size as u32 }],
            ios_key: None,
        };
        let cache = FileCache::from_snapshot(vec![key_of(&a), key_of(&b)], vec![entry("a", 10, 1), entry("b", 20, 2)]);
        assert_eq!(
            cache.files,
            vec![
                (key_of(&a), vec![ChunkRef { id: ChunkId([1; 32]), length: 10 }]),
                (key_of(&b), vec![ChunkRef { id: ChunkId([2; 32]), length: 20 }]),
            ]
        );
        cache.save(dir.path(), "u").unwrap();
        assert_eq!(FileCache::load(dir.path(), "u"), cache);
        assert_eq!(cache.bytes(), 30);
    }

    #[test]
    fn a_cache_written_with_the_earlier_128_bit_times_still_reads() {
        // The layout before 2026-11-27 kept the times as i128; postcard writes both widths
        // as the same zigzag varints, so a cache on disk survives the upgrade.
        #[derive(Serialize)]
        struct OldKey {
            dev: u64,
            ino: u64,
            size: u64,
            mtime_ns: i128,
            btime_ns: Option<i128>,
        }
        #[derive(Serialize)]
        struct OldCache {
            files: Vec<(OldKey, Vec<ChunkRef>)>,
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, vec![3u8; 5]).unwrap();
        let key = key_of(&file);
        let old = OldCache {
            files: vec![(
                OldKey {
                    dev: key.dev,
                    ino: key.ino,
                    size: key.size,
                    mtime_ns: i128::from(key.mtime_ns),
                    btime_ns: key.btime_ns.map(i128::from),
                },
                vec![ChunkRef { id: ChunkId([9; 32]), length: 5 }],
            )],
        };
        std::fs::create_dir_all(dir.path().join("cache")).unwrap();
        std::fs::write(FileCache::path(dir.path(), "u"), postcard::to_allocvec(&old).unwrap()).unwrap();
        let loaded = FileCache::load(dir.path(), "u");
        assert_eq!(loaded.files, vec![(key, vec![ChunkRef { id: ChunkId([9; 32]), length: 5 }])]);
    }

    #[test]
    fn a_rewritten_or_replaced_file_has_another_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"one").unwrap();
        let first = key_of(&a);
        // Renamed (as the phone moves files out of Snapshot/): the same key.
        let b = dir.path().join("b");
        std::fs::rename(&a, &b).unwrap();
        assert_eq!(key_of(&b), first);
        // Rewritten with other bytes of another length: another key.
        std::fs::write(&b, b"three").unwrap();
        assert_ne!(key_of(&b), first);
    }
}
