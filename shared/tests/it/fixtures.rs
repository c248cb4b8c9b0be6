//! Frozen fixtures: objects written by format version 1 of packs, blobs and manifests
//! (`docs/format.md`), kept in `shared/tests/fixtures/format-v1/`, and by version 2 of
//! manifests (an iOS-encrypted snapshot's key records) in `format-v2/`; never rewritten.
//! Every build must keep restoring them byte for byte: a reader that stops understanding
//! a released format fails here.
//!
//! The fixture is: a pack of three blobs (one compressed, one stored raw, one empty
//! chunk), a lone blob, and a sealed manifest of a snapshot whose two files are made of
//! those chunks, all under the keys below. `LIFEBOAT_WRITE_FROZEN_FIXTURE=1` writes a
//! missing fixture once (for a new format version); it never overwrites one.

use lifeboat_shared::chunk::{DataKey, IdKey, open_and_verify, seal_chunk};
use lifeboat_shared::ids::{ChunkId, SnapshotId};
use lifeboat_shared::manifest::{ChunkRef, DeviceInfo, FileEntry, IosKey, Manifest};
use lifeboat_shared::pack::{self, PackBuilder};
use lifeboat_shared::restore;

const ID_KEY: [u8; 32] = [0x11; 32];
const DATA_KEY: [u8; 32] = [0x22; 32];
const SNAPSHOT: u128 = 0x0192_f0c4_5a3e_7b21_9c4d_2e8f_6a1b_3c5d;

/// The plaintexts of the fixture's chunks.
fn chunks() -> Vec<Vec<u8>> {
    let text: Vec<u8> = b"Lifeboat format version 1. ".iter().copied().cycle().take(40_000).collect();
    // Incompressible: xorshift, stored raw.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    vec![text, noise, Vec::new()]
}

/// The files of the fixture's snapshot: (path, chunk indices).
const FILES: &[(&str, &[usize])] = &[("3d/3d0d7e5fb2ce288813306e4d4636395e047a3d28", &[0, 1]), ("Info.plist", &[2, 0])];

fn manifest(ids: &[ChunkId], plain: &[Vec<u8>]) -> Manifest {
    Manifest {
        snapshot: SnapshotId(uuid::Uuid::from_u128(SNAPSHOT)),
        device: DeviceInfo {
            udid: "00008030-001A2B3C4D5E6F70".parse().unwrap(),
            name: "Anna's iPhone".into(),
            product_type: "iPhone15,2".into(),
            ios_version: "17.5.1".into(),
        },
        created_unix_ms: 1_764_700_000_000,
        files: FILES
            .iter()
            .map(|(path, parts)| FileEntry {
                path: (*path).into(),
                size: parts.iter().map(|&i| plain[i].len() as u64).sum(),
                mode: 0o644,
                mtime_unix_seconds: 1_764_700_000,
                chunks: parts.iter().map(|&i| ChunkRef { id: ids[i], length: plain[i].len() as u32 }).collect(),
                ios_key: None,
            })
            .collect(),
    }
}

fn write_once(dir: &std::path::Path) {
    let (id_key, data_key) = (IdKey::from_bytes(ID_KEY), DataKey::from_bytes(&DATA_KEY));
    let plain = chunks();
    let ids: Vec<ChunkId> = plain.iter().map(|p| id_key.chunk_id(p)).collect();
    let mut builder = PackBuilder::new();
    for (i, (id, p)) in ids.iter().zip(&plain).enumerate() {
        builder.push(*id, &seal_chunk(&data_key, id, p, [i as u8 + 1; 12]));
    }
    let (_, pack_bytes, _) = builder.finish();
    let blob = seal_chunk(&data_key, &ids[0], &plain[0], [9; 12]);
    let sealed = manifest(&ids, &plain).seal(&data_key, [7; 12]).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in [("pack", &pack_bytes), ("blob", &blob), ("manifest", &sealed)] {
        let path = dir.join(name);
        assert!(!path.exists(), "{} exists: a frozen fixture is never rewritten", path.display());
        std::fs::write(path, bytes).unwrap();
    }
}

