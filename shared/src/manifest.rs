//! The snapshot manifest: one encrypted, compressed object per snapshot listing every file
//! of the backup directory with its chunks, plus the device's metadata.
//!
//! Object layout (`docs/format.md`):
//! `"LBMF" | version u8 | nonce [12] | AES-256-GCM(zstd(postcard(Manifest)))`, with
//! `"LBMF" | version | snapshot id (16 bytes)` as associated data, so a manifest cannot be
//! passed off as another snapshot's. Version 2 (written) adds each file's [`IosKey`];
//! version 1 (read) has none.

use serde::{Deserialize, Serialize};

use crate::chunk::DataKey;
use crate::format::{MANIFEST_MAGIC, MANIFEST_VERSION, MAX_MANIFEST_BYTES, NONCE_BYTES, TAG_BYTES};
use crate::ids::{ChunkId, SnapshotId, Udid};
use crate::ios_crypto::KEY_RECORD_BYTES;

/// The device a snapshot was taken from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub udid: Udid,
    pub name: String,
    /// e.g. `iPhone15,2`
    pub product_type: String,
    pub ios_version: String,
}

/// One chunk of a file, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub length: u32,
}

/// One regular file of the backup directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the backup directory, `/`-separated (`Manifest.db`, `3d/3d0d7e5f…`).
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub mtime_unix_seconds: i64,
    /// The plaintext's chunks.
    pub chunks: Vec<ChunkRef>,
    /// A file of an iOS-encrypted backup: the phone's bytes are its chunks encrypted with
    /// this key (AES-256-CBC, IV 0, PKCS7), so they are rebuilt exactly for a restore.
    pub ios_key: Option<Box<IosKey>>,
}

/// How the phone encrypted one file of an encrypted backup (or, for Manifest.db, the
/// `ManifestKey` of Manifest.plist): its protection class and its key record, `u32 LE
/// class || the file key wrapped (RFC 3394) with that class's key`. It opens nothing
/// without the backup password.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IosKey {
    pub class: u32,
    #[serde(with = "serde_bytes")]
    pub record: [u8; KEY_RECORD_BYTES],
}

impl std::fmt::Debug for IosKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IosKey").field("class", &self.class).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub snapshot: SnapshotId,
    pub device: DeviceInfo,
    pub created_unix_ms: i64,
    /// Sorted by path, unique.
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("not a Lifeboat manifest (bad magic)")]
    BadMagic,
    #[error("manifest format version {0} is not supported (this build reads versions 1 to {MANIFEST_VERSION})")]
    UnknownVersion(u8),
    #[error("manifest does not open with this tenant's key for snapshot {0}: wrong key, wrong snapshot, or damaged")]
    Unauthentic(SnapshotId),
    #[error("manifest is damaged: {0}")]
    Corrupt(String),
    #[error("manifest is invalid: {0}")]
    Invalid(String),
}

impl Manifest {
    /// Checks what a reader relies on: sorted unique safe paths, chunk lengths adding up.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let mut prev: Option<&str> = None;
        for f in &self.files {
            if !is_safe_relative_path(&f.path) {
                return Err(ManifestError::Invalid(format!("unsafe path {:?}", f.path)));
            }
            if prev.is_some_and(|p| p >= f.path.as_str()) {
                return Err(ManifestError::Invalid(format!("paths not sorted and unique at {:?}", f.path)));
            }
            prev = Some(&f.path);
            let sum: u64 = f.chunks.iter().map(|c| u64::from(c.length)).sum();
            if sum != f.size {
                return Err(ManifestError::Invalid(format!("{}: chunks add up to {sum}, size is {}", f.path, f.size)));
            }
        }
        Ok(())
    }

    /// Whether the phone encrypted this backup (Manifest.db has its `ManifestKey`).
    pub fn ios_encrypted(&self) -> bool {
        self.files.iter().any(|f| f.path == "Manifest.db" && f.ios_key.is_some())
    }

    pub fn logical_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Encodes, compresses and seals. `nonce` must be random. The encoding streams through
    /// zstd into the object, which is then encrypted where it lies: only the compressed
    /// manifest is ever in memory, not its encoding (~20 MB before compression for a
    /// backup of 200,000 files). postcard writes a byte at a time (a chunk id is 32
    /// writes), so a buffer gathers them for zstd.
    pub fn seal(&self, key: &DataKey, nonce: [u8; NONCE_BYTES]) -> Result<Vec<u8>, ManifestError> {
        self.validate()?;
        let corrupt = |e: &dyn std::fmt::Display| ManifestError::Corrupt(e.to_string());
        let mut out = Vec::new();
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.push(MANIFEST_VERSION);
        out.extend_from_slice(&nonce);
        let start = out.len();
        let mut packer = zstd::stream::write::Encoder::new(out, 3).map_err(|e| corrupt(&e))?;
        {
            let mut buffered = std::io::BufWriter::with_capacity(64 * 1024, &mut packer);
            postcard::to_io(self, &mut buffered).map_err(|e| corrupt(&e))?;
            std::io::Write::flush(&mut buffered).map_err(|e| corrupt(&e))?;
        }
        let mut out = packer.finish().map_err(|e| corrupt(&e))?;
        out.reserve_exact(TAG_BYTES);
        key.seal_tail(nonce, &aad(MANIFEST_VERSION, &self.snapshot), &mut out, start);
        Ok(out)
    }

    /// Opens a sealed manifest of snapshot `snapshot` and validates it.
    pub fn open(key: &DataKey, snapshot: &SnapshotId, object: &[u8]) -> Result<Self, ManifestError> {
        if object.len() < 5 + NONCE_BYTES + TAG_BYTES || object[..4] != MANIFEST_MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = object[4];
        if !(1..=MANIFEST_VERSION).contains(&version) {
            return Err(ManifestError::UnknownVersion(version));
        }
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&object[5..5 + NONCE_BYTES]);
        let packed = key
            .open(nonce, &aad(version, snapshot), &object[5 + NONCE_BYTES..])
            .ok_or(ManifestError::Unauthentic(*snapshot))?;
        let plain = decompress_bounded(&packed, MAX_MANIFEST_BYTES)?;
        let corrupt = |e: postcard::Error| ManifestError::Corrupt(e.to_string());
        let m: Manifest = match version {
            1 => postcard::from_bytes::<v1::Manifest>(&plain).map_err(corrupt)?.into(),
            _ => postcard::from_bytes(&plain).map_err(corrupt)?,
        };
        if m.snapshot != *snapshot {
            return Err(ManifestError::Unauthentic(*snapshot));
        }
        m.validate()?;
        Ok(m)
    }
}

