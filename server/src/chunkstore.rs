//! Reading chunks back out of packs: locate them in the index, then read each run of
//! neighbouring blobs in a pack with one ranged read. Used by agent downloads, the
//! help-desk API and restore tests.

use std::collections::HashMap;

use lifeboat_shared::chunk::open_and_verify;
use lifeboat_shared::ids::{ChunkId, PackId, TenantId};

use crate::keys::TenantKeys;
use crate::storage;

/// Blobs closer than this in one pack are fetched with one read.
const COALESCE_GAP_BYTES: u64 = 1024 * 1024;

/// Where one chunk's blob lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub id: ChunkId,
    pub pack: PackId,
    pub offset: u64,
    pub length: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkStoreError {
    #[error("{missing} of {asked} chunks are not stored")]
    Missing { missing: usize, asked: usize },
    #[error("chunk index: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("chunk index holds a malformed id")]
    BadIndex,
    #[error("reading pack {pack}: {cause}")]
    Storage { pack: PackId, cause: String },
    #[error("pack {pack} is shorter than its index says")]
    Short { pack: PackId },
    #[error("{0}")]
    Verify(#[from] lifeboat_shared::chunk::BlobError),
}

/// Locations of `ids` (deduplicated) in the tenant's chunk index, sorted by pack and
/// offset; `Missing` if any is not stored.
pub async fn locate(
    client: &tokio_postgres::Client,
    tenant: TenantId,
    ids: &[ChunkId],
) -> Result<Vec<Location>, ChunkStoreError> {
    let mut uniq: Vec<&[u8]> = ids.iter().map(|i| &i.0[..]).collect();
    uniq.sort_unstable();
    uniq.dedup();
    let rows = client
        .query(
            "SELECT id, pack_id, offset_bytes, length_bytes FROM chunks WHERE tenant_id = $1 AND id = ANY($2)",
            &[&tenant.0, &uniq],
        )
        .await?;
    if rows.len() != uniq.len() {
        return Err(ChunkStoreError::Missing { missing: uniq.len() - rows.len(), asked: uniq.len() });
    }
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id: Vec<u8> = r.get(0);
        let pack: Vec<u8> = r.get(1);
        out.push(Location {
            id: ChunkId(id.try_into().map_err(|_| ChunkStoreError::BadIndex)?),
            pack: PackId(pack.try_into().map_err(|_| ChunkStoreError::BadIndex)?),
            offset: u64::try_from(r.get::<_, i64>(2)).map_err(|_| ChunkStoreError::BadIndex)?,
            length: u32::try_from(r.get::<_, i32>(3)).map_err(|_| ChunkStoreError::BadIndex)?,
        });
    }
    out.sort_by_key(|l| (l.pack.0, l.offset));
    Ok(out)
}

/// Which of `ids` the tenant's chunk index holds.
pub async fn indexed(
    client: &tokio_postgres::Client,
    tenant: TenantId,
    ids: &[ChunkId],
) -> Result<std::collections::HashSet<ChunkId>, ChunkStoreError> {
    let raw: Vec<&[u8]> = ids.iter().map(|i| &i.0[..]).collect();
    client
        .query("SELECT id FROM chunks WHERE tenant_id = $1 AND id = ANY($2)", &[&tenant.0, &raw])
        .await?
        .iter()
        .map(|r| {
            let id: Vec<u8> = r.get(0);
            id.try_into().map(ChunkId).map_err(|_| ChunkStoreError::BadIndex)
        })
        .collect()
}

/// How many of `ids` (distinct) the tenant's chunk index holds: one number back instead of
/// a row per chunk, for the common case of a commit whose chunks are all there.
pub async fn count_indexed(
    client: &tokio_postgres::Client,
    tenant: TenantId,
    ids: &[ChunkId],
) -> Result<usize, ChunkStoreError> {
    let raw: Vec<&[u8]> = ids.iter().map(|i| &i.0[..]).collect();
    let row = client
        .query_one("SELECT count(*) FROM chunks WHERE tenant_id = $1 AND id = ANY($2)", &[&tenant.0, &raw])
        .await?;
    Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(usize::MAX))
}

/// Splits sorted locations into groups that one ranged read serves.
pub fn read_groups(locations: &[Location]) -> impl Iterator<Item = &[Location]> {
    locations.chunk_by(|a, b| {
        a.pack == b.pack && b.offset.saturating_sub(a.offset + u64::from(a.length)) < COALESCE_GAP_BYTES
    })
}

/// Reads one group's blobs with one ranged read.
pub async fn read_group(
    op: &opendal::Operator,
    tenant: TenantId,
    group: &[Location],
) -> Result<Vec<(ChunkId, Vec<u8>)>, ChunkStoreError> {
    let Some(first) = group.first() else { return Ok(Vec::new()) };
    let start = first.offset;
    let end = group.iter().map(|l| l.offset + u64::from(l.length)).max().unwrap_or(start);
    let bytes = op
        .read_with(&storage::pack_path(&tenant, &first.pack))
        .range(start..end)
        .await
        .map_err(|e| ChunkStoreError::Storage { pack: first.pack, cause: e.to_string() })?
        .to_vec();
    group
        .iter()
        .map(|l| {
            let at = (l.offset - start) as usize;
            let blob = bytes.get(at..at + l.length as usize).ok_or(ChunkStoreError::Short { pack: l.pack })?;
            Ok((l.id, blob.to_vec()))
        })
        .collect()
}

/// The verified plaintext of `ids`: each chunk decrypted, decompressed and re-hashed.
pub async fn read_plain(
    client: &tokio_postgres::Client,
    op: &opendal::Operator,
    keys: &TenantKeys,
    ids: &[ChunkId],
) -> Result<HashMap<ChunkId, Vec<u8>>, ChunkStoreError> {
    let locations = locate(client, keys.tenant, ids).await?;
    let mut out = HashMap::with_capacity(locations.len());
    for group in read_groups(&locations) {
        for (id, blob) in read_group(op, keys.tenant, group).await? {
            let plain = open_and_verify(&keys.data, &keys.id, &id, &blob)?;
            out.insert(id, plain);
        }
    }
    Ok(out)
}
