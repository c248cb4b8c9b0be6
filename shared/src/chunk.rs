//! Chunks: content-defined chunking, keyed chunk ids, and the encrypted blob format.
//!
//! A chunk's id is the keyed BLAKE3 of its plaintext under the tenant's id key, so ids
//! reveal nothing to storage or to other tenants, and dedup stays within a tenant.
//! A blob is the chunk compressed with zstd when that helps, then sealed with AES-256-GCM
//! under the tenant's data key, with the chunk id (and the compression byte) as associated
//! data: a blob moved to another id, or with its compression flag flipped, fails to open.
//!
//! Blob layout (`docs/format.md`): `version u8 | compression u8 | nonce [12] | ciphertext | tag [16]`.
//! Nonces are random (96 bits), supplied by the caller: this crate has no randomness.

use std::fmt;

use ring::aead;

use crate::format::{BLOB_VERSION, CHUNK_AVG_BYTES, CHUNK_MAX_BYTES, CHUNK_MIN_BYTES, MAX_BLOB_BYTES, NONCE_BYTES};
use crate::ids::ChunkId;

/// The tenant's key for chunk ids (BLAKE3 key mode), and the chunker's gear seed.
#[derive(Clone)]
pub struct IdKey([u8; 32]);

/// The tenant's key for sealing blobs and manifests (AES-256-GCM).
pub struct DataKey {
    key: aead::LessSafeKey,
}

impl IdKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// The id of a chunk with this plaintext.
    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.0, plaintext).as_bytes())
    }

    /// Seed for the chunker's gear table, so that chunk boundaries — and so chunk sizes,
    /// which storage can see — depend on a tenant secret, not on content alone.
    pub fn chunker_seed(&self) -> u64 {
        let h = blake3::keyed_hash(&self.0, b"lifeboat chunker gear seed v1");
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&h.as_bytes()[..8]);
        u64::from_le_bytes(seed)
    }
}

impl DataKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        // Invariant: AES-256-GCM takes exactly 32 key bytes, which the type guarantees.
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, bytes).expect("32-byte AES-256 key");
        Self { key: aead::LessSafeKey::new(unbound) }
    }

    /// Appends `ciphertext || tag` of `plaintext` to `out`, with `aad` authenticated; the
    /// plaintext is copied once, into `out`, and encrypted there.
    pub fn seal_into(&self, nonce: [u8; NONCE_BYTES], aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.reserve(plaintext.len() + crate::format::TAG_BYTES);
        out.extend_from_slice(plaintext);
        self.seal_tail(nonce, aad, out, start);
    }

    /// Encrypts `out[start..]` where it lies and appends the tag: for a plaintext that was
    /// written into `out` to begin with (a manifest streamed through zstd).
    pub fn seal_tail(&self, nonce: [u8; NONCE_BYTES], aad: &[u8], out: &mut Vec<u8>, start: usize) {
        // Invariant: ring fails sealing only for inputs over ~64 GiB; callers pass a chunk or
        // a compressed manifest (a 1 GiB encoding, the most a reader accepts, compresses
        // to far less).
        let tag = self
            .key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                &mut out[start..],
            )
            .expect("AES-GCM input within size limits");
        out.extend_from_slice(tag.as_ref());
    }

    /// Opens a sealed `ciphertext || tag`; `None` if it was not sealed under this key and `aad`.
    pub fn open(&self, nonce: [u8; NONCE_BYTES], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        self.open_into(nonce, aad, sealed, &mut buf)?;
        Some(buf)
    }

    /// Like [`DataKey::open`], into `out` (cleared first): a caller that opens many blobs
    /// reuses one buffer instead of allocating (and page-faulting) one per blob.
    pub fn open_into(&self, nonce: [u8; NONCE_BYTES], aad: &[u8], sealed: &[u8], out: &mut Vec<u8>) -> Option<()> {
        out.clear();
        out.extend_from_slice(sealed);
        let n =
            self.key.open_in_place(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::from(aad), out).ok()?.len();
        out.truncate(n);
        Some(())
    }
}

