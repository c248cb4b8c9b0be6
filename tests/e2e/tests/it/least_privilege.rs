//! What a workstation may read: a snapshot's manifest and chunks only within a job this
//! agent runs, a backup password only under the device's lease or such a job; anything
//! else is answered exactly as a missing object is, logged and counted. A job that reads
//! a snapshot needs a help-desk user's credential, and records them.

use lifeboat_agent::net::Client;
use lifeboat_agent::pipeline::transfer;
use lifeboat_server::auth;
use lifeboat_shared::Secret;
use lifeboat_shared::ids::{ChunkId, SnapshotId};
use lifeboat_shared::wire::{ErrorCode, JobRequest, JobSource, Request, Response};

use crate::ingest::{device, open_run, start_server};

const UDID: &str = "00008030-001A2B3C4D5E6F71";

fn refused(fx: &crate::ingest::Fixture, request: &str) -> u64 {
    fx.server.app.metrics.reads_refused.with_label_values(&[request]).get()
}

async fn start(client: &Client, credential: &str, job: JobRequest) -> Result<Response, String> {
    let req = Request::StartJob { credential: Secret::new(credential.to_string()), job };
    client.request(&req).await.map_err(|e| format!("{:?}: {e}", e.code()))
}

async fn put(client: &Client, password: &str) -> Result<Response, ErrorCode> {
    let req = Request::PutBackupPassword { udid: UDID.parse().unwrap(), password: Secret::new(password.to_string()) };
    client.request(&req).await.map_err(|e| e.code().unwrap())
}

