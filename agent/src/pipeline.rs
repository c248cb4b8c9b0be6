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

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lifeboat_shared::chunk::{seal_chunk, stream_chunks};
use lifeboat_shared::ids::{ChunkId, RunId};
use lifeboat_shared::manifest::{ChunkRef, FileEntry};
use lifeboat_shared::wire::{MAX_IDS_PER_REQUEST, Request, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::client::Client;
use crate::progress::Progress;
use crate::transfer::{Keys, TransferError, UploadReport, list_files, nonce};

/// Plaintext of new chunks per missing-chunks round trip.
const BATCH_BYTES: usize = 32 * 1024 * 1024;
/// Batches being asked about, sealed or uploaded at once.
const BATCHES_IN_FLIGHT: usize = 2;
/// Upload streams per batch.
const STREAMS_PER_BATCH: usize = 4;
/// Chunks the chunker may run ahead of the uploads.
const PIECES_QUEUED: usize = 32;
/// Finished files handed on with an open handle (surviving the phone's renames); later
/// ones go by path alone, so a slow upload cannot exhaust file descriptors.
const OPEN_HANDLES: usize = 256;

/// What identifies a file's content without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// The chunks of the files of this device's last committed snapshot, as they lie in the
/// mirror: `<state>/cache/<udid>.bin`. Only ever trusted for files whose key still
/// matches, and those chunks are on the server (the commit checked).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FileCache {
    files: Vec<(FileKey, Vec<ChunkRef>)>,
}

impl FileCache {
    fn path(state_dir: &Path, udid: &str) -> PathBuf {
        state_dir.join("cache").join(format!("{udid}.bin"))
    }

    /// The cache, or an empty one if there is none or it does not read (it is only a cache).
    pub fn load(state_dir: &Path, udid: &str) -> Self {
        std::fs::read(Self::path(state_dir, udid))
            .ok()
            .and_then(|bytes| postcard::from_bytes(&bytes).ok())
            .unwrap_or_default()
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
}

enum Job {
    /// A finished file, opened before the phone could move it, or by path.
    File(PathBuf, Option<std::fs::File>),
    /// Answer [`Piece::Flushed`] once every earlier file is done.
    Flush,
}

enum Piece {
    /// A chunk not seen before in this run.
    Chunk(ChunkId, Vec<u8>),
    File(FileKey, Vec<ChunkRef>),
    /// The file went away or changed before it could be read; the final walk decides.
    Skipped(PathBuf, std::io::Error),
    Flushed,
}

/// Where finished files go; cloneable and usable from synchronous code.
#[derive(Debug, Clone)]
pub struct Feed {
    jobs: mpsc::UnboundedSender<Job>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p, _) => write!(f, "File({})", p.display()),
            Self::Flush => f.write_str("Flush"),
        }
    }
}

impl Feed {
    /// Queues a finished file. Returns false when the pipeline has stopped.
    pub fn file(&self, path: PathBuf) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let handle = (self.queued.fetch_add(1, Relaxed) < OPEN_HANDLES).then(|| std::fs::File::open(&path).ok());
        self.jobs.send(Job::File(path, handle.flatten())).is_ok()
    }
}