impl fmt::Debug for IdKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdKey(***)")
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(***)")
    }
}

/// Content-defined chunk boundaries of `data` (FastCDC 2020), with the tenant's gear seed.
/// Data shorter than the minimum chunk size is one chunk; empty data has no chunks.
pub fn boundaries(data: &[u8], seed: u64) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    fastcdc::v2020::FastCDC::with_level_and_seed(
        data,
        CHUNK_MIN_BYTES as usize,
        CHUNK_AVG_BYTES as usize,
        CHUNK_MAX_BYTES as usize,
        fastcdc::v2020::Normalization::Level1,
        seed,
    )
    .map(|c| c.offset..c.offset + c.length)
}

/// Content-defined chunks of everything `reader` yields (a file being backed up), read
/// in buffers of up to `block` bytes (plus the unfinished chunk carried over from the
/// buffer before). `emit` gets each buffer with the ranges of the chunks it completes, so
/// a caller can keep chunks as slices of the buffer instead of copying them. The cut
/// points are those of [`boundaries`] over the whole data: only the last chunk of a buffer
/// that the buffer's end cut short is carried over. A reader shorter than `block` is read
/// into one buffer of that size (give a file's size plus one); after the first buffer,
/// `block` is at least [`CHUNK_MAX_BYTES`]. Returns the bytes read.
pub fn read_chunks<R: std::io::Read>(
    mut reader: R,
    seed: u64,
    mut block: usize,
    mut emit: impl FnMut(&bytes::Bytes, &[std::ops::Range<usize>]) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let (mut carry, mut total) = (bytes::Bytes::new(), 0u64);
    let mut ranges = Vec::new();
    loop {
        let mut buf = Vec::with_capacity(carry.len() + block);
        buf.extend_from_slice(&carry);
        let read = std::io::Read::read_to_end(&mut std::io::Read::take(&mut reader, block as u64), &mut buf)?;
        total += read as u64;
        // `take` stops at `block` bytes or at the end: fewer means the end.
        let end = read < block;
        let data = bytes::Bytes::from(buf);
        ranges.clear();
        ranges.extend(boundaries(&data, seed));
        // FastCDC cuts by content strictly inside the data it sees, and a cut depends only
        // on the bytes from the chunk's start: a chunk ending before the buffer does is
        // final. One ending with the buffer may only have run out of data.
        let rest = match ranges.last() {
            Some(last) if !end && last.end == data.len() => ranges.pop().map_or(data.len(), |r| r.start),
            _ => data.len(),
        };
        if !ranges.is_empty() {
            emit(&data, &ranges)?;
        }
        if end {
            return Ok(total);
        }
        carry = data.slice(rest..);
        block = block.max(CHUNK_MAX_BYTES as usize);
    }
}

/// How a blob's plaintext was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

/// zstd level for chunks: fast, and most phone data (photos, videos) does not compress anyway.
pub const ZSTD_LEVEL: i32 = 1;
/// A chunk is stored compressed only if that saves at least 1/32 of it.
const WORTH_IT_DIVISOR: usize = 32;
/// Chunks larger than this are first tested on a sample, so incompressible media costs
/// one small compression attempt instead of a full one.
const SAMPLE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("blob too short ({0} bytes)")]
    Truncated(usize),
    #[error("blob is {0} bytes, over the {MAX_BLOB_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("blob format version {0} is not supported (this build reads version {BLOB_VERSION})")]
    UnknownVersion(u8),
    #[error("blob compression {0} is not known")]
    UnknownCompression(u8),
    #[error("blob does not open with this tenant's key for chunk {0}: wrong key, wrong id, or damaged")]
    Unauthentic(ChunkId),
    #[error("blob for chunk {0} does not decompress: {1}")]
    Decompress(ChunkId, String),
    #[error("blob for chunk {id} holds data whose id is {actual}")]
    WrongContent { id: ChunkId, actual: ChunkId },
}

