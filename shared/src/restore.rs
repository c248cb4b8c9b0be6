//! The one read path of a snapshot, shared by everything that reads one back — the
//! agent's restore, the server's restore tests and the help-desk API — so a passing
//! restore test proves the code a real restore runs.
//!
//! 1. [`plan`] splits the manifest's files into batches whose plaintext fits a memory
//!    budget, each with the distinct chunks it needs, in first-use order.
//! 2. The caller fetches each batch's blobs (the agent over QUIC, the server from packs).
//! 3. [`open`] decrypts, decompresses and re-hashes every blob against its id (callers run
//!    it on a blocking thread: a batch is tens of milliseconds of work), keeping apart
//!    what failed and what was never asked for.
//! 4. [`parts`] gives a file's bytes in order, checked against the manifest's chunk
//!    lengths and file size; the caller writes them (the agent) or joins them (the server).
//!
//! No I/O: callers fetch and write.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use crate::chunk::{BlobError, DataKey, IdKey, open_and_verify};
use crate::ids::ChunkId;
use crate::manifest::FileEntry;

/// Plaintext a batch holds in memory at most (unless one file alone is larger).
pub const BATCH_BYTES: u64 = 64 * 1024 * 1024;

/// Files of one batch and the distinct chunks they need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub files: Range<usize>,
    pub chunks: Vec<ChunkId>,
}

/// Batches of consecutive files: each has at least one file, at most `max_bytes` of
/// plaintext unless its one file is larger, and at most `max_files` files.
pub fn plan(files: &[FileEntry], max_bytes: u64, max_files: usize) -> Vec<Batch> {
    let mut batches = Vec::new();
    let mut start = 0;
    while start < files.len() {
        let mut end = start;
        let mut bytes = 0u64;
        while end < files.len()
            && (end == start || (bytes + files[end].size <= max_bytes && end - start < max_files.max(1)))
        {
            bytes += files[end].size;
            end += 1;
        }
        let mut seen = HashSet::new();
        let chunks = files[start..end]
            .iter()
            .flat_map(|f| f.chunks.iter().map(|c| c.id))
            .filter(|id| seen.insert(*id))
            .collect();
        batches.push(Batch { files: start..end, chunks });
        start = end;
    }
    batches
}

/// What opening a batch's blobs gave.
#[derive(Debug, Default)]
pub struct Opened {
    /// Verified plaintext by chunk id.
    pub plain: HashMap<ChunkId, Vec<u8>>,
    /// Blobs that did not open, or whose content is not their id's.
    pub failed: Vec<(ChunkId, BlobError)>,
    /// Blobs the batch did not ask for (a confused or hostile sender); not opened.
    pub unasked: Vec<ChunkId>,
}

/// Opens and verifies `blobs` for `batch`.
pub fn open(data: &DataKey, ids: &IdKey, batch: &Batch, blobs: impl IntoIterator<Item = (ChunkId, Vec<u8>)>) -> Opened {
    let wanted: HashSet<&ChunkId> = batch.chunks.iter().collect();
    let mut out = Opened::default();
    for (id, blob) in blobs {
        if !wanted.contains(&id) {
            out.unasked.push(id);
            continue;
        }
        match open_and_verify(data, ids, &id, &blob) {
            Ok(p) => {
                out.plain.insert(id, p);
            }
            Err(e) => out.failed.push((id, e)),
        }
    }
    out
}

/// Why a file cannot be rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RebuildError {
    #[error("chunk {0} is missing")]
    Missing(ChunkId),
    #[error("chunk {id} is {got} bytes, the manifest says {expected}")]
    ChunkLength { id: ChunkId, got: usize, expected: u32 },
    #[error("rebuilt to {got} bytes, the manifest says {expected}")]
    Size { got: u64, expected: u64 },
}

/// The file's bytes, chunk by chunk, if every chunk is there with the length the manifest
/// gives and they add up to the file's size.
pub fn parts<'a>(f: &FileEntry, plain: &'a HashMap<ChunkId, Vec<u8>>) -> Result<Vec<&'a [u8]>, RebuildError> {
    let mut out = Vec::with_capacity(f.chunks.len());
    let mut total = 0u64;
    for c in &f.chunks {
        let chunk = plain.get(&c.id).ok_or(RebuildError::Missing(c.id))?;
        if chunk.len() != c.length as usize {
            return Err(RebuildError::ChunkLength { id: c.id, got: chunk.len(), expected: c.length });
        }
        total += chunk.len() as u64;
        out.push(chunk.as_slice());
    }
    if total != f.size {
        return Err(RebuildError::Size { got: total, expected: f.size });
    }
    Ok(out)
}

