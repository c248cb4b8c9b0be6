//! One storage conformance suite, run on every backend: local disk (OpenDAL fs) and S3
//! (OpenDAL s3 against a local S3-compatible server, moto).

use lifeboat_server::config::StorageConfig;
use lifeboat_server::objects as storage;
use lifeboat_shared::chunk::{DataKey, IdKey, open_and_verify, seal_chunk};
use lifeboat_shared::pack::{PackBuilder, read_index};
use opendal::{ErrorKind, Operator};

fn noise(len: usize, seed: u8) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new().update(&[seed]).finalize_xof().fill(&mut out);
    out
}

async fn objects_round_trip(op: Operator) {
    op.write("tenants/t1/snapshots/s1", b"first".to_vec()).await.unwrap();
    assert_eq!(op.read("tenants/t1/snapshots/s1").await.unwrap().to_vec(), b"first");
    op.write("tenants/t1/snapshots/s1", b"second, longer".to_vec()).await.unwrap();
    assert_eq!(op.read("tenants/t1/snapshots/s1").await.unwrap().to_vec(), b"second, longer");
    assert_eq!(op.stat("tenants/t1/snapshots/s1").await.unwrap().content_length(), 14);
    let missing = op.read("tenants/t1/snapshots/nope").await.unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
    let empty = Vec::<u8>::new();
    op.write("empty", empty).await.unwrap();
    assert_eq!(op.read("empty").await.unwrap().len(), 0);
}

async fn ranged_reads_return_exactly_the_range(op: Operator) {
    let data = noise(40 << 20, 1); // a pack-sized object
    op.write("tenants/t1/packs/ab/big", data.clone()).await.unwrap();
    for (start, end) in [(0u64, 1u64), (5, 4096), (17 << 20, (17 << 20) + 3_000_000), ((40 << 20) - 10, 40 << 20)] {
        let got = op.read_with("tenants/t1/packs/ab/big").range(start..end).await.unwrap().to_vec();
        assert_eq!(got, &data[start as usize..end as usize], "range {start}..{end}");
    }
    assert_eq!(op.read("tenants/t1/packs/ab/big").await.unwrap().to_vec(), data);
}

async fn listing_and_deletion(op: Operator) {
    for name in ["a", "b", "c"] {
        op.write(&format!("tenants/t2/packs/00/{name}"), name.as_bytes().to_vec()).await.unwrap();
    }
    op.write("tenants/t3/packs/00/other", b"x".to_vec()).await.unwrap();
    // Backends differ on whether a listing includes the directory itself: count files only.
    let files = |list: Vec<opendal::Entry>| -> Vec<String> {
        let mut names: Vec<String> =
            list.iter().filter(|e| e.metadata().is_file()).map(|e| e.name().to_string()).collect();
        names.sort();
        names
    };
    assert_eq!(files(op.list("tenants/t2/packs/00/").await.unwrap()), ["a", "b", "c"]);
    op.delete("tenants/t2/packs/00/b").await.unwrap();
    assert_eq!(op.read("tenants/t2/packs/00/b").await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(files(op.list("tenants/t2/packs/00/").await.unwrap()), ["a", "c"]);
    op.delete("tenants/t2/packs/00/b").await.unwrap(); // deleting what is gone is fine
}

async fn the_readiness_probe_passes(op: Operator) {
    storage::ping(&op, std::time::Duration::from_secs(10)).await.unwrap();
    assert!(!op.read(storage::PROBE_PATH).await.unwrap().is_empty());
}

async fn a_stored_pack_reindexes_and_its_blobs_verify(op: Operator) {
    let (dk, ik) = (DataKey::from_bytes(&[1; 32]), IdKey::from_bytes([2; 32]));
    let mut b = PackBuilder::new();
    let chunks: Vec<Vec<u8>> = (0..20).map(|i| noise(100_000 + i * 1000, i as u8)).collect();
    for c in &chunks {
        let id = ik.chunk_id(c);
        b.push(id, &seal_chunk(&dk, &id, c, [3; 12]));
    }
    let (pack_id, bytes, entries) = b.finish();
    let tenant = lifeboat_shared::ids::TenantId(uuid::Uuid::from_bytes([4; 16]));
    let path = storage::pack_path(&tenant, &pack_id);
    assert!(path.starts_with(&format!("tenants/{tenant}/packs/{}/", &pack_id.to_string()[..2])));
    op.write(&path, bytes).await.unwrap();
    let back = op.read(&path).await.unwrap().to_vec();
    assert_eq!(read_index(&back).unwrap(), entries);
    for (e, c) in entries.iter().zip(&chunks) {
        let blob = op.read_with(&path).range(e.offset..e.offset + u64::from(e.length)).await.unwrap().to_vec();
        assert_eq!(&open_and_verify(&dk, &ik, &e.id, &blob).unwrap(), c);
    }
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod fs {
            $(
                #[tokio::test]
                async fn $check() {
                    let dir = tempfile::tempdir().unwrap();
                    let config = super::StorageConfig::Fs { root: dir.path().join("storage") };
                    super::$check(super::storage::operator(&config).unwrap()).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test]
                async fn $check() {
                    let Some(config) = lifeboat_test_support::s3_bucket().await else { return };
                    super::$check(super::storage::operator(&config).unwrap()).await;
                }
            )*
        }
    };
}

conformance!(
    objects_round_trip,
    ranged_reads_return_exactly_the_range,
    listing_and_deletion,
    the_readiness_probe_passes,
    a_stored_pack_reindexes_and_its_blobs_verify,
);
