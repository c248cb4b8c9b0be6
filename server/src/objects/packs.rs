//! Reading blobs back out of pack objects: each run of neighbouring blobs in one pack is
//! fetched with one ranged read. Where a chunk lies comes from the chunk index
//! (`store::chunks::locate`); what the bytes mean is the restore read path's business.

use lifeboat_shared::ids::{ChunkId, PackId, TenantId};

use crate::store::chunks::Location;

/// Blobs closer than this in one pack are fetched with one read.
const COALESCE_GAP_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading pack {pack}: {cause}")]
    Storage { pack: PackId, cause: String },
    #[error("pack {pack} is shorter than its index says")]
    Short { pack: PackId },
}

/// Splits locations sorted by pack and offset into groups that one ranged read serves.
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
) -> Result<Vec<(ChunkId, Vec<u8>)>, ReadError> {
    let Some(first) = group.first() else { return Ok(Vec::new()) };
    let start = first.offset;
    let end = group.iter().map(|l| l.offset + u64::from(l.length)).max().unwrap_or(start);
    let bytes = op
        .read_with(&super::pack_path(&tenant, &first.pack))
        .range(start..end)
        .await
        .map_err(|e| ReadError::Storage { pack: first.pack, cause: e.to_string() })?
        .to_vec();
    group
        .iter()
        .map(|l| {
            let at = (l.offset - start) as usize;
            let blob = bytes.get(at..at + l.length as usize).ok_or(ReadError::Short { pack: l.pack })?;
            Ok((l.id, blob.to_vec()))
        })
        .collect()
}
