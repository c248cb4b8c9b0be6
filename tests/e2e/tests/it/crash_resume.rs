//! A server killed with SIGKILL in the middle of an upload shows no snapshot, and after a
//! restart the same run resumes without re-sending chunks that reached a durable pack.

use std::time::Duration;

use lifeboat_agent::net::Client;
use lifeboat_agent::pipeline::transfer::{self, Keys};
use lifeboat_e2e::{ServerProcess, embedded_db, eventually, have_postgres, make_tree, read_tree, server_cli, tempdir};
use lifeboat_server::agents::auth::EnrollToken;
use lifeboat_shared::manifest::DeviceInfo;
use lifeboat_shared::wire::{Auth, ErrorCode, Request, Response};
use nix::sys::signal::Signal;

#[tokio::test]
async fn sigkill_mid_upload_leaves_no_snapshot_and_the_run_resumes() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    let data = dir.path().join("data");
    let mut server = ServerProcess::start(&data, &[]).unwrap();
    let (ok, _, err) = server_cli(&data, &["tenant", "create", "acme"]);
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
    // The agent would notice at its idle timeout; the test need not wait for that.
    upload.abort();
    assert!(!matches!(upload.await, Ok(Ok(()))), "the upload completed although the server was killed");
    let keys = Keys::from_bytes(enrolled.id_key, enrolled.data_key);
    assert!(eventually(Duration::from_secs(15), || lifeboat_e2e::postgres_processes_under(&data).is_empty()));

    let server = ServerProcess::start(&data, &[]).unwrap();
    let db = embedded_db(&data).await;
    let snapshots: i64 = db.query_one("SELECT count(*) FROM snapshots", &[]).await.unwrap().get(0);
    assert_eq!(snapshots, 0, "a partial snapshot is visible");
    let indexed: i64 = db.query_one("SELECT count(*) FROM chunks", &[]).await.unwrap().get(0);
    assert!(indexed > 0);

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
    assert_eq!(
        report.chunks_sent,
        report.chunks - indexed as u64,
        "re-sent chunks the server already held: {report:?}, {indexed} indexed before the restart"
    );
    let out = tempfile::tempdir().unwrap();
    transfer::download_snapshot(&client, &keys, snapshot, out.path()).await.unwrap();
    assert!(read_tree(tree.path()) == read_tree(out.path()), "restored tree differs");
}
