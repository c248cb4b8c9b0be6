//! Packs: many blobs in one storage object (object stores charge per request), with a
//! self-describing trailer so a pack can be re-indexed without the database.
//!
//! Layout (`docs/format.md`):
//! ```text
//! "LBPK" | version u8 | blob* | entry* | entry_count u32le | "LBPK"
//! entry = chunk_id [32] | offset u64le | length u32le      (44 bytes)
//! ```
//! Offsets are from the start of the pack. A pack's id is the BLAKE3 of all its bytes.

use crate::format::{MAX_BLOB_BYTES, MAX_PACK_INDEX_BYTES, PACK_MAGIC, PACK_VERSION};
use crate::ids::{ChunkId, PackId};

const HEADER_BYTES: usize = 5;
const FOOTER_BYTES: usize = 8;
const ENTRY_BYTES: usize = 44;

/// Where one blob sits inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    pub offset: u64,
    pub length: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    #[error("pack is {0} bytes, too short to be a pack")]
    Truncated(usize),
    #[error("pack does not start and end with the LBPK magic")]
    BadMagic,
    #[error("pack format version {0} is not supported (this build reads version {PACK_VERSION})")]
    UnknownVersion(u8),
    #[error("pack index of {0} entries does not fit the pack")]
    BadIndex(u64),
    #[error("pack entry {index} ({id}) points outside the blob area")]
    BadEntry { index: usize, id: ChunkId },
}

/// Accumulates blobs into one pack.
#[derive(Debug)]
pub struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl Default for PackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PackBuilder {
    pub fn new() -> Self {
        Self::with_capacity(1 << 20)
    }

    /// A builder whose buffer holds `bytes` without growing: writers that fill packs to a
    /// target size avoid re-allocating (and copying) them on the way.
    pub fn with_capacity(bytes: usize) -> Self {
        Self::with_buffer(Vec::with_capacity(bytes))
    }

    /// A builder writing into `buf` (its contents are dropped, its capacity kept): a
    /// writer of many packs reuses the buffers of packs it has written.
    pub fn with_buffer(mut buf: Vec<u8>) -> Self {
        buf.clear();
        buf.extend_from_slice(&PACK_MAGIC);
        buf.push(PACK_VERSION);
        Self { buf, entries: Vec::new() }
    }

    /// Appends one blob (at most [`MAX_BLOB_BYTES`]).
    pub fn push(&mut self, id: ChunkId, blob: &[u8]) {
        debug_assert!(blob.len() <= MAX_BLOB_BYTES);
        self.entries.push(PackEntry { id, offset: self.buf.len() as u64, length: blob.len() as u32 });
        self.buf.extend_from_slice(blob);
    }

    /// Bytes so far (blobs and header), to decide when a pack is full.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[PackEntry] {
        &self.entries
    }

    /// The finished pack: its id, bytes and index.
    pub fn finish(mut self) -> (PackId, Vec<u8>, Vec<PackEntry>) {
        for e in &self.entries {
            self.buf.extend_from_slice(e.id.as_bytes());
            self.buf.extend_from_slice(&e.offset.to_le_bytes());
            self.buf.extend_from_slice(&e.length.to_le_bytes());
        }
        self.buf.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&PACK_MAGIC);
        let id = PackId(*blake3::hash(&self.buf).as_bytes());
        (id, self.buf, self.entries)
    }
}

/// Reads a whole pack's index from its trailer, checking every entry lies in the blob area.
pub fn read_index(pack: &[u8]) -> Result<Vec<PackEntry>, PackError> {
    if pack.len() < HEADER_BYTES + FOOTER_BYTES {
        return Err(PackError::Truncated(pack.len()));
    }
    if pack[..4] != PACK_MAGIC || pack[pack.len() - 4..] != PACK_MAGIC {
        return Err(PackError::BadMagic);
    }
    if pack[4] != PACK_VERSION {
        return Err(PackError::UnknownVersion(pack[4]));
    }
    let count_at = pack.len() - FOOTER_BYTES;
    let count =
        u64::from(u32::from_le_bytes([pack[count_at], pack[count_at + 1], pack[count_at + 2], pack[count_at + 3]]));
    let index_bytes = count * ENTRY_BYTES as u64;
    if index_bytes > MAX_PACK_INDEX_BYTES as u64 || index_bytes > (count_at - HEADER_BYTES) as u64 {
        return Err(PackError::BadIndex(count));
    }
    let index_at = count_at - index_bytes as usize;
    let mut entries = Vec::with_capacity(count as usize);
    for (index, raw) in pack[index_at..count_at].chunks_exact(ENTRY_BYTES).enumerate() {
        let mut id = [0u8; 32];
        id.copy_from_slice(&raw[..32]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&raw[32..40]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&raw[40..44]);
        let e = PackEntry { id: ChunkId(id), offset: u64::from_le_bytes(off), length: u32::from_le_bytes(len) };
        let end = e.offset.checked_add(u64::from(e.length));
        if e.offset < HEADER_BYTES as u64 || end.is_none_or(|end| end > index_at as u64) {
            return Err(PackError::BadEntry { index, id: e.id });
        }
        entries.push(e);
    }
    Ok(entries)
}

/// The bytes of one entry's blob.
pub fn blob<'a>(pack: &'a [u8], e: &PackEntry) -> Option<&'a [u8]> {
    let start = usize::try_from(e.offset).ok()?;
    pack.get(start..start.checked_add(e.length as usize)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pack_reindexes_from_its_own_bytes() {
        let mut b = PackBuilder::new();
        b.push(ChunkId([1; 32]), b"first blob");
        b.push(ChunkId([2; 32]), b"second");
        let (id, bytes, entries) = b.finish();
        assert_eq!(id, PackId(*blake3::hash(&bytes).as_bytes()));
        assert_eq!(read_index(&bytes).unwrap(), entries);
        assert_eq!(blob(&bytes, &entries[0]), Some(&b"first blob"[..]));
        assert_eq!(blob(&bytes, &entries[1]), Some(&b"second"[..]));
        let empty = PackBuilder::new().finish().1;
        assert_eq!(read_index(&empty).unwrap(), vec![]);
        // A reused buffer gives the same pack as a fresh one.
        let mut again = PackBuilder::with_buffer(bytes);
        again.push(ChunkId([1; 32]), b"first blob");
        again.push(ChunkId([2; 32]), b"second");
        assert_eq!(again.finish().0, id);
    }

    #[test]
    fn damaged_packs_are_refused_with_a_reason() {
        let mut b = PackBuilder::new();
        b.push(ChunkId([1; 32]), b"blob");
        let (_, bytes, _) = b.finish();
        assert_eq!(read_index(&bytes[..6]), Err(PackError::Truncated(6)));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(read_index(&bad), Err(PackError::BadMagic));
        let mut bad = bytes.clone();
        bad[4] = 9;
        assert_eq!(read_index(&bad), Err(PackError::UnknownVersion(9)));
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 8..n - 4].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(read_index(&bad), Err(PackError::BadIndex(1000)));
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 8 - 4..n - 8].copy_from_slice(&u32::MAX.to_le_bytes()); // length of entry 0
        assert_eq!(read_index(&bad), Err(PackError::BadEntry { index: 0, id: ChunkId([1; 32]) }));
    }
}
