//! The server's read path of a snapshot: its manifest, and its chunks located in the
//! index, read from packs a ranged read per neighbouring group, and — where the server
//! itself needs the plaintext (the API) — opened, re-hashed and reassembled by
//! `lifeboat_shared::restore`, the code the agent's restore and restore tests run.

use std::collections::HashMap;
use std::sync::Arc;

use lifeboat_shared::chunk::BlobError;
use lifeboat_shared::ids::{ChunkId, SnapshotId};
use lifeboat_shared::manifest::{FileEntry, Manifest};
use lifeboat_shared::restore::{self, RebuildError};

use crate::keys::TenantKeys;
use crate::objects::packs::{self, ReadError};
use crate::store::chunks::{self, IndexError};

#[derive(Debug, thiserror::Error)]
pub enum ReadPathError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{0}")]
    Verify(#[from] BlobError),
    #[error("{path}: {cause}")]
    Rebuild { path: String, cause: RebuildError },
    #[error("verifying chunks: {0}")]
    Task(String),
}

/// Reads and opens a snapshot's sealed manifest.
pub async fn manifest(
    op: &opendal::Operator,
    keys: &Arc<TenantKeys>,
    snapshot: SnapshotId,
    key: &str,
) -> Result<Manifest, String> {
    let sealed = op.read(key).await.map_err(|e| e.to_string())?.to_vec();
    let keys2 = keys.clone();
    // Tens of milliseconds for 50,000 files: on the blocking pool.
    tokio::task::spawn_blocking(move || Manifest::open(&keys2.data, &snapshot, &sealed).map_err(|e| e.to_string()))
        .await
        .map_err(|e| e.to_string())?
}

/// The verified plaintext of `ids`: each chunk decrypted, decompressed and re-hashed on
/// the blocking pool (a batch is megabytes of work), through the shared read path.
pub async fn plain(
    client: &tokio_postgres::Client,
    op: &opendal::Operator,
    keys: &Arc<TenantKeys>,
    ids: &[ChunkId],
) -> Result<HashMap<ChunkId, Vec<u8>>, ReadPathError> {
    let locations = chunks::locate(client, keys.tenant, ids).await?;
    let mut blobs = Vec::with_capacity(locations.len());
    for group in packs::read_groups(&locations) {
        blobs.extend(packs::read_group(op, keys.tenant, group).await?);
    }
    let batch = restore::Batch { files: 0..0, chunks: ids.to_vec() };
    let k = keys.clone();
    let opened = tokio::task::spawn_blocking(move || restore::open(&k.data, &k.id, &batch, blobs))
        .await
        .map_err(|e| ReadPathError::Task(e.to_string()))?;
    if let Some((_, e)) = opened.failed.into_iter().next() {
        return Err(e.into());
    }
    Ok(opened.plain)
}

/// One file's bytes, read, verified and reassembled.
pub async fn file(
    client: &tokio_postgres::Client,
    op: &opendal::Operator,
    keys: &Arc<TenantKeys>,
    f: &FileEntry,
) -> Result<Vec<u8>, ReadPathError> {
    let ids: Vec<ChunkId> = f.chunks.iter().map(|c| c.id).collect();
    let plain = plain(client, op, keys, &ids).await?;
    restore::rebuild(f, &plain).map_err(|e| ReadPathError::Rebuild { path: f.path.clone(), cause: e })
}
