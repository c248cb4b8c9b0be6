//! The pack writer: full packs go to storage in the background, then into the chunk
//! index — in that order, so an index row never points at bytes that are not durable —
//! and their buffers come back for the next packs.

use std::sync::{Arc, Mutex};

use lifeboat_shared::ids::{ChunkId, TenantId};
use lifeboat_shared::pack::PackBuilder;

use super::RunBuffer;
use crate::app::lock;
use crate::objects;
use crate::platform::metrics::Metrics;
use crate::session::{Rejection, Reply};
use crate::store;

/// Spare pack buffers kept for reuse while runs are uploading (each ~37 MiB).
const SPARE_PACK_BUFFERS: usize = 4;

/// Buffers of written packs, kept for the next packs: a fresh ~37 MiB buffer per pack
/// is ~9,500 fresh pages for the kernel to fault in and zero. Emptied by the first sweep
/// that finds no run buffered, so an idle server does not hold them.
#[derive(Debug, Default)]
pub struct PackBuffers(Mutex<Vec<Vec<u8>>>);

impl PackBuffers {
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        lock(&self.0).pop().filter(|b| b.capacity() >= capacity).unwrap_or_else(|| Vec::with_capacity(capacity))
    }

    fn give(&self, buf: Vec<u8>) {
        let mut spare = lock(&self.0);
        if spare.len() < SPARE_PACK_BUFFERS {
            spare.push(buf);
        }
    }

    pub fn clear(&self) {
        lock(&self.0).clear();
    }
}

/// A finished pack's bytes on their way to storage: the buffer returns to the spares
/// when storage drops it.
struct PooledPack {
    buf: Vec<u8>,
    spares: Arc<PackBuffers>,
}

impl AsRef<[u8]> for PooledPack {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledPack {
    fn drop(&mut self) {
        self.spares.give(std::mem::take(&mut self.buf));
    }
}

/// One full pack on its way to storage and the chunk index, with what it needs to get there.
pub struct PackJob {
    pub storage: opendal::Operator,
    pub db: deadpool_postgres::Pool,
    pub metrics: Arc<Metrics>,
    pub buf: Arc<tokio::sync::Mutex<RunBuffer>>,
    pub tenant: TenantId,
    pub spares: Arc<PackBuffers>,
    pub local_root: Option<std::path::PathBuf>,
}

impl PackJob {
    /// Writes the pack, then indexes it (a crash between the two leaves an unreferenced
    /// pack, never an index entry without its bytes). Its chunks stop being pending either
    /// way: indexed, or missing again so the agent re-sends them.
    pub async fn run(self, pack: PackBuilder, lens: Vec<u32>) -> Reply {
        // Hashing 32 MiB takes milliseconds: off the runtime's workers, like chunk
        // verification in `put_chunks`.
        let ids: Vec<ChunkId> = pack.entries().iter().map(|e| e.id).collect();
        let sealed = tokio::task::spawn_blocking(move || pack.finish()).await;
        let Ok((pack_id, bytes, entries)) = sealed else {
            // Only a panic gets here: its chunks are missing again, as after a failed write.
            self.release(&ids).await;
            return Err(Rejection::internal("sealing a pack", "the sealing task failed"));
        };
        let size = bytes.len() as i64;
        let result = async {
            let bytes = bytes::Bytes::from_owner(PooledPack { buf: bytes, spares: self.spares.clone() });
            let path = objects::pack_path(&self.tenant, &pack_id);
            self.storage.write(&path, bytes).await.map_err(|e| Rejection::internal("writing a pack to storage", e))?;
            self.metrics.ingest_stored_bytes.inc_by(size as u64);
            if let Some(root) = &self.local_root {
                // Only a cache hint: a pack that stays cached is no harm.
                let path = root.join(&path);
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = objects::drop_cached(&path) {
                        tracing::debug!(path = %path.display(), error = %e, "a written pack stays in the page cache");
                    }
                })
                .await;
            }
            let mut client = self.db.get().await?;
            store::chunks::index_pack(&mut client, self.tenant, pack_id, size, &entries, &lens).await?;
            Ok(())
        }
        .await;
        self.release(&ids).await;
        result
    }

    async fn release(&self, ids: &[ChunkId]) {
        self.buf.lock().await.chunks.release(ids);
    }
}
