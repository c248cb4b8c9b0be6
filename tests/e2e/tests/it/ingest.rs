//! The server's ingest and restore paths through a real QUIC connection on loopback,
//! a real PostgreSQL and real local-disk storage, driven by the agent's client library.

use std::collections::HashSet;
use std::time::Duration;

use lifeboat_agent::net::{Client, ClientError};
use lifeboat_agent::pipeline::transfer::{self, Keys, now_unix_ms};
use lifeboat_server::auth;
use lifeboat_server::config::StorageConfig;
use lifeboat_server::serve::{self, Running};
use lifeboat_server::store::tenants;
use lifeboat_shared::chunk::{open_and_verify, seal_chunk};
use lifeboat_shared::ids::{RunId, SnapshotId, TenantId};
use lifeboat_shared::manifest::DeviceInfo;
use lifeboat_shared::wire::{Auth, ErrorCode, Request, Response};
use lifeboat_test_support::{TestDb, test_db};

use lifeboat_e2e::{
    cached_bytes, enrol, incompressible, make_tree, pack_files, read_tree, server_config, skip_or_fail,
};

pub struct Fixture {
    pub server: Running,
    pub db: TestDb,
    pub _dir: tempfile::TempDir,
}

pub async fn start_server() -> Option<Fixture> {
    start_server_on(None).await
}

/// A server on a test database, with local-disk storage or `storage`.
pub async fn start_server_on(storage: Option<StorageConfig>) -> Option<Fixture> {
    let db = test_db().await?;
    // Under the build directory, not /tmp: on a tmpfs /tmp the page-cache checks below
    // would have nothing to check.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut config = server_config(&db.url, &dir.path().join("data"));
    if let Some(storage) = storage {
        config.storage = storage;
    }
    let server = serve::start(config).await.unwrap();
    Some(Fixture { server, db, _dir: dir })
}

impl Fixture {
    pub async fn tenant(&self, name: &str) -> TenantId {
        let mut client = self.db.client().await;
        tenants::create(&mut client, &self.server.app.master, name).await.unwrap().id
    }

    pub async fn token(&self, tenant: TenantId, ttl: Duration) -> Vec<u8> {
        let client = self.db.client().await;
        let addr = self.server.quic_addr.to_string();
        auth::create_enroll_token(&client, tenant, ttl, addr, self.server.cert_fingerprint)
            .await
            .unwrap()
            .secret
            .to_vec()
    }

    pub async fn connect(&self, auth: Auth) -> Result<Client, ClientError> {
        Client::connect(&self.server.quic_addr.to_string(), self.server.cert_fingerprint, auth).await
    }

    /// Enrols a new agent of `tenant`; returns its connection and keys.
    pub async fn enrolled_agent(&self, tenant: TenantId) -> (Client, Keys) {
        enrol(&self.server, &self.db.client().await, tenant, "ws-1").await.unwrap()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.db.client().await.query_one(sql, &[]).await.unwrap().get(0)
    }
}

pub fn device(udid: &str) -> DeviceInfo {
    DeviceInfo {
        udid: udid.parse().unwrap(),
        name: "Alice's iPhone".into(),
        product_type: "iPhone15,2".into(),
        ios_version: "17.5".into(),
    }
}

pub async fn open_run(client: &Client, dev: &DeviceInfo) -> (RunId, SnapshotId) {
    lifeboat_e2e::open_run(client, dev).await.unwrap()
}

const UDID: &str = "00008030-001A2B3C4D5E6F70";