#[test]
fn format_v1_fixtures_still_restore_byte_for_byte() {
    let dir = crate::dir("fixtures/format-v1");
    if std::env::var_os("LIFEBOAT_WRITE_FROZEN_FIXTURE").is_some_and(|v| v == "1") && !dir.join("manifest").exists() {
        write_once(&dir);
    }
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"));
    let (id_key, data_key) = (IdKey::from_bytes(ID_KEY), DataKey::from_bytes(&DATA_KEY));
    let plain = chunks();
    let ids: Vec<ChunkId> = plain.iter().map(|p| id_key.chunk_id(p)).collect();

    // The pack: its self-describing index names the three chunks, in order.
    let pack_bytes = read("pack");
    let entries = pack::read_index(&pack_bytes).unwrap();
    assert_eq!(entries.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    assert!(entries[0].length < plain[0].len() as u32, "the text chunk was stored compressed");
    let blobs: Vec<(ChunkId, Vec<u8>)> =
        entries.iter().map(|e| (e.id, pack::blob(&pack_bytes, e).unwrap().to_vec())).collect();

    // The lone blob.
    assert_eq!(open_and_verify(&data_key, &id_key, &ids[0], &read("blob")).unwrap(), plain[0]);

    // The manifest, and every file restored from the pack's chunks through the read path
    // a restore runs (plan, open and verify, reassemble).
    let snapshot = SnapshotId(uuid::Uuid::from_u128(SNAPSHOT));
    let m = Manifest::open(&data_key, &snapshot, &read("manifest")).unwrap();
    assert_eq!(m, manifest(&ids, &plain));
    let batches = restore::plan(&m.files, restore::BATCH_BYTES, 1000);
    assert_eq!(batches.len(), 1);
    let opened = restore::open(&data_key, &id_key, &batches[0], blobs);
    assert!(opened.failed.is_empty() && opened.unasked.is_empty(), "{:?} {:?}", opened.failed, opened.unasked);
    for (f, (_, parts)) in m.files.iter().zip(FILES) {
        let expected: Vec<u8> = parts.iter().flat_map(|&i| plain[i].iter().copied()).collect();
        assert_eq!(restore::rebuild(f, &opened.plain).unwrap(), expected, "{}", f.path);
    }
}

/// Version 2 of the manifest: the same snapshot as an iOS-encrypted backup's, Manifest.db
/// with its `ManifestKey` record (class 4) and the file with its own (class 3).
fn manifest_v2(ids: &[ChunkId], plain: &[Vec<u8>]) -> Manifest {
    let mut m = manifest(ids, plain);
    m.snapshot = SnapshotId(uuid::Uuid::from_u128(SNAPSHOT + 2));
    let record = |class: u8| {
        let mut r = [class + 0x40; 44];
        r[..4].copy_from_slice(&[class, 0, 0, 0]);
        r
    };
    m.files[0].ios_key = Some(Box::new(IosKey { class: 3, record: record(3) }));
    m.files.push(FileEntry {
        path: "Manifest.db".into(),
        size: plain[0].len() as u64,
        mode: 0o644,
        mtime_unix_seconds: 1_764_700_001,
        chunks: vec![ChunkRef { id: ids[0], length: plain[0].len() as u32 }],
        ios_key: Some(Box::new(IosKey { class: 4, record: record(4) })),
    });
    m
}

#[test]
fn format_v2_manifest_still_opens() {
    let dir = crate::dir("fixtures/format-v2");
    let (id_key, data_key) = (IdKey::from_bytes(ID_KEY), DataKey::from_bytes(&DATA_KEY));
    let plain = chunks();
    let ids: Vec<ChunkId> = plain.iter().map(|p| id_key.chunk_id(p)).collect();
    let path = dir.join("manifest");
    if std::env::var_os("LIFEBOAT_WRITE_FROZEN_FIXTURE").is_some_and(|v| v == "1") && !path.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, manifest_v2(&ids, &plain).seal(&data_key, [8; 12]).unwrap()).unwrap();
    }
    let sealed = std::fs::read(&path).unwrap_or_else(|e| panic!("fixture manifest: {e}"));
    assert_eq!(sealed[4], 2, "version byte");
    let snapshot = SnapshotId(uuid::Uuid::from_u128(SNAPSHOT + 2));
    let m = Manifest::open(&data_key, &snapshot, &sealed).unwrap();
    assert_eq!(m, manifest_v2(&ids, &plain));
    assert!(m.ios_encrypted());
}