thread_local! {
    /// One zstd compression context per thread, reused: creating one per chunk zeroes
    /// its tables each time, which cost more than compressing a small chunk.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    /// One decompression context and one chunk-sized output buffer per thread, reused:
    /// a fresh 4 MiB buffer per chunk means fresh pages to fault in and zero.
    static DECOMPRESSOR: std::cell::RefCell<Option<(zstd::bulk::Decompressor<'static>, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
}

fn zstd_compress(data: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        slot.as_mut()?.compress(data).ok()
    })
}

/// Replaces `data` (a zstd frame) by what it decompresses to, at most a chunk.
fn zstd_decompress_in_place(data: &mut Vec<u8>) -> Result<(), String> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let d = zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?;
            *slot = Some((d, Vec::with_capacity(CHUNK_MAX_BYTES as usize)));
        }
        let Some((d, buf)) = slot.as_mut() else { return Err("no zstd context".to_string()) };
        buf.clear();
        // zstd writes into spare capacity only. Buffers are swapped, not copied: both
        // soon have a chunk's capacity and nothing is allocated any more.
        buf.reserve(CHUNK_MAX_BYTES as usize);
        d.decompress_to_buffer(data.as_slice(), buf).map_err(|e| e.to_string())?;
        std::mem::swap(data, buf);
        Ok(())
    })
}

/// Compresses when it pays: `(Compression, bytes to seal)`.
pub fn compress(plaintext: &[u8]) -> (Compression, Option<Vec<u8>>) {
    let worth_it = |raw: usize, packed: usize| packed + raw / WORTH_IT_DIVISOR < raw;
    if plaintext.len() > 2 * SAMPLE_BYTES {
        let mid = plaintext.len() / 2 - SAMPLE_BYTES / 2;
        let sample = &plaintext[mid..mid + SAMPLE_BYTES];
        match zstd_compress(sample) {
            Some(c) if worth_it(sample.len(), c.len()) => {}
            _ => return (Compression::None, None),
        }
    }
    match zstd_compress(plaintext) {
        Some(c) if worth_it(plaintext.len(), c.len()) => (Compression::Zstd, Some(c)),
        _ => (Compression::None, None),
    }
}

fn blob_aad(id: &ChunkId, compression: u8) -> [u8; 34] {
    let mut aad = [0u8; 34];
    aad[0] = BLOB_VERSION;
    aad[1] = compression;
    aad[2..].copy_from_slice(id.as_bytes());
    aad
}

/// Compresses (when it helps) and seals one chunk into a blob.
pub fn seal_chunk(key: &DataKey, id: &ChunkId, plaintext: &[u8], nonce: [u8; NONCE_BYTES]) -> Vec<u8> {
    let (compression, packed) = compress(plaintext);
    let body = packed.as_deref().unwrap_or(plaintext);
    let mut out = Vec::with_capacity(2 + NONCE_BYTES + body.len() + crate::format::TAG_BYTES);
    out.push(BLOB_VERSION);
    out.push(compression as u8);
    out.extend_from_slice(&nonce);
    key.seal_into(nonce, &blob_aad(id, compression as u8), body, &mut out);
    out
}

/// Opens a blob and returns the chunk's plaintext. Does not check the id; see [`open_and_verify`].
pub fn open_chunk(key: &DataKey, id: &ChunkId, blob: &[u8]) -> Result<Vec<u8>, BlobError> {
    let mut out = Vec::new();
    open_chunk_into(key, id, blob, &mut out)?;
    Ok(out)
}

/// Like [`open_chunk`], into `out` (cleared first; reused across blobs by callers that
/// open many — a chunk stored raw needs no other buffer, a compressed one is decompressed
/// into a new one).
pub fn open_chunk_into(key: &DataKey, id: &ChunkId, blob: &[u8], out: &mut Vec<u8>) -> Result<(), BlobError> {
    if blob.len() > MAX_BLOB_BYTES {
        return Err(BlobError::TooLarge(blob.len()));
    }
    if blob.len() < 2 + NONCE_BYTES + crate::format::TAG_BYTES {
        return Err(BlobError::Truncated(blob.len()));
    }
    if blob[0] != BLOB_VERSION {
        return Err(BlobError::UnknownVersion(blob[0]));
    }
    let compression = match blob[1] {
        0 => Compression::None,
        1 => Compression::Zstd,
        other => return Err(BlobError::UnknownCompression(other)),
    };
    let mut nonce = [0u8; NONCE_BYTES];
    nonce.copy_from_slice(&blob[2..2 + NONCE_BYTES]);
    key.open_into(nonce, &blob_aad(id, blob[1]), &blob[2 + NONCE_BYTES..], out).ok_or(BlobError::Unauthentic(*id))?;
    if compression == Compression::Zstd {
        zstd_decompress_in_place(out).map_err(|e| BlobError::Decompress(*id, e))?;
    }
    Ok(())
}

