//! A server killed with SIGKILL in the middle of an upload shows no snapshot, and after a
//! restart the same run resumes without re-sending chunks that reached a durable pack.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use lifeboat_agent::net::Client;
use lifeboat_agent::pipeline::transfer::{self, Keys};
use lifeboat_e2e::{
    ServerProcess, embedded_db, eventually, have_postgres, make_tree, read_tree, sealed_chunks, server_cli, tempdir,
};
use lifeboat_server::auth::EnrollToken;
use lifeboat_server::objects;
use lifeboat_shared::ids::{ChunkId, PackId, SnapshotId, TenantId};
use lifeboat_shared::manifest::DeviceInfo;
use lifeboat_shared::wire::{Auth, ErrorCode, Request, Response};
use nix::sys::signal::Signal;

/// A chunk or pack id as the database keeps it.
fn bytes32(raw: Vec<u8>) -> [u8; 32] {
    raw.try_into().unwrap()
}

#[tokio::test]
async fn sigkill_mid_upload_leaves_no_snapshot_and_the_run_resumes() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    let data = dir.path().join("data");
    let mut server = ServerProcess::start(&data, &[]).unwrap();
    let (ok, _, err) = server_cli(&data, &["tenant", "create", "acme", "--encryption", "off"]);
    assert!(ok, "{err}");
    let (ok, out, err) = server_cli(&data, &["token", "create", "--tenant", "acme", "--json", "--expires", "10m"]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = EnrollToken::decode(json["token"].as_str().unwrap()).unwrap();

    let addr = server.quic_addr.to_string();
    let auth = Auth::Enroll { token_secret: token.secret.to_vec(), hostname: "ws".into(), agent_version: "t".into() };
    let client = Client::connect(&addr, token.cert_sha256, auth).await.unwrap();
    let agent = client.accepted.agent;
    let enrolled = client.accepted.enrolled.clone().unwrap();
    let keys = Keys::from_bytes(enrolled.id_key, enrolled.data_key);

    let dev = DeviceInfo {
        udid: "00008030-001A2B3C4D5E6F70".parse().unwrap(),
        name: "Bob's iPhone".into(),
        product_type: "iPhone14,5".into(),
        ios_version: "17.1".into(),
    };
    client.request(&Request::RegisterDevice { device: dev.clone(), serial_number: None }).await.unwrap();
    let Response::RunOpened { run, snapshot, .. } =
        client.request(&Request::OpenRun { udid: dev.udid.clone(), resume: None }).await.unwrap()
    else {
        panic!("no run")
    };

    let tree = tempfile::tempdir().unwrap();
    make_tree(tree.path(), 60, 150 << 20, 11).unwrap();
    let upload = {
        let (tree, dev) = (tree.path().to_path_buf(), dev.clone());
        tokio::spawn(
            async move { transfer::upload_dir(&client, &keys, run, snapshot, dev, &tree, 0).await.map(|_| ()) },
        )
    };

    // Kill the server once at least one pack is durable and indexed.
    let db = embedded_db(&data).await;
    let mut indexed = 0i64;
    for _ in 0..600 {
        indexed = db.query_one("SELECT count(*) FROM chunks", &[]).await.unwrap().get(0);
        if indexed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(indexed > 0, "no pack was flushed during the upload");
    server.signal(Signal::SIGKILL);
    server.wait_exit(Duration::from_secs(10)).unwrap();
    drop(db);
    // The agent would notice at its idle timeout; the test need not wait for that. What the
    // kill left behind is checked on the server.
    upload.abort();
    let _ = upload.await;
    let keys = Keys::from_bytes(enrolled.id_key, enrolled.data_key);
    assert!(eventually(Duration::from_secs(15), || lifeboat_e2e::postgres_processes_under(&data).is_empty()));

    let server = ServerProcess::start(&data, &[]).unwrap();
    let db = embedded_db(&data).await;
    let snapshots: i64 = db.query_one("SELECT count(*) FROM snapshots", &[]).await.unwrap().get(0);
    assert_eq!(snapshots, 0, "a partial snapshot is visible");
    // The killed run is still open, with the snapshot id it was given.
    let row = db
        .query_one("SELECT status, snapshot_id, finished_at IS NULL FROM backup_runs WHERE id = $1", &[&run.0])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), SnapshotId(row.get(1)), row.get::<_, bool>(2)),
        ("running".to_string(), snapshot, true)
    );
    // The server holds some of the tree's chunks and not all, each at the length of its
    // sealed blob, in a pack that has its row and whose object is in storage.
    let (tree_chunks, refs) = sealed_chunks(tree.path(), &keys);
    let rows = db
        .query(
            "SELECT c.tenant_id, c.id, c.pack_id, c.length_bytes, p.id IS NOT NULL \
             FROM chunks c LEFT JOIN packs p ON p.tenant_id = c.tenant_id AND p.id = c.pack_id",
            &[],
        )
        .await
        .unwrap();
    let mut held = HashSet::new();
    for r in &rows {
        let (tenant, id, pack) = (TenantId(r.get(0)), ChunkId(bytes32(r.get(1))), PackId(bytes32(r.get(2))));
        let length = r.get::<_, i32>(3) as u64;
        assert_eq!(tree_chunks.get(&id), Some(&length), "chunk {id}: not the tree's, or not at its sealed length");
        assert!(r.get::<_, bool>(4), "chunk {id} is indexed in pack {pack}, which has no row");
        let object = data.join("storage").join(objects::pack_path(&tenant, &pack));
        assert!(object.is_file(), "pack {pack} of chunk {id} is not in storage at {}", object.display());
        held.insert(id);
    }
    assert!(
        !held.is_empty() && held.len() < tree_chunks.len(),
        "the server holds {} of the tree's {} chunks",
        held.len(),
        tree_chunks.len()
    );
    let lacked: Vec<u64> =
        tree_chunks.iter().filter(|(id, _)| !held.contains(*id)).map(|(_, sealed)| *sealed).collect();

    let client = Client::connect(
        &server.quic_addr.to_string(),
        token.cert_sha256,
        Auth::Refresh { agent, secret: enrolled.refresh_secret.clone() },
    )
    .await
    .unwrap();
    let latest = client.request(&Request::LatestSnapshot { udid: dev.udid.clone() }).await.unwrap_err();
    assert_eq!(latest.code(), Some(ErrorCode::NotFound));
    let resumed = client.request(&Request::OpenRun { udid: dev.udid.clone(), resume: Some(run) }).await.unwrap();
    assert!(
        matches!(resumed, Response::RunOpened { run: r, snapshot: s, .. } if r == run && s == snapshot),
        "{resumed:?}"
    );

    let (report, committed) = transfer::upload_dir(&client, &keys, run, snapshot, dev, tree.path(), 0).await.unwrap();
    assert!(matches!(committed, Response::Committed { .. }), "{committed:?}");
    // Exactly the chunks the server lacked were sent, none it held.
    assert_eq!(report.chunks, refs, "{report:?}");
    assert_eq!(
        (report.chunks_sent, report.blob_bytes_sent),
        (lacked.len() as u64, lacked.iter().sum::<u64>()),
        "{report:?}: the server held {} of the tree's {} chunks before the restart",
        held.len(),
        tree_chunks.len()
    );
    // Now the server holds every chunk of the tree once: indexed at its sealed length, and
    // in one pack only.
    let index: HashMap<ChunkId, u64> = db
        .query("SELECT id, length_bytes FROM chunks", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (ChunkId(bytes32(r.get(0))), r.get::<_, i32>(1) as u64))
        .collect();
    assert!(index == tree_chunks, "the index holds {} chunks, the tree {}", index.len(), tree_chunks.len());
    let packed: i64 = db.query_one("SELECT coalesce(sum(blob_count), 0)::bigint FROM packs", &[]).await.unwrap().get(0);
    assert_eq!(packed, tree_chunks.len() as i64, "blobs in packs");
    let out = tempfile::tempdir().unwrap();
    lifeboat_e2e::download_as_export(&client, &db, &keys, snapshot, out.path()).await;
    assert!(read_tree(tree.path()) == read_tree(out.path()), "restored tree differs");
}