/// A backup's upload pipeline for one run. Dropping it stops its uploads (a `JoinSet`)
/// and, once the device side lets go of its [`Feed`], the chunker.
pub struct Pipeline {
    client: Client,
    keys: Keys,
    run: RunId,
    progress: Arc<Progress>,
    feed: Feed,
    pieces: mpsc::Receiver<Piece>,
    /// Files chunked (this run) or cached (last snapshot; `true`), by key.
    known: HashMap<FileKey, (Vec<ChunkRef>, bool)>,
    batch: Vec<(ChunkId, Vec<u8>)>,
    batch_bytes: usize,
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
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut seen = HashSet::new();
        let mut known = HashMap::with_capacity(cache.files.len());
        for (key, chunks) in cache.files {
            seen.extend(chunks.iter().map(|c| c.id));
            known.insert(key, (chunks, true));
        }
        {
            // Ends when every sender of jobs is gone.
            let (keys, queued, progress) = (keys.clone(), queued.clone(), progress.clone());
            tokio::task::spawn_blocking(move || chunker(jobs_rx, pieces_tx, keys, seen, queued, progress));
        }
        Self {
            client,
            keys,
            run,
            progress,
            feed: Feed { jobs: jobs_tx, queued },
            pieces,
            known,
            batch: Vec::new(),
            batch_bytes: 0,
            uploads: JoinSet::new(),
            report: UploadReport::default(),
        }
    }

    /// Where the device side hands finished files.
    pub fn feed(&self) -> Feed {
        self.feed.clone()
    }

    /// Works through finished files until `done` resolves (the phone finished or failed),
    /// then returns its output. Upload errors end it early.
    pub async fn run_until<T>(&mut self, done: impl Future<Output = T>) -> Result<T, TransferError> {
        tokio::pin!(done);
        loop {
            tokio::select! {
                biased;
                out = &mut done => return Ok(out),
                Some(r) = self.uploads.join_next(), if !self.uploads.is_empty() => self.settled(r)?,
                piece = self.pieces.recv() => match piece {
                    Some(p) => self.take(p).await?,
                    None => return Err(TransferError::Invalid("the chunker stopped".into())),
                },
            }
        }
    }

    /// After the phone is done: every file under `root` in the snapshot, with its chunks
    /// (read now only if not chunked before), all uploads finished. Returns the manifest
    /// entries, sorted by path, and the cache for the next backup.
    pub async fn finish(mut self, root: &Path) -> Result<(Vec<FileEntry>, FileCache, UploadReport), TransferError> {
        // Everything the phone handed on is chunked first, so a reused inode is never
        // mistaken for the file it replaced.
        let _ = self.feed.jobs.send(Job::Flush);
        loop {
            match self.next_piece().await? {
                Piece::Flushed => break,
                p => self.take(p).await?,
            }
        }
        let mut entries = Vec::new();
        let mut pending = 0usize;
        for rel in list_files(root)? {
            let path = root.join(&rel);
            let meta =
                std::fs::symlink_metadata(&path).map_err(|cause| TransferError::Io { path: path.clone(), cause })?;
            let key = FileKey::of(&meta);
            if !self.known.contains_key(&key) {
                pending += 1;
                self.feed.queued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = self.feed.jobs.send(Job::File(path, None));
            }
            entries.push((rel, key, meta));
        }
        let _ = self.feed.jobs.send(Job::Flush);
        loop {
            match self.next_piece().await? {
                Piece::Flushed => break,
                Piece::Skipped(path, cause) => return Err(TransferError::Io { path, cause }),
                p => self.take(p).await?,
            }
        }
        tracing::debug!(files = entries.len(), read_at_end = pending, "backup directory chunked");
        self.flush_batch();
        while let Some(r) = self.uploads.join_next().await {
            self.settled(r)?;
        }
        let mut files = Vec::with_capacity(entries.len());
        let mut cache = FileCache::default();
        for (rel, key, meta) in entries {
            let (chunks, cached) = self.known.get(&key).cloned().ok_or_else(|| TransferError::Io {
                path: root.join(&rel),
                cause: std::io::Error::other("the file changed while it was read"),
            })?;
            self.report.files_from_cache += u64::from(cached);
            self.report.files += 1;
            self.report.logical_bytes += key.size;
            self.report.chunks += chunks.len() as u64;
            cache.files.push((key, chunks.clone()));
            files.push(FileEntry {
                path: rel,
                size: key.size,
                mode: meta.permissions().mode() & 0o7777,
                mtime_unix_seconds: meta.mtime(),
                chunks,
            });
        }
        Ok((files, cache, self.report))
    }

    async fn next_piece(&mut self) -> Result<Piece, TransferError> {
        loop {
            tokio::select! {
                biased;
                Some(r) = self.uploads.join_next(), if !self.uploads.is_empty() => self.settled(r)?,
                piece = self.pieces.recv() => {
                    return piece.ok_or_else(|| TransferError::Invalid("the chunker stopped".into()));
                }
            }
        }
    }

    async fn take(&mut self, piece: Piece) -> Result<(), TransferError> {
        match piece {
            Piece::Chunk(id, data) => {
                self.batch_bytes += data.len();
                self.batch.push((id, data));
                if self.batch_bytes >= BATCH_BYTES || self.batch.len() >= MAX_IDS_PER_REQUEST {
                    // Back-pressure: a full set of batches in flight stops the chunker.
                    while self.uploads.len() >= BATCHES_IN_FLIGHT {
                        if let Some(r) = self.uploads.join_next().await {
                            self.settled(r)?;
                        }
                    }
                    self.flush_batch();
                }
            }
            Piece::File(key, chunks) => {
                self.known.insert(key, (chunks, false));
            }
            Piece::Skipped(path, cause) => {
                tracing::debug!(path = %path.display(), error = %cause, "left for the final walk");
            }
            Piece::Flushed => {}
        }
        Ok(())
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
        Ok(())
    }
}