/// Opens a blob and checks that its plaintext really has id `id`: what the server does
/// with every new chunk before indexing it, and every restore with every chunk.
pub fn open_and_verify(data: &DataKey, ids: &IdKey, id: &ChunkId, blob: &[u8]) -> Result<Vec<u8>, BlobError> {
    let mut plain = Vec::new();
    open_and_verify_into(data, ids, id, blob, &mut plain)?;
    Ok(plain)
}

/// Like [`open_and_verify`], into `out` (cleared first; reused across blobs).
pub fn open_and_verify_into(
    data: &DataKey,
    ids: &IdKey,
    id: &ChunkId,
    blob: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), BlobError> {
    open_chunk_into(data, id, blob, out)?;
    let actual = ids.chunk_id(out);
    if actual != *id {
        return Err(BlobError::WrongContent { id: *id, actual });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (DataKey, IdKey) {
        (DataKey::from_bytes(&[7; 32]), IdKey::from_bytes([9; 32]))
    }

    /// Deterministic incompressible bytes (xorshift).
    fn noise(len: usize, mut s: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    }

    #[test]
    fn a_maximal_incompressible_chunk_is_within_the_blob_limit() {
        let (dk, ik) = keys();
        let data = noise(CHUNK_MAX_BYTES as usize, 3);
        let id = ik.chunk_id(&data);
        let blob = seal_chunk(&dk, &id, &data, [5; NONCE_BYTES]);
        assert_eq!(blob.len(), MAX_BLOB_BYTES, "stored raw: the largest blob there is");
        assert_eq!(open_and_verify(&dk, &ik, &id, &blob).unwrap(), data);
    }

    #[test]
    fn a_sealed_chunk_opens_to_the_same_bytes_and_only_under_its_id() {
        let (dk, ik) = keys();
        for data in [b"small".to_vec(), vec![b'a'; 300_000], noise(1_000_000, 1)] {
            let id = ik.chunk_id(&data);
            let blob = seal_chunk(&dk, &id, &data, [1; 12]);
            assert_eq!(open_and_verify(&dk, &ik, &id, &blob).unwrap(), data);
            let other = ik.chunk_id(b"other");
            assert_eq!(open_chunk(&dk, &other, &blob), Err(BlobError::Unauthentic(other)));
        }
    }

    #[test]
    fn compressible_chunks_shrink_and_media_is_stored_raw() {
        let (dk, ik) = keys();
        let text = vec![b'x'; 500_000];
        let blob = seal_chunk(&dk, &ik.chunk_id(&text), &text, [0; 12]);
        assert_eq!(blob[1], Compression::Zstd as u8);
        assert!(blob.len() < 10_000);
        let photo = noise(500_000, 3);
        let blob = seal_chunk(&dk, &ik.chunk_id(&photo), &photo, [0; 12]);
        assert_eq!(blob[1], Compression::None as u8);
        assert_eq!(blob.len(), photo.len() + 2 + 12 + 16);
    }

    #[test]
    fn tampering_is_detected() {
        let (dk, ik) = keys();
        let data = noise(1000, 5);
        let id = ik.chunk_id(&data);
        let blob = seal_chunk(&dk, &id, &data, [2; 12]);
        for i in [0, 1, 5, 20, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[i] ^= 1;
            assert!(open_chunk(&dk, &id, &bad).is_err(), "flipping byte {i} went unnoticed");
        }
        assert_eq!(open_chunk(&dk, &id, &blob[..10]), Err(BlobError::Truncated(10)));
        let wrong_key = DataKey::from_bytes(&[8; 32]);
        assert_eq!(open_chunk(&wrong_key, &id, &blob), Err(BlobError::Unauthentic(id)));
    }

    #[test]
    fn content_under_a_false_id_is_caught_by_verification() {
        // A hostile agent seals real data under someone else's chunk id.
        let (dk, ik) = keys();
        let claimed = ik.chunk_id(b"the real chunk");
        let blob = seal_chunk(&dk, &claimed, b"poison", [3; 12]);
        let err = open_and_verify(&dk, &ik, &claimed, &blob).unwrap_err();
        assert_eq!(err, BlobError::WrongContent { id: claimed, actual: ik.chunk_id(b"poison") });
    }

    #[test]
    fn ids_depend_on_the_tenant_key() {
        let a = IdKey::from_bytes([1; 32]);
        let b = IdKey::from_bytes([2; 32]);
        assert_ne!(a.chunk_id(b"same"), b.chunk_id(b"same"));
        assert_ne!(a.chunker_seed(), b.chunker_seed());
        assert_eq!(format!("{a:?}"), "IdKey(***)");
    }

    #[test]
    fn chunking_is_bounded_and_stable_under_an_insertion() {
        let data = noise(8 << 20, 11);
        let seed = IdKey::from_bytes([4; 32]).chunker_seed();
        let chunks: Vec<_> = boundaries(&data, seed).collect();
        assert_eq!(chunks.first().map(|r| r.start), Some(0));
        assert_eq!(chunks.last().map(|r| r.end), Some(data.len()));
        for r in &chunks[..chunks.len() - 1] {
            assert!(r.len() >= CHUNK_MIN_BYTES as usize && r.len() <= CHUNK_MAX_BYTES as usize, "{r:?}");
        }
        // Insert 100 bytes near the start: later chunks are found again unchanged.
        let mut edited = data[..1000].to_vec();
        edited.extend_from_slice(&[0u8; 100]);
        edited.extend_from_slice(&data[1000..]);
        let before: std::collections::HashSet<&[u8]> = chunks.iter().map(|r| &data[r.clone()]).collect();
        let after: Vec<&[u8]> = boundaries(&edited, seed).map(|r| &edited[r]).collect();
        let shared = after.iter().filter(|c| before.contains(*c)).count();
        assert!(shared + 2 >= after.len(), "only {shared} of {} chunks survived an insertion", after.len());
    }

    #[test]
    fn reading_in_blocks_cuts_where_slicing_the_whole_does() {
        let seed = IdKey::from_bytes([4; 32]).chunker_seed();
        let data = noise(21 << 20, 12);
        let block = CHUNK_MAX_BYTES as usize;
        // Lengths around block multiples, where carried-over chunks meet the end.
        for len in [0, 1, 100_000, block - 1, block, block + 1, 2 * block, 3 * block + 12_345, data.len()] {
            let data = &data[..len];
            let sliced: Vec<&[u8]> = boundaries(data, seed).map(|r| &data[r]).collect();
            for block in [block, 2 * block + 7, 1, 1000, len + 1] {
                let mut read = Vec::new();
                let total = read_chunks(data, seed, block, |buf, ranges| {
                    read.extend(ranges.iter().map(|r| buf.slice(r.clone())));
                    Ok(())
                })
                .unwrap();
                assert_eq!(total, len as u64);
                assert_eq!(read.iter().map(|c| &c[..]).collect::<Vec<_>>(), sliced, "{len} bytes in blocks of {block}");
            }
        }
        // An error from `emit` ends the reading with that error.
        let err = read_chunks(&data[..], seed, block, |_, _| Err(std::io::Error::other("stop"))).unwrap_err();
        assert_eq!(err.to_string(), "stop");
    }

    #[test]
    fn small_data_is_one_chunk_and_empty_data_none() {
        assert_eq!(boundaries(b"tiny", 0).collect::<Vec<_>>(), vec![0..4]);
        assert_eq!(boundaries(b"", 0).count(), 0);
    }
}