/// A bulk upload on loopback ends with the largest packets path-MTU discovery may use:
/// both endpoints accept them (quinn's default tells the peer 1,472 at most), and they
/// are small enough that a GSO batch of ten stays under Linux's 64 KiB. With 8,952-byte
/// packets every batch was dropped with EMSGSIZE and black-hole detection fell back to
/// 1,200.
#[tokio::test]
async fn a_bulk_upload_on_loopback_ends_with_the_largest_packets() {
    let Some(fx) = start_server().await else { return };
    let tenant = fx.tenant("acme").await;
    let (client, keys) = fx.enrolled_agent(tenant).await;
    let tree = tempfile::tempdir().unwrap();
    make_tree(tree.path(), 100, 64 << 20, 11).unwrap();
    let dev = device(UDID);
    let (run, snapshot) = open_run(&client, &dev).await;
    transfer::upload_dir(&client, &keys, run, snapshot, dev, tree.path(), now_unix_ms()).await.unwrap();
    let stats = client.quic_stats();
    assert_eq!(stats.path.black_holes_detected, 0, "{:?}", stats.path);
    assert_eq!(stats.path.current_mtu, lifeboat_server::platform::tls::MTU_UPPER_BOUND, "{:?}", stats.path);
    // The data went in packets of that size, not mostly in smaller ones before a fall.
    assert!(stats.udp_tx.bytes / stats.udp_tx.datagrams > 4_000, "{:?}", stats.udp_tx);
    fx.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_snapshot_round_trips_byte_identical_and_a_second_upload_sends_almost_nothing() {
    let Some(fx) = start_server().await else { return };
    let tenant = fx.tenant("acme").await;
    let (client, keys) = fx.enrolled_agent(tenant).await;
    let tree = tempfile::tempdir().unwrap();
    make_tree(tree.path(), 1000, 50 << 20, 7).unwrap();
    let dev = device(UDID);

    let (run, snapshot) = open_run(&client, &dev).await;
    let before = client.bytes_sent();
    let (report, committed) =
        transfer::upload_dir(&client, &keys, run, snapshot, dev.clone(), tree.path(), now_unix_ms()).await.unwrap();
    let first_bytes = client.bytes_sent() - before;
    assert_eq!(report.files, 1000);
    assert!(report.logical_bytes >= 50_000_000, "{report:?}");
    assert_eq!(committed, Response::Committed { snapshot, files: 1000, logical_bytes: report.logical_bytes });
    // The packs are on disk and out of the page cache: fsynced, then dropped before the
    // commit returned (storage::drop_cached).
    let packs = pack_files(fx._dir.path());
    assert!(!packs.is_empty(), "no packs under {}", fx._dir.path().display());
    for pack in &packs {
        match cached_bytes(pack).unwrap() {
            Some(cached) => assert_eq!(cached, 0, "{} keeps {cached} bytes in the page cache", pack.display()),
            None => {
                skip_or_fail(&format!("{} is on tmpfs: no page cache to check", pack.display()));
                break;
            }
        }
    }

    let out = tempfile::tempdir().unwrap();
    lifeboat_e2e::download_as_export(&client, &fx.db.client().await, &keys, snapshot, &out.path().join("restored"))
        .await;
    assert!(read_tree(tree.path()) == read_tree(&out.path().join("restored")), "restored tree differs");

    let (run2, snapshot2) = open_run(&client, &dev).await;
    let before = client.bytes_sent();
    let (report2, _) =
        transfer::upload_dir(&client, &keys, run2, snapshot2, dev.clone(), tree.path(), now_unix_ms()).await.unwrap();
    let second_bytes = client.bytes_sent() - before;
    assert_eq!(report2.chunks_sent, 0, "{report2:?}");
    assert!(
        (second_bytes as f64) < 0.02 * first_bytes as f64,
        "second upload sent {second_bytes} bytes, first {first_bytes}"
    );
    assert_eq!(fx.count("SELECT count(*) FROM snapshots").await, 2);
    assert_eq!(fx.count("SELECT count(*) FROM backup_runs WHERE status = 'succeeded'").await, 2);
    fx.server.stop().await.unwrap();
}

#[tokio::test]
async fn chunks_whose_content_does_not_match_their_id_are_refused_and_not_indexed() {
    let Some(fx) = start_server().await else { return };
    let tenant = fx.tenant("acme").await;
    let (client, keys) = fx.enrolled_agent(tenant).await;
    let (run, _) = open_run(&client, &device(UDID)).await;
    let claimed = keys.id.chunk_id(b"the real contacts database");
    let poison = seal_chunk(&keys.data, &claimed, b"something else entirely", [9; 12]);
    let err = client.put_chunks(run, vec![(claimed, poison)]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ChunkMismatch), "{err}");
    assert!(err.to_string().contains(&claimed.to_string()), "{err}");
    // The same for chunks large enough to be verified off the stream's task, after a good
    // one in the same stream (the stream's buffers go to the blocking pool and back).
    let good = incompressible(1 << 20, 1);
    let good_id = keys.id.chunk_id(&good);
    let big_claimed = keys.id.chunk_id(&incompressible(1 << 20, 2));
    let big_poison = seal_chunk(&keys.data, &big_claimed, &incompressible(1 << 20, 3), [8; 12]);
    assert!(big_poison.len() > 1 << 20, "stored raw, so verified on the blocking pool");
    let err = client
        .put_chunks(run, vec![(good_id, seal_chunk(&keys.data, &good_id, &good, [7; 12])), (big_claimed, big_poison)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ChunkMismatch), "{err}");
    assert!(err.to_string().contains(&big_claimed.to_string()), "{err}");
    // Nothing of the refused chunks reaches storage or the index, even after the run ends;
    // the good one, verified, is kept for a later run to build on.
    client
        .request(&Request::EndRun {
            run,
            end: lifeboat_shared::wire::RunEnd::Failed { reason: "test".into(), message: String::new() },
        })
        .await
        .unwrap();
    let indexed =
        |id: lifeboat_shared::ids::ChunkId| format!("SELECT count(*) FROM chunks WHERE encode(id, 'hex') = '{id}'");
    assert_eq!(fx.count(&indexed(claimed)).await, 0);
    assert_eq!(fx.count(&indexed(big_claimed)).await, 0);
    assert_eq!(fx.count(&indexed(good_id)).await, 1);
    assert_eq!(fx.count("SELECT count(*) FROM chunks").await, 1);
    assert_eq!(fx.count("SELECT count(*) FROM packs").await, 1);
    fx.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_commit_that_references_missing_chunks_is_refused_and_shows_no_snapshot() {
    let Some(fx) = start_server().await else { return };
    let tenant = fx.tenant("acme").await;
    let (client, keys) = fx.enrolled_agent(tenant).await;
    let dev = device(UDID);
    let (run, snapshot) = open_run(&client, &dev).await;
    let id = keys.id.chunk_id(b"never uploaded");
    let manifest = lifeboat_shared::manifest::Manifest {
        snapshot,
        device: dev,
        created_unix_ms: 0,
        files: vec![lifeboat_shared::manifest::FileEntry {
            path: "Manifest.db".into(),
            size: 14,
            mode: 0o644,
            mtime_unix_seconds: 0,
            chunks: vec![lifeboat_shared::manifest::ChunkRef { id, length: 14 }],
            ios_key: None,
        }],
    };
    let sealed = manifest.seal(&keys.data, [1; 12]).unwrap();
    let err = client.commit(run, snapshot, &sealed).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::MissingChunks), "{err}");
    assert_eq!(fx.count("SELECT count(*) FROM snapshots").await, 0);
    assert_eq!(fx.count("SELECT count(*) FROM backup_runs WHERE status = 'running'").await, 1);
    fx.server.stop().await.unwrap();
}