/// Decompresses a zstd stream of at most `max` bytes, growing the output with the data.
/// The writer streams its frame without recording the content size, so the size is not
/// known in advance; reserving `max` up front (what `zstd::bulk` does) would ask for a
/// gigabyte for every manifest opened.
fn decompress_bounded(packed: &[u8], max: usize) -> Result<Vec<u8>, ManifestError> {
    use std::io::Read as _;
    let corrupt = |e: std::io::Error| ManifestError::Corrupt(e.to_string());
    let decoder = zstd::stream::read::Decoder::with_buffer(packed).map_err(corrupt)?;
    let mut plain = Vec::new();
    decoder.take(max as u64 + 1).read_to_end(&mut plain).map_err(corrupt)?;
    if plain.len() > max {
        return Err(ManifestError::Corrupt(format!("decompresses to more than {max} bytes")));
    }
    Ok(plain)
}

fn aad(version: u8, snapshot: &SnapshotId) -> [u8; 21] {
    let mut a = [0u8; 21];
    a[..4].copy_from_slice(&MANIFEST_MAGIC);
    a[4] = version;
    a[5..].copy_from_slice(snapshot.0.as_bytes());
    a
}

/// Format version 1, read only: files without [`IosKey`].
mod v1 {
    use serde::Deserialize;

    use super::{ChunkRef, DeviceInfo, SnapshotId};

    #[derive(Deserialize)]
    pub(super) struct Manifest {
        snapshot: SnapshotId,
        device: DeviceInfo,
        created_unix_ms: i64,
        files: Vec<FileEntry>,
    }

    #[derive(Deserialize)]
    struct FileEntry {
        path: String,
        size: u64,
        mode: u32,
        mtime_unix_seconds: i64,
        chunks: Vec<ChunkRef>,
    }

    impl From<Manifest> for super::Manifest {
        fn from(m: Manifest) -> Self {
            let files = m
                .files
                .into_iter()
                .map(|f| super::FileEntry {
                    path: f.path,
                    size: f.size,
                    mode: f.mode,
                    mtime_unix_seconds: f.mtime_unix_seconds,
                    chunks: f.chunks,
                    ios_key: None,
                })
                .collect();
            Self { snapshot: m.snapshot, device: m.device, created_unix_ms: m.created_unix_ms, files }
        }
    }
}

