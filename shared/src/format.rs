//! Magic numbers, format versions and size limits of everything Lifeboat writes to storage
//! or sends on the wire. One place, mirrored in `docs/format.md` and `docs/protocol.md`;
//! readers refuse versions they do not know.

/// A chunk blob (one encrypted chunk, inside a pack): first byte is [`BLOB_VERSION`].
pub const BLOB_VERSION: u8 = 1;

/// Pack objects start with this magic and end with it, after the index length.
pub const PACK_MAGIC: [u8; 4] = *b"LBPK";
/// Version byte following the leading pack magic.
pub const PACK_VERSION: u8 = 1;

/// Snapshot manifest objects start with this magic, then [`MANIFEST_VERSION`].
pub const MANIFEST_MAGIC: [u8; 4] = *b"LBMF";
/// Version 2 adds each file's iOS key record; version 1 is still read.
pub const MANIFEST_VERSION: u8 = 2;

/// Content-defined chunking bounds (FastCDC 2020, normalisation level 1).
pub const CHUNK_MIN_BYTES: u32 = 64 * 1024;
pub const CHUNK_AVG_BYTES: u32 = 512 * 1024;
pub const CHUNK_MAX_BYTES: u32 = 4 * 1024 * 1024;

/// AES-256-GCM nonce and tag sizes.
pub const NONCE_BYTES: usize = 12;
pub const TAG_BYTES: usize = 16;

/// Largest blob a reader accepts: a maximal chunk stored raw plus its framing (version
/// byte, compression byte, nonce, tag).
pub const MAX_BLOB_BYTES: usize = CHUNK_MAX_BYTES as usize + 2 + NONCE_BYTES + TAG_BYTES;
/// Largest pack index a reader accepts (about 400,000 entries).
pub const MAX_PACK_INDEX_BYTES: usize = 32 * 1024 * 1024;
/// Largest decoded snapshot manifest a reader accepts.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024 * 1024;