/// The distinct chunk ids of a snapshot's files, in the order its manifest lists them.
fn chunk_ids(manifest: &lifeboat_shared::manifest::Manifest) -> Vec<lifeboat_shared::ids::ChunkId> {
    let mut seen = HashSet::new();
    manifest.files.iter().flat_map(|f| &f.chunks).map(|c| c.id).filter(|id| seen.insert(*id)).collect()
}

#[tokio::test]
async fn tenants_see_nothing_of_each_other_and_do_not_share_chunks() {
    let Some(fx) = start_server().await else { return };
    let (a, b) = (fx.tenant("acme").await, fx.tenant("globex").await);
    let (ca, ka) = fx.enrolled_agent(a).await;
    let (cb, kb) = fx.enrolled_agent(b).await;
    let tree = tempfile::tempdir().unwrap();
    make_tree(tree.path(), 20, 2 << 20, 3).unwrap();
    let dev = device(UDID);

    let (run_a, snap_a) = open_run(&ca, &dev).await;
    transfer::upload_dir(&ca, &ka, run_a, snap_a, dev.clone(), tree.path(), 0).await.unwrap();
    // A's chunk ids, from its manifest. A reads its snapshot and every chunk back (within
    // an export a help-desk user of A's started), and each chunk verifies.
    let db = fx.db.client().await;
    let _job_a = lifeboat_e2e::start_export(&ca, &db, snap_a).await;
    let sealed_a = ca.get_manifest(snap_a).await.unwrap();
    let a_ids = chunk_ids(&lifeboat_shared::manifest::Manifest::open(&ka.data, &snap_a, &sealed_a).unwrap());
    assert!(a_ids.len() > 1, "{a_ids:?}");
    let latest = ca.request(&Request::LatestSnapshot { udid: dev.udid.clone() }).await.unwrap();
    assert!(matches!(latest, Response::Snapshot { snapshot, .. } if snapshot == snap_a), "{latest:?}");
    let blobs = ca.get_chunks(&a_ids).await.unwrap();
    let mut got: Vec<_> = blobs.iter().map(|(id, _)| *id).collect();
    let mut want = a_ids.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "A's chunks read back");
    for (id, blob) in &blobs {
        open_and_verify(&ka.data, &ka.id, id, blob).unwrap_or_else(|e| panic!("chunk {id} of A: {e}"));
    }

    // B sees none of it: not the snapshot, not its manifest, not its chunks, all together
    // or one at a time.
    let latest = cb.request(&Request::LatestSnapshot { udid: dev.udid.clone() }).await.unwrap_err();
    assert_eq!(latest.code(), Some(ErrorCode::NotFound), "{latest}");
    let manifest = cb.get_manifest(snap_a).await.unwrap_err();
    assert_eq!(manifest.code(), Some(ErrorCode::NotFound), "{manifest}");
    let all = cb.get_chunks(&a_ids).await.unwrap_err();
    assert_eq!(all.code(), Some(ErrorCode::NotFound), "{all}");
    for id in &a_ids {
        let one = cb.get_chunks(&[*id]).await.unwrap_err();
        assert_eq!(one.code(), Some(ErrorCode::NotFound), "chunk {id}: {one}");
    }
    // Nor can B's help desk start a job on it.
    let credential = lifeboat_e2e::helpdesk_credential(&db, b).await.into();
    let job = lifeboat_shared::wire::JobRequest::Export { source: lifeboat_shared::wire::JobSource::Snapshot(snap_a) };
    let err = cb.request(&Request::StartJob { credential, job }).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    // A's finished run is over for A, and is none of B's.
    let over = ca.request(&Request::OpenRun { udid: dev.udid.clone(), resume: Some(run_a) }).await.unwrap_err();
    assert_eq!(over.code(), Some(ErrorCode::LeaseLost), "{over}");
    let resume = cb.request(&Request::OpenRun { udid: dev.udid.clone(), resume: Some(run_a) }).await.unwrap_err();
    assert_eq!(resume.code(), Some(ErrorCode::NotFound), "{resume}");

    // The same UDID in B is B's own device. In a run of B's, every one of A's chunks is
    // missing; in a new run of A's, none is.
    let (run_b, snap_b) = open_run(&cb, &dev).await;
    let missing = cb.request(&Request::MissingChunks { run: run_b, ids: a_ids.clone() }).await.unwrap();
    assert_eq!(missing, Response::Missing { ids: a_ids.clone() });
    let (run_a2, _) = open_run(&ca, &dev).await;
    let missing = ca.request(&Request::MissingChunks { run: run_a2, ids: a_ids.clone() }).await.unwrap();
    assert_eq!(missing, Response::Missing { ids: Vec::new() });

    // B's upload of the same tree stores chunks of B's own, which A cannot read.
    let (report_b, _) = transfer::upload_dir(&cb, &kb, run_b, snap_b, dev.clone(), tree.path(), 0).await.unwrap();
    let _job_b = lifeboat_e2e::start_export(&cb, &db, snap_b).await;
    let sealed_b = cb.get_manifest(snap_b).await.unwrap();
    let b_ids = chunk_ids(&lifeboat_shared::manifest::Manifest::open(&kb.data, &snap_b, &sealed_b).unwrap());
    assert_eq!(report_b.chunks_sent, b_ids.len() as u64, "no cross-tenant dedup: {report_b:?}");
    assert!(b_ids.iter().all(|id| !a_ids.contains(id)), "the tenants' chunk ids overlap");
    let stored = |t: TenantId| format!("SELECT count(*) FROM chunks WHERE tenant_id = '{t}'");
    assert_eq!(fx.count(&stored(a)).await, a_ids.len() as i64);
    assert_eq!(fx.count(&stored(b)).await, b_ids.len() as i64);
    assert_eq!(fx.count("SELECT count(*) FROM chunks").await, (a_ids.len() + b_ids.len()) as i64);
    // Even while A holds a job of its own.
    let err = ca.get_chunks(&b_ids).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    let err = ca.get_manifest(snap_b).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    assert_eq!(fx.count("SELECT count(*) FROM devices").await, 2);
    fx.server.stop().await.unwrap();
}