async fn send_batch(
    client: Client,
    keys: Keys,
    run: RunId,
    batch: Vec<(ChunkId, Vec<u8>)>,
    progress: Arc<Progress>,
) -> Result<BatchReport, TransferError> {
    let ids: Vec<ChunkId> = batch.iter().map(|(id, _)| *id).collect();
    let missing: HashSet<ChunkId> = match client.request(&Request::MissingChunks { run, ids }).await? {
        Response::Missing { ids } => ids.into_iter().collect(),
        other => return Err(TransferError::Invalid(format!("unexpected answer {other:?}"))),
    };
    let wanted: Vec<(ChunkId, Vec<u8>)> = batch.into_iter().filter(|(id, _)| missing.contains(id)).collect();
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
            client.put_chunks(run, &part).await?;
            Progress::add(&progress.bytes_uploaded, part.iter().map(|(_, b)| b.len() as u64).sum());
            Ok::<_, TransferError>(())
        });
    }
    while let Some(r) = streams.join_next().await {
        r.map_err(|e| TransferError::Invalid(format!("an upload stream failed: {e}")))??;
    }
    Ok(report)
}

/// The chunker thread: reads each queued file and emits its new chunks and its chunk list.
fn chunker(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    pieces: mpsc::Sender<Piece>,
    keys: Keys,
    mut seen: HashSet<ChunkId>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    progress: Arc<Progress>,
) {
    let seed = keys.id.chunker_seed();
    while let Some(job) = jobs.blocking_recv() {
        let (path, handle) = match job {
            Job::Flush => {
                if pieces.blocking_send(Piece::Flushed).is_err() {
                    return;
                }
                continue;
            }
            Job::File(path, handle) => {
                queued.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                (path, handle)
            }
        };
        let file = match handle.map_or_else(|| std::fs::File::open(&path), Ok) {
            Ok(f) => f,
            Err(e) => {
                if pieces.blocking_send(Piece::Skipped(path, e)).is_err() {
                    return;
                }
                continue;
            }
        };
        let result = (|| -> Result<(FileKey, Vec<ChunkRef>), std::io::Error> {
            let before = FileKey::of(&file.metadata()?);
            let mut chunks = Vec::new();
            for chunk in stream_chunks(std::io::BufReader::with_capacity(1 << 20, &file), seed) {
                let chunk = chunk?;
                let id = keys.id.chunk_id(&chunk);
                chunks.push(ChunkRef { id, length: chunk.len() as u32 });
                Progress::add(&progress.bytes_chunked, chunk.len() as u64);
                if seen.insert(id) && pieces.blocking_send(Piece::Chunk(id, chunk)).is_err() {
                    return Err(std::io::Error::other("the pipeline stopped"));
                }
            }
            // A file written to while it was read is not what its chunks say.
            let after = FileKey::of(&file.metadata()?);
            let read: u64 = chunks.iter().map(|c| u64::from(c.length)).sum();
            if after != before || read != before.size {
                return Err(std::io::Error::other("the file changed while it was read"));
            }
            Ok((before, chunks))
        })();
        Progress::add(&progress.files_chunked, 1);
        let piece = match result {
            Ok((key, chunks)) => Piece::File(key, chunks),
            Err(e) => Piece::Skipped(path, e),
        };
        if pieces.blocking_send(piece).is_err() {
            return;
        }
    }
}