/// A relative path that cannot escape the directory it is restored into.
pub fn is_safe_relative_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\0')
        && !p.contains('\\')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (server layout issue): `Manifest::open` reserved the 1 GiB limit for
    /// every manifest (`zstd::bulk` sizes its output by the limit when the frame, as our
    /// writer streams it, records no content size). Decoding grows with the data.
    #[test]
    fn decompressing_a_manifest_grows_with_the_data_not_the_limit() {
        let plain = vec![7u8; 100_000];
        let mut packed = Vec::new();
        let mut encoder = zstd::stream::write::Encoder::new(&mut packed, 3).unwrap();
        std::io::Write::write_all(&mut encoder, &plain).unwrap();
        encoder.finish().unwrap();
        assert!(
            matches!(zstd::zstd_safe::get_frame_content_size(&packed), Ok(None)),
            "a streamed frame, as seal writes"
        );
        let out = decompress_bounded(&packed, MAX_MANIFEST_BYTES).unwrap();
        assert_eq!(out, plain);
        assert!(out.capacity() < 4 << 20, "{} bytes reserved for {} bytes", out.capacity(), out.len());
        // Over the limit: refused, not truncated.
        let err = decompress_bounded(&packed, 99_999).unwrap_err();
        assert_eq!(err, ManifestError::Corrupt("decompresses to more than 99999 bytes".into()));
    }

    fn sample() -> Manifest {
        Manifest {
            snapshot: SnapshotId(uuid::Uuid::from_bytes([5; 16])),
            device: DeviceInfo {
                udid: "00008030-001A2B3C4D5E6F70".parse().unwrap(),
                name: "Alice's iPhone".into(),
                product_type: "iPhone15,2".into(),
                ios_version: "17.5".into(),
            },
            created_unix_ms: 1_700_000_000_000,
            files: vec![
                FileEntry {
                    path: "Manifest.db".into(),
                    size: 3,
                    mode: 0o644,
                    mtime_unix_seconds: 1,
                    chunks: vec![ChunkRef { id: ChunkId([1; 32]), length: 3 }],
                    ios_key: Some(Box::new(IosKey { class: 4, record: [9; KEY_RECORD_BYTES] })),
                },
                FileEntry {
                    path: "ab/abcdef".into(),
                    size: 0,
                    mode: 0o644,
                    mtime_unix_seconds: 2,
                    chunks: vec![],
                    ios_key: None,
                },
            ],
        }
    }

    #[test]
    fn a_sealed_manifest_opens_only_as_its_own_snapshot() {
        let key = DataKey::from_bytes(&[1; 32]);
        let m = sample();
        let sealed = m.seal(&key, [4; 12]).unwrap();
        assert_eq!(Manifest::open(&key, &m.snapshot, &sealed).unwrap(), m);
        let other = SnapshotId(uuid::Uuid::from_bytes([6; 16]));
        assert_eq!(Manifest::open(&key, &other, &sealed), Err(ManifestError::Unauthentic(other)));
        let mut bad = sealed.clone();
        bad[4] = 3;
        assert_eq!(Manifest::open(&key, &m.snapshot, &bad), Err(ManifestError::UnknownVersion(3)));
        // A version byte changed to another known version does not authenticate.
        bad[4] = 1;
        assert_eq!(Manifest::open(&key, &m.snapshot, &bad), Err(ManifestError::Unauthentic(m.snapshot)));
        assert!(m.ios_encrypted());
        assert_eq!(Manifest::open(&key, &m.snapshot, b"junk"), Err(ManifestError::BadMagic));
    }

    #[test]
    fn a_manifest_of_many_files_streams_through_zstd_and_reads_back() {
        // The streamed frame does not record its size; `open` must not need it.
        let key = DataKey::from_bytes(&[1; 32]);
        let mut m = sample();
        m.files = (0..20_000u32)
            .map(|i| FileEntry {
                path: format!("{:02x}/{i:040x}", i % 256),
                size: 7,
                mode: 0o644,
                mtime_unix_seconds: i64::from(i),
                chunks: vec![ChunkRef { id: ChunkId([(i % 251) as u8; 32]), length: 7 }],
                ios_key: None,
            })
            .collect();
        m.files.sort_by(|a, b| a.path.cmp(&b.path));
        let plain = postcard::to_stdvec(&m).unwrap();
        let sealed = m.seal(&key, [4; 12]).unwrap();
        assert!(sealed.len() < plain.len() / 2, "{} sealed bytes for {} encoded", sealed.len(), plain.len());
        assert_eq!(Manifest::open(&key, &m.snapshot, &sealed).unwrap(), m);
    }

    #[test]
    fn unsafe_or_inconsistent_manifests_are_refused() {
        let key = DataKey::from_bytes(&[1; 32]);
        for path in ["../etc/passwd", "/abs", "a//b", "a/./b", "", "a\\b"] {
            let mut m = sample();
            m.files[1].path = path.into();
            assert!(matches!(m.seal(&key, [0; 12]), Err(ManifestError::Invalid(_))), "{path:?}");
        }
        let mut m = sample();
        m.files[0].size = 4;
        assert!(matches!(m.validate(), Err(ManifestError::Invalid(_))));
        let mut m = sample();
        m.files.swap(0, 1);
        assert!(matches!(m.validate(), Err(ManifestError::Invalid(_))));
    }
}