#[tokio::test]
async fn bad_credentials_are_refused_with_a_reason() {
    let Some(fx) = start_server().await else { return };
    let (a, b) = (fx.tenant("acme").await, fx.tenant("globex").await);
    let enroll =
        |secret: Vec<u8>| Auth::Enroll { token_secret: secret, hostname: "ws".into(), agent_version: "t".into() };

    let forged = fx.connect(enroll(vec![7; 32])).await.unwrap_err();
    assert_eq!(forged.code(), Some(ErrorCode::BadCredential), "{forged}");

    let expired = fx.token(a, Duration::from_secs(60)).await;
    let db = fx.db.client().await;
    let hash = auth::secret_hash(&expired);
    let n = db
        .execute(
            "UPDATE enrollment_tokens SET expires_at = now() - interval '1 second' WHERE secret_hash = $1",
            &[&hash],
        )
        .await
        .unwrap();
    assert_eq!(n, 1, "the token's row");
    let err = fx.connect(enroll(expired)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Expired), "{err}");

    let once = fx.token(a, Duration::from_secs(60)).await;
    let client = fx.connect(enroll(once.clone())).await.unwrap();
    let agent = client.accepted.agent;
    let refresh = client.accepted.enrolled.clone().unwrap().refresh_secret;
    let err = fx.connect(enroll(once)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyUsed), "{err}");

    // Access tokens: a good one works; one naming another tenant or signed elsewhere does not.
    let good = client.accepted.access_token.clone();
    fx.connect(Auth::Access { token: good.clone() }).await.unwrap();
    let wrong_tenant = fx.server.app.signer.issue(agent, b).unwrap();
    let err = fx.connect(Auth::Access { token: wrong_tenant }).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadCredential), "{err}");
    // Change one character in the middle of the signature (the last one may only carry padding bits).
    let mut tampered = good.clone().into_bytes();
    let at = good.rfind('.').unwrap() + 20;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let err = fx.connect(Auth::Access { token: tampered }).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadCredential), "{err}");

    // Revoked: access and refresh both refused.
    assert_eq!(auth::revoke(&db, agent).await.unwrap(), Some(a));
    assert_eq!(auth::revoke(&db, agent).await.unwrap(), None, "revoked twice");
    let err = fx.connect(Auth::Access { token: good }).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Revoked), "{err}");
    let err = fx.connect(Auth::Refresh { agent, secret: refresh }).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Revoked), "{err}");
    fx.server.stop().await.unwrap();
}

