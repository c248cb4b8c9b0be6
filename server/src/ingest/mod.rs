//! Ingest: what an agent does to back up a device — register it, report its state, open
//! a run under a lease, find out which chunks are missing, upload chunks, commit a
//! snapshot, end the run. Run buffers (`buffer`), the pack writer (`packs`), uploads
//! (`upload`), runs and leases (`runs`) and the commit (`commit`).
//!
//! Invariants:
//! - Every query is scoped to the session's tenant; an agent reaches only its tenant's
//!   devices, runs and chunks, and only its own runs.
//! - A new chunk is decrypted and re-hashed before anything of it is stored; a chunk
//!   whose content does not match its id is refused.
//! - Write order: pack object durable → pack and chunk rows; manifest object durable →
//!   one transaction that inserts the snapshot and marks the run succeeded. A crash at
//!   any point leaves at most unreferenced objects, never a visible partial snapshot.
//!   (Chunk rows are written as packs are flushed, not at commit, so an interrupted run
//!   resumes without re-sending what reached a durable pack.)
//! - No database transaction waits on storage.
//!
//! Never here: reading snapshots back (that is `restore`), SQL (that is `store`).

pub mod buffer;
mod commit;
mod packs;
mod runs;
mod upload;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifeboat_shared::ids::RunId;
use lifeboat_shared::pack::PackBuilder;

pub use commit::{MAX_SEALED_MANIFEST_BYTES, read_bytes};

use crate::app::{App, lock};
use crate::session::{Rejection, Reply};
use buffer::RunChunks;
use packs::{PackBuffers, PackJob};

/// Full packs of one run written in the background at once (each holds ~32 MiB in
/// memory): uploads run ahead of storage by that much.
const PACK_WRITES_PER_RUN: usize = 3;

/// A run's chunks not yet indexed, with its background pack writes.
#[derive(Debug)]
pub struct RunBuffer {
    pub chunks: RunChunks,
    /// Full packs being written and indexed in the background.
    in_flight: Vec<tokio::task::JoinHandle<Reply>>,
    /// One permit per pack write that may run at once.
    slots: Arc<tokio::sync::Semaphore>,
}

/// The ingest state of this server process: the run buffers of every connection.
#[derive(Debug)]
pub struct Ingest {
    pub app: Arc<App>,
    pub pack_target_bytes: usize,
    pub lease: Duration,
    /// The storage directory when storage is the local disk: written packs are dropped
    /// from the page cache (`objects::drop_cached`).
    pub local_root: Option<std::path::PathBuf>,
    runs: Mutex<HashMap<RunId, Arc<tokio::sync::Mutex<RunBuffer>>>>,
    pack_buffers: Arc<PackBuffers>,
    /// Chunk verifications on the blocking pool at once: one per core. Each stream of each
    /// connection may have one waiting; more running than cores would only crowd out the
    /// task that reads the QUIC socket.
    verify_slots: Arc<tokio::sync::Semaphore>,
}

impl Ingest {
    pub fn new(app: Arc<App>) -> Self {
        Self {
            app,
            pack_target_bytes: 32 * 1024 * 1024,
            lease: Duration::from_secs(600),
            local_root: None,
            runs: Mutex::new(HashMap::new()),
            pack_buffers: Arc::default(),
            verify_slots: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            )),
        }
    }

    fn buffer(&self, run: RunId, tenant: lifeboat_shared::ids::TenantId) -> Arc<tokio::sync::Mutex<RunBuffer>> {
        lock(&self.runs)
            .entry(run)
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(RunBuffer {
                    chunks: RunChunks::new(tenant, self.full_size_pack()),
                    in_flight: Vec::new(),
                    slots: Arc::new(tokio::sync::Semaphore::new(PACK_WRITES_PER_RUN)),
                }))
            })
            .clone()
    }

    /// A pack builder with room for a full pack (the target, one maximal blob past it,
    /// and the index), in a spare buffer where there is one.
    fn full_size_pack(&self) -> PackBuilder {
        let capacity = self.pack_target_bytes + lifeboat_shared::format::MAX_BLOB_BYTES + 1024 * 1024;
        PackBuilder::with_buffer(self.pack_buffers.take(capacity))
    }

    /// Flushes and drops the buffers of runs that ended or whose lease expired (an agent
    /// that died mid-upload): their verified chunks reach storage and the memory is freed.
    pub async fn sweep(&self) {
        let runs: Vec<uuid::Uuid> = lock(&self.runs).keys().map(|r| r.0).collect();
        if runs.is_empty() {
            self.pack_buffers.clear();
            return;
        }
        let stale = match self.app.db.get().await {
            Ok(client) => crate::store::runs::ended_or_expired(&client, &runs).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match stale {
            Ok(stale) => {
                for run in stale {
                    self.discard_buffer(run).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "sweeping run buffers"),
        }
    }

    /// Runs currently holding a buffer (tests and diagnostics).
    pub fn buffered_runs(&self) -> usize {
        lock(&self.runs).len()
    }

    async fn discard_buffer(&self, run: RunId) {
        let buf = lock(&self.runs).remove(&run);
        if let Some(buf) = buf
            && let Err(r) = self.flush(&buf).await
        {
            tracing::warn!(run.id = %run, error = %r.message, "flushing a replaced run's chunks");
        }
    }

    /// Hands the buffer's pack (if any) to a background task that writes it to storage and
    /// then indexes it, so the upload stream that filled it reads on. At most
    /// [`PACK_WRITES_PER_RUN`] such tasks run per run: beyond that the stream waits for a
    /// slot (and the pack keeps filling meanwhile).
    /// Without `force`, a pack another stream already handed over (while this one waited
    /// for a slot) is not handed over again half-empty.
    async fn start_flush(&self, buf: &Arc<tokio::sync::Mutex<RunBuffer>>, force: bool) -> Reply {
        let slots = buf.lock().await.slots.clone();
        let permit =
            slots.acquire_owned().await.map_err(|e| Rejection::internal("waiting for a pack write slot", e))?;
        let mut b = buf.lock().await;
        if !force && b.chunks.pack_len() < self.pack_target_bytes {
            return Ok(());
        }
        // A forced flush ends the run's uploads (commit, or a run given up): the next
        // pack, if any, does not get a full-size buffer.
        let fresh = if force { PackBuilder::new() } else { self.full_size_pack() };
        let Some((pack, lens)) = b.chunks.take_pack(fresh) else { return Ok(()) };
        let job = PackJob {
            storage: self.app.storage.clone(),
            db: self.app.db.clone(),
            metrics: self.app.metrics.clone(),
            buf: buf.clone(),
            tenant: b.chunks.tenant,
            spares: self.pack_buffers.clone(),
            local_root: self.local_root.clone(),
        };
        b.in_flight.push(tokio::spawn(async move {
            let result = job.run(pack, lens).await;
            drop(permit);
            result
        }));
        Ok(())
    }

    /// Writes and indexes everything the buffer holds and waits for all its background
    /// writes: afterwards every chunk the run uploaded is durable and indexed, or the first
    /// failure is returned (and the chunks that failed are missing again).
    async fn flush(&self, buf: &Arc<tokio::sync::Mutex<RunBuffer>>) -> Reply {
        let started = self.start_flush(buf, true).await;
        let handles: Vec<_> = std::mem::take(&mut buf.lock().await.in_flight);
        let mut first = started;
        for handle in handles {
            let joined = handle.await.unwrap_or_else(|e| Err(Rejection::internal("writing a pack", e)));
            if let Err(e) = joined {
                first = first.and(Err(e));
            }
        }
        first
    }
}