async fn password(client: &Client) -> Result<Option<String>, ErrorCode> {
    match client.request(&Request::GetBackupPassword { udid: UDID.parse().unwrap() }).await {
        Ok(Response::BackupPassword { password }) => Ok(password.map(|p| p.expose().clone())),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e.code().unwrap()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reads_only_within_its_jobs_and_leases() {
    let Some(fx) = start_server().await else { return };
    let tenant = fx.tenant("acme").await;
    let other = fx.tenant("globex").await;
    let db = fx.db.client().await;
    // A backs the phone up; B is another workstation of the same tenant.
    let (a, keys) = fx.enrolled_agent(tenant).await;
    let (b, _) = fx.enrolled_agent(tenant).await;
    let tree = tempfile::tempdir().unwrap();
    lifeboat_e2e::make_tree(tree.path(), 30, 3 << 20, 21).unwrap();
    let dev = device(UDID);
    let (run, snapshot) = open_run(&a, &dev).await;
    // Under its lease A escrows and reads the phone's password; B may do neither.
    assert_eq!(put(&a, "8fK2-mQ9x-Lp4W-zR7c").await, Ok(Response::Ok));
    assert_eq!(password(&a).await, Ok(Some("8fK2-mQ9x-Lp4W-zR7c".into())));
    assert_eq!(password(&b).await, Err(ErrorCode::NotFound));
    assert_eq!(put(&b, "mine now").await, Err(ErrorCode::NotFound));
    transfer::upload_dir(&a, &keys, run, snapshot, dev.clone(), tree.path(), 0).await.unwrap();
    assert_eq!(password(&a).await, Err(ErrorCode::NotFound), "the lease ended with the commit");

    // The snapshot's real ids, read on the server.
    let manifest = {
        let app = &fx.server.app;
        let key = lifeboat_server::store::snapshots::manifest_key(&db, tenant, snapshot).await.unwrap().unwrap();
        let k = app.tenant_keys(tenant).await.unwrap();
        lifeboat_server::restore::read::manifest(&app.storage, &k, snapshot, &key).await.unwrap()
    };
    let mut ids: Vec<ChunkId> = manifest.files.iter().flat_map(|f| f.chunks.iter().map(|c| c.id)).collect();
    ids.sort();
    ids.dedup();
    assert!(ids.len() > 30, "{}", ids.len());

    // Without a job, B — and A, which uploaded it — get what a missing snapshot gets.
    let unknown = SnapshotId(uuid::Uuid::new_v4());
    let missing = b.get_manifest(unknown).await.unwrap_err().to_string().replace(&unknown.to_string(), "S");
    assert!(missing.contains("no snapshot S"), "{missing}");
    for c in [&a, &b] {
        let err = c.get_manifest(snapshot).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotFound));
        assert_eq!(err.to_string().replace(&snapshot.to_string(), "S"), missing);
    }
    let fake: Vec<ChunkId> = (0..ids.len()).map(|i| ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes())).collect();
    let not_stored = b.get_chunks(&fake).await.unwrap_err();
    let err = b.get_chunks(&ids).await.unwrap_err();
    assert_eq!((err.code(), err.to_string()), (not_stored.code(), not_stored.to_string()));
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert_eq!(b.get_chunks(&ids[..1]).await.unwrap_err().code(), Some(ErrorCode::NotFound));
    assert_eq!(refused(&fx, "GetManifest"), 3);
    assert_eq!(refused(&fx, "GetChunks"), 3);
    assert_eq!(refused(&fx, "GetBackupPassword"), 2);
    assert_eq!(refused(&fx, "PutBackupPassword"), 1);

    // A job needs a help-desk user of this tenant.
    let export = || JobRequest::Export { source: JobSource::LatestOf(UDID.parse().unwrap()) };
    let viewer = lifeboat_server::users::create(&db, tenant, "front desk", lifeboat_server::users::Role::Viewer, None)
        .await
        .unwrap()
        .1;
    let elsewhere = lifeboat_e2e::helpdesk_credential(&db, other).await;
    let (helpdesk, credential) = lifeboat_server::users::create(
        &db,
        tenant,
        "anna at the help desk",
        lifeboat_server::users::Role::Helpdesk,
        None,
    )
    .await
    .unwrap();
    let bad = "Some(BadCredential): the server refused: the help-desk credential is unknown, revoked or of another tenant \
               (BadCredential)";
    assert_eq!(start(&b, "lbu1_forged", export()).await.unwrap_err(), bad);
    assert_eq!(start(&b, &elsewhere, export()).await.unwrap_err(), bad);
    let err = start(&b, &viewer, export()).await.unwrap_err();
    assert!(
        err.starts_with("Some(Forbidden)") && err.contains("restores and exports need the helpdesk or admin role"),
        "{err}"
    );
    let too_long = format!("lbu1_{}", "x".repeat(300));
    assert!(start(&b, &too_long, export()).await.unwrap_err().starts_with("Some(Malformed)"));

    // With one, B's job reads the snapshot, chunks and password; the job records its creator.
    let Response::RestoreJob { job, snapshot: s } = start(&b, &credential, export()).await.unwrap() else { panic!() };
    assert_eq!(s, snapshot);
    let out = tempfile::tempdir().unwrap();
    transfer::download_snapshot(&b, &keys, snapshot, out.path()).await.unwrap();
    assert!(lifeboat_e2e::read_tree(tree.path()) == lifeboat_e2e::read_tree(out.path()), "B's export differs");
    assert_eq!(password(&b).await, Ok(Some("8fK2-mQ9x-Lp4W-zR7c".into())), "a job on the device's snapshot");
    assert!(a.get_manifest(snapshot).await.is_err(), "B's job is none of A's");
    let row = db
        .query_one("SELECT requested_by, kind, status, target_udid IS NULL FROM restore_jobs WHERE id = $1", &[&job.0])
        .await
        .unwrap();
    let recorded: (uuid::Uuid, String, String, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(recorded, (helpdesk, "export".into(), "running".into(), true));
    let audit = db
        .query_one(
            "SELECT actor_user, actor_agent, udid FROM audit_events WHERE action = 'export.start' AND detail->>'job' = $1",
            &[&job.0.to_string()],
        )
        .await
        .unwrap();
    let audited: (uuid::Uuid, uuid::Uuid, String) = (audit.get(0), audit.get(1), audit.get(2));
    assert_eq!(audited, (helpdesk, b.accepted.agent.0, UDID.to_string()));

    // Once the job ends, nothing more.
    lifeboat_e2e::end_job(&b, job).await;
    assert_eq!(b.get_manifest(snapshot).await.unwrap_err().code(), Some(ErrorCode::NotFound));
    assert_eq!(b.get_chunks(&ids).await.unwrap_err().code(), Some(ErrorCode::NotFound));
    assert_eq!(password(&b).await, Err(ErrorCode::NotFound));

    // A revoked agent reads nothing, even inside a job it holds, on a connection it had.
    let Response::RestoreJob { .. } = start(&b, &credential, export()).await.unwrap() else { panic!() };
    assert!(b.get_manifest(snapshot).await.is_ok());
    assert_eq!(auth::revoke(&db, b.accepted.agent).await.unwrap(), Some(tenant));
    assert_eq!(b.get_manifest(snapshot).await.unwrap_err().code(), Some(ErrorCode::NotFound));
    assert_eq!(b.get_chunks(&ids[..1]).await.unwrap_err().code(), Some(ErrorCode::NotFound));
    assert_eq!(password(&b).await, Err(ErrorCode::NotFound));
    fx.server.stop().await.unwrap();
}