/// Sends raw bytes as the hello; returns the welcome.
async fn raw_hello(fx: &Fixture, bytes: &[u8]) -> lifeboat_shared::wire::Welcome {
    let (_ep, conn) =
        lifeboat_agent::net::connect_raw(&fx.server.quic_addr.to_string(), fx.server.cert_fingerprint).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let _ = send.finish();
    lifeboat_shared::wire::expect_frame(&mut recv, 1 << 20).await.unwrap()
}

fn refused_with(w: lifeboat_shared::wire::Welcome) -> ErrorCode {
    match w {
        lifeboat_shared::wire::Welcome::Refused { code, .. } => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_oversized_and_unknown_version_frames_are_refused() {
    use lifeboat_shared::wire::{Data, Hello, encode};
    let Some(fx) = start_server().await else { return };
    let tenant = fx.tenant("acme").await;

    let future = encode(&Hello { versions: vec![99], auth: Auth::Access { token: "x".into() } });
    assert_eq!(refused_with(raw_hello(&fx, &future).await), ErrorCode::UnsupportedVersion);
    // A v1 agent (before the layout issue's protocol v2) is told to upgrade.
    let v1 = encode(&Hello { versions: vec![1], auth: Auth::Access { token: "x".into() } });
    let refusal = raw_hello(&fx, &v1).await;
    assert!(
        matches!(&refusal, lifeboat_shared::wire::Welcome::Refused { code: ErrorCode::UnsupportedVersion, message }
            if *message == format!("agent speaks protocol versions [1]; this server speaks {:?}: upgrade lifeboat-agent", lifeboat_shared::wire::VERSIONS)),
        "{refusal:?}"
    );
    assert_eq!(refused_with(raw_hello(&fx, &u32::MAX.to_be_bytes()).await), ErrorCode::TooLarge);
    assert_eq!(refused_with(raw_hello(&fx, &[0, 0, 0, 3, 0xff, 0xfe, 0xfd]).await), ErrorCode::Malformed);

    // After a good hello: a garbage request, and an oversized chunk frame, are refused and store nothing.
    let (client, _keys) = fx.enrolled_agent(tenant).await;
    let (run, _) = open_run(&client, &device(UDID)).await;
    let (_ep, conn) =
        lifeboat_agent::net::connect_raw(&fx.server.quic_addr.to_string(), fx.server.cert_fingerprint).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = Hello { versions: vec![2], auth: Auth::Access { token: client.accepted.access_token.clone() } };
    send.write_all(&encode(&hello)).await.unwrap();
    let _ = send.finish();
    let welcome: lifeboat_shared::wire::Welcome =
        lifeboat_shared::wire::expect_frame(&mut recv, 1 << 20).await.unwrap();
    assert!(matches!(welcome, lifeboat_shared::wire::Welcome::Accepted { .. }), "{welcome:?}");

    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 2, 0xee, 0xee]).await.unwrap();
    let _ = send.finish();
    let resp: Response = lifeboat_shared::wire::expect_frame(&mut recv, 1 << 20).await.unwrap();
    assert!(matches!(resp, Response::Error { code: ErrorCode::Malformed, .. }), "{resp:?}");

    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode(&Request::PutChunks { run })).await.unwrap();
    send.write_all(&(64u32 << 20).to_be_bytes()).await.unwrap();
    let resp: Response = lifeboat_shared::wire::expect_frame(&mut recv, 1 << 20).await.unwrap();
    assert!(matches!(resp, Response::Error { code: ErrorCode::TooLarge, .. }), "{resp:?}");
    drop(send);

    // A data frame where a request belongs.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode(&Data::End)).await.unwrap();
    let _ = send.finish();
    let resp: Response = lifeboat_shared::wire::expect_frame(&mut recv, 1 << 20).await.unwrap();
    assert!(matches!(resp, Response::Error { code: ErrorCode::Malformed, .. }), "{resp:?}");

    assert_eq!(fx.count("SELECT count(*) FROM chunks").await, 0);
    assert_eq!(fx.count("SELECT count(*) FROM packs").await, 0);
    // The server still serves the well-behaved agent.
    client
        .request(&Request::ReportState {
            udid: UDID.parse().unwrap(),
            state: lifeboat_shared::wire::DeviceState::Idle,
            message: None,
        })
        .await
        .unwrap();
    fx.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_snapshot_round_trips_through_s3_storage() {
    let Some(storage) = lifeboat_test_support::s3_bucket().await else { return };
    let Some(fx) = start_server_on(Some(storage)).await else { return };
    let tenant = fx.tenant("acme").await;
    let (client, keys) = fx.enrolled_agent(tenant).await;
    let tree = tempfile::tempdir().unwrap();
    make_tree(tree.path(), 100, 8 << 20, 13).unwrap();
    let dev = device(UDID);
    let (run, snapshot) = open_run(&client, &dev).await;
    transfer::upload_dir(&client, &keys, run, snapshot, dev, tree.path(), 0).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    lifeboat_e2e::download_as_export(&client, &fx.db.client().await, &keys, snapshot, out.path()).await;
    assert!(read_tree(tree.path()) == read_tree(out.path()), "restored tree differs");
    let (status, body) = lifeboat_test_support::http_get(fx.server.http_addr, "/readyz", None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    fx.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_file_with_two_names_is_in_the_snapshot_under_both() {
    // Both names have one key (the inode): the second takes the first one's chunk list.
    let Some(fx) = start_server().await else { return };
    let tenant = fx.tenant("acme").await;
    let (client, keys) = fx.enrolled_agent(tenant).await;
    let tree = tempfile::tempdir().unwrap();
    make_tree(tree.path(), 10, 1 << 20, 5).unwrap();
    let first = transfer::list_files(tree.path()).unwrap().remove(0);
    std::fs::hard_link(tree.path().join(&first), tree.path().join("zz-second-name")).unwrap();
    let dev = device(UDID);
    let (run, snapshot) = open_run(&client, &dev).await;
    let (report, committed) = transfer::upload_dir(&client, &keys, run, snapshot, dev, tree.path(), 0).await.unwrap();
    assert_eq!(report.files, 11);
    assert_eq!(committed, Response::Committed { snapshot, files: 11, logical_bytes: report.logical_bytes });
    let out = tempfile::tempdir().unwrap();
    lifeboat_e2e::download_as_export(&client, &fx.db.client().await, &keys, snapshot, out.path()).await;
    assert!(read_tree(tree.path()) == read_tree(out.path()), "restored tree differs");
    fx.server.stop().await.unwrap();
}

#[tokio::test]
async fn one_agent_backs_up_a_device_at_a_time_until_its_lease_expires() {
    let Some(fx) = start_server().await else { return };
    let tenant = fx.tenant("acme").await;
    let (a, _) = fx.enrolled_agent(tenant).await;
    let (b, _) = fx.enrolled_agent(tenant).await;
    let dev = device(UDID);
    let (run_a, _) = open_run(&a, &dev).await;

    b.request(&Request::RegisterDevice { device: dev.clone(), serial_number: None }).await.unwrap();
    let held = b.request(&Request::OpenRun { udid: dev.udid.clone(), resume: None }).await.unwrap_err();
    assert_eq!(held.code(), Some(ErrorCode::LeaseHeld), "{held}");
    let stolen = b.request(&Request::OpenRun { udid: dev.udid.clone(), resume: Some(run_a) }).await.unwrap_err();
    assert_eq!(stolen.code(), Some(ErrorCode::Forbidden), "{stolen}");

    // A's agent goes silent past its lease: B takes the device over.
    let db = fx.db.client().await;
    db.execute("UPDATE backup_runs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", &[&run_a.0])
        .await
        .unwrap();
    let (run_b, _) = open_run(&b, &dev).await;
    assert_ne!(run_b, run_a);
    let row = db.query_one("SELECT status, reason FROM backup_runs WHERE id = $1", &[&run_a.0]).await.unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, Option<String>>(1)),
        ("failed".into(), Some("lease-expired".into()))
    );
    let lost = a.request(&Request::MissingChunks { run: run_a, ids: vec![] }).await.unwrap_err();
    assert_eq!(lost.code(), Some(ErrorCode::LeaseLost), "{lost}");
    fx.server.stop().await.unwrap();
}