/// The file's bytes joined (for the few files a caller keeps in memory).
pub fn rebuild(f: &FileEntry, plain: &HashMap<ChunkId, Vec<u8>>) -> Result<Vec<u8>, RebuildError> {
    Ok(parts(f, plain)?.concat())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::seal_chunk;
    use crate::manifest::ChunkRef;

    fn file(path: &str, chunks: &[(&ChunkId, u32)]) -> FileEntry {
        FileEntry {
            path: path.into(),
            size: chunks.iter().map(|c| u64::from(c.1)).sum(),
            mode: 0o644,
            mtime_unix_seconds: 0,
            chunks: chunks.iter().map(|(id, length)| ChunkRef { id: **id, length: *length }).collect(),
            ios_key: None,
        }
    }

    #[test]
    fn batches_respect_the_budget_and_name_each_chunk_once() {
        let (a, b, c) = (ChunkId([1; 32]), ChunkId([2; 32]), ChunkId([3; 32]));
        let files = vec![
            file("f0", &[(&a, 40), (&b, 40)]),
            file("f1", &[(&a, 40)]),
            file("f2", &[(&c, 200)]), // larger than the budget alone: a batch of its own
            file("f3", &[(&b, 40)]),
            file("f4", &[(&c, 10)]),
        ];
        let batches = plan(&files, 120, 10);
        assert_eq!(
            batches,
            vec![
                Batch { files: 0..2, chunks: vec![a, b] },
                Batch { files: 2..3, chunks: vec![c] },
                Batch { files: 3..5, chunks: vec![b, c] },
            ]
        );
        assert_eq!(plan(&files, u64::MAX, 2).iter().map(|b| b.files.clone()).collect::<Vec<_>>(), [0..2, 2..4, 4..5]);
        assert!(plan(&[], 1, 1).is_empty());
    }

    #[test]
    fn opening_keeps_verified_chunks_and_names_the_rest() {
        let (ids, data) = (IdKey::from_bytes([7; 32]), DataKey::from_bytes(&[8; 32]));
        let (good, bad, extra) = (b"good".to_vec(), b"bad".to_vec(), b"extra".to_vec());
        let (g, b, x) = (ids.chunk_id(&good), ids.chunk_id(&bad), ids.chunk_id(&extra));
        let batch = Batch { files: 0..1, chunks: vec![g, b] };
        let blobs = vec![
            (g, seal_chunk(&data, &g, &good, [1; 12])),
            // Content under another id: refused (dedup poisoning).
            (b, seal_chunk(&data, &b, &good, [2; 12])),
            (x, seal_chunk(&data, &x, &extra, [3; 12])),
        ];
        let opened = open(&data, &ids, &batch, blobs);
        assert_eq!(opened.plain.get(&g), Some(&good));
        assert_eq!(opened.failed.iter().map(|f| f.0).collect::<Vec<_>>(), vec![b]);
        assert_eq!(opened.unasked, vec![x]);
        let _ = bad;
    }

    #[test]
    fn a_file_rebuilds_only_when_every_chunk_has_its_length_and_the_size_adds_up() {
        let (a, b) = (ChunkId([1; 32]), ChunkId([2; 32]));
        let plain: HashMap<ChunkId, Vec<u8>> = [(a, b"abc".to_vec()), (b, b"de".to_vec())].into();
        let f = file("f", &[(&a, 3), (&b, 2), (&a, 3)]);
        assert_eq!(rebuild(&f, &plain).unwrap(), b"abcdeabc");
        assert_eq!(parts(&f, &plain).unwrap(), vec![&b"abc"[..], b"de", b"abc"]);
        let missing = file("f", &[(&ChunkId([9; 32]), 1)]);
        assert_eq!(parts(&missing, &plain), Err(RebuildError::Missing(ChunkId([9; 32]))));
        let wrong_length = file("f", &[(&a, 4)]);
        assert_eq!(parts(&wrong_length, &plain), Err(RebuildError::ChunkLength { id: a, got: 3, expected: 4 }));
        let mut wrong_size = file("f", &[(&a, 3)]);
        wrong_size.size = 5;
        assert_eq!(parts(&wrong_size, &plain), Err(RebuildError::Size { got: 3, expected: 5 }));
    }
}
