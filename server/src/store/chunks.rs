//! `packs` and `chunks`: the chunk index — which pack holds each chunk of a tenant, where.
//!
//! A pack is indexed only after its object is durable (the caller writes it first), so an
//! index row never points at bytes that are not stored.

use std::collections::HashSet;

use lifeboat_shared::ids::{ChunkId, PackId, TenantId};
use lifeboat_shared::pack::PackEntry;
use tokio_postgres::Client;

/// Where one chunk's blob lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub id: ChunkId,
    pub pack: PackId,
    pub offset: u64,
    pub length: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{missing} of {asked} chunks are not stored")]
    Missing { missing: usize, asked: usize },
    #[error("chunk index: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("chunk index holds a malformed id")]
    BadIndex,
}

fn raw(ids: &[ChunkId]) -> Vec<&[u8]> {
    ids.iter().map(|i| &i.0[..]).collect()
}

/// Locations of `ids` (deduplicated) in the tenant's chunk index, sorted by pack and
/// offset; `Missing` if any is not stored.
pub async fn locate(client: &Client, tenant: TenantId, ids: &[ChunkId]) -> Result<Vec<Location>, IndexError> {
    let mut uniq = raw(ids);
    uniq.sort_unstable();
    uniq.dedup();
    let rows = client
        .query(
            "SELECT id, pack_id, offset_bytes, length_bytes FROM chunks WHERE tenant_id = $1 AND id = ANY($2)",
            &[&tenant.0, &uniq],
        )
        .await?;
    if rows.len() != uniq.len() {
        return Err(IndexError::Missing { missing: uniq.len() - rows.len(), asked: uniq.len() });
    }
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id: Vec<u8> = r.get(0);
        let pack: Vec<u8> = r.get(1);
        out.push(Location {
            id: ChunkId(id.try_into().map_err(|_| IndexError::BadIndex)?),
            pack: PackId(pack.try_into().map_err(|_| IndexError::BadIndex)?),
            offset: u64::try_from(r.get::<_, i64>(2)).map_err(|_| IndexError::BadIndex)?,
            length: u32::try_from(r.get::<_, i32>(3)).map_err(|_| IndexError::BadIndex)?,
        });
    }
    out.sort_by_key(|l| (l.pack.0, l.offset));
    Ok(out)
}

/// Which of `ids` the tenant's chunk index holds.
pub async fn indexed(client: &Client, tenant: TenantId, ids: &[ChunkId]) -> Result<HashSet<ChunkId>, IndexError> {
    client
        .query("SELECT id FROM chunks WHERE tenant_id = $1 AND id = ANY($2)", &[&tenant.0, &raw(ids)])
        .await?
        .iter()
        .map(|r| {
            let id: Vec<u8> = r.get(0);
            id.try_into().map(ChunkId).map_err(|_| IndexError::BadIndex)
        })
        .collect()
}

/// How many of `ids` (distinct) the tenant's chunk index holds: one number back instead of
/// a row per chunk, for the common case of a commit whose chunks are all there.
pub async fn count_indexed(client: &Client, tenant: TenantId, ids: &[ChunkId]) -> Result<usize, IndexError> {
    let row = client
        .query_one("SELECT count(*) FROM chunks WHERE tenant_id = $1 AND id = ANY($2)", &[&tenant.0, &raw(ids)])
        .await?;
    Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(usize::MAX))
}

/// Indexes a durable pack and its chunks in one transaction (both idempotent: a chunk
/// already indexed keeps its first location).
pub async fn index_pack(
    client: &mut Client,
    tenant: TenantId,
    pack: PackId,
    size: i64,
    entries: &[PackEntry],
    plain_lens: &[u32],
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO packs (tenant_id, id, size_bytes, blob_count) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        &[&tenant.0, &&pack.0[..], &size, &(entries.len() as i32)],
    )
    .await?;
    let ids: Vec<&[u8]> = entries.iter().map(|e| &e.id.0[..]).collect();
    let offsets: Vec<i64> = entries.iter().map(|e| e.offset as i64).collect();
    let lengths: Vec<i32> = entries.iter().map(|e| e.length as i32).collect();
    let plains: Vec<i32> = plain_lens.iter().map(|l| *l as i32).collect();
    tx.execute(
        "INSERT INTO chunks (tenant_id, id, pack_id, offset_bytes, length_bytes, plain_bytes) \
         SELECT $1, u.id, $2, u.off, u.len, u.plain FROM unnest($3::bytea[], $4::bigint[], $5::int[], $6::int[]) \
         AS u(id, off, len, plain) ON CONFLICT DO NOTHING",
        &[&tenant.0, &&pack.0[..], &ids, &offsets, &lengths, &plains],
    )
    .await?;
    tx.commit().await
}