/// The phone's side of a backup never waits while a large file streams in: data is always
/// ready, and its loop uses up the whole cooperative budget of every poll of the task it
/// shares with the pipeline. The pipeline must upload meanwhile, not only once the phone
/// pauses (it once did: the server idled for seconds while photos arrived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_uploads_while_the_phone_side_never_waits() {
    use lifeboat_agent::pipeline::{FileCache, Pipeline};
    use lifeboat_agent::progress::Progress;
    let Some(fx) = start_server().await else { return };
    let tenant = fx.tenant("acme").await;
    let (client, keys) = fx.enrolled_agent(tenant).await;
    let (run, _) = open_run(&client, &device(UDID)).await;
    // More than a batch, so one goes out before the end.
    let tree = tempfile::tempdir().unwrap();
    make_tree(tree.path(), 8, 48 << 20, 11).unwrap();
    let progress = std::sync::Arc::new(Progress::new());
    let mut pipeline = Pipeline::start(client.clone(), keys, run, FileCache::default(), progress.clone());
    let feed = pipeline.feed();
    for rel in transfer::list_files(tree.path()).unwrap() {
        assert!(feed.files(vec![(tree.path().join(rel), None)]));
    }
    let watched = progress.clone();
    let busy_phone = async move {
        // Passes in about a second; the old order failed here. Generous for a loaded CI.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while Progress::get(&watched.bytes_uploaded) == 0 && std::time::Instant::now() < deadline {
            tokio::task::coop::consume_budget().await;
        }
        Progress::get(&watched.bytes_uploaded)
    };
    let uploaded = pipeline.run_until(busy_phone).await.unwrap();
    assert!(uploaded > 0, "nothing was uploaded while the phone's side was busy");
    drop(pipeline);
    fx.server.stop().await.unwrap();
}

/// A batch that does not fill goes out once the chunker has nothing more to give, not
/// only when the phone is done: at the end of a backup the phone spends seconds moving
/// its files into place, and the last chunks must not wait for that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_does_not_fill_goes_out_while_the_phone_is_still_busy() {
    use lifeboat_agent::pipeline::{FileCache, Pipeline};
    use lifeboat_agent::progress::Progress;
    let Some(fx) = start_server().await else { return };
    let tenant = fx.tenant("acme").await;
    let (client, keys) = fx.enrolled_agent(tenant).await;
    let (run, _) = open_run(&client, &device(UDID)).await;
    let tree = tempfile::tempdir().unwrap();
    std::fs::write(tree.path().join("one"), incompressible(200_000, 5)).unwrap();
    let progress = std::sync::Arc::new(Progress::new());
    let mut pipeline = Pipeline::start(client.clone(), keys, run, FileCache::default(), progress.clone());
    assert!(pipeline.feed().files(vec![(tree.path().join("one"), None)]));
    let watched = progress.clone();
    let moving_files = async move {
        // Passes in a fraction of a second; generous for a loaded CI.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while Progress::get(&watched.bytes_uploaded) == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Progress::get(&watched.bytes_uploaded)
    };
    let uploaded = pipeline.run_until(moving_files).await.unwrap();
    assert!(uploaded > 0, "the last, unfilled batch waited for the phone");
    drop(pipeline);
    fx.server.stop().await.unwrap();
}
