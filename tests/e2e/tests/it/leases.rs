//! Leases that must expire and races that must end in a clear answer: restore jobs left
//! running by a dead agent, and two agents opening a device's first run at once.
//! Regressions of the server layout issue (#24).

use std::time::{Duration, Instant};

use lifeboat_agent::pipeline::transfer;
use lifeboat_e2e::{http_get, http_post_json, make_tree};
use lifeboat_server::users::{self, Role};
use lifeboat_shared::ids::RestoreJobId;
use lifeboat_shared::wire::{ErrorCode, Request, Response, RestoreEnd};
use serde_json::Value;

use crate::ingest::{device, open_run, start_server};

const SOURCE: &str = "00008101-000A1B2C3D4E5F60";
const TARGET: &str = "00008110-000B2C3D4E5F6071";

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Regression (#24): a restore job left `running` by an agent that was killed (or whose
/// `EndRestore` never arrived) was never claimed again, and the one-open-job-per-iPhone
/// index answered 409 to every new restore of that iPhone for ever.
#[tokio::test]
async fn a_stuck_restore_job_shows_as_stuck_is_claimed_again_and_a_new_restore_replaces_it() {
    let Some(fx) = start_server().await else { return };
    let tenant = fx.tenant("acme").await;
    let db = fx.db.client().await;
    let (_, desk) = users::create(&db, tenant, "desk", Role::Helpdesk, None).await.unwrap();
    let (first, keys) = fx.enrolled_agent(tenant).await;
    let tree = tempfile::tempdir().unwrap();
    make_tree(tree.path(), 5, 1 << 20, 1).unwrap();
    let dev = device(SOURCE);
    let (run, snapshot) = open_run(&first, &dev).await;
    transfer::upload_dir(&first, &keys, run, snapshot, dev, tree.path(), 0).await.unwrap();

    let addr = fx.server.http_addr;
    let post = || {
        let desk = desk.clone();
        async move {
            let body = format!(r#"{{"target_udid": "{TARGET}", "from_device": "{SOURCE}"}}"#);
            http_post_json(addr, "/api/v1/restores", Some(&desk), &body).await.unwrap()
        }
    };
    let job_status = |id: String| {
        let desk = desk.clone();
        async move {
            let (status, body) = http_get(addr, &format!("/api/v1/restores/{id}"), Some(&desk)).await.unwrap();
            assert_eq!(status, 200, "{body}");
            json(&body)
        }
    };
    let claim = |client: &lifeboat_agent::net::Client| {
        let req = Request::NextRestore { udid: TARGET.parse().unwrap() };
        let client = client.clone();
        async move {
            match client.request(&req).await.unwrap() {
                Response::RestoreJob { job, snapshot: s } => {
                    assert_eq!(s, snapshot);
                    job
                }
                other => panic!("expected a restore job, got {other:?}"),
            }
        }
    };
    let expire = |job: RestoreJobId| {
        let db = &db;
        async move {
            let n = db
                .execute(
                    "UPDATE restore_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
                    &[&job.0],
                )
                .await
                .unwrap();
            assert_eq!(n, 1);
        }
    };

    let (status, body) = post().await;
    assert_eq!(status, 201, "{body}");
    let job = RestoreJobId(json(&body)["id"].as_str().unwrap().parse().unwrap());
    assert_eq!(claim(&first).await, job);
    let shown = job_status(job.to_string()).await;
    assert_eq!(shown["status"], "running", "{shown}");
    assert_eq!(shown["agent_id"], first.accepted.agent.to_string());
    assert!(shown["lease_expires_at"].as_str().unwrap().ends_with('Z'), "{shown}");
    // While the lease is live, the iPhone has its one open job.
    let (status, body) = post().await;
    assert_eq!(status, 409, "{body}");

    // The agent dies mid-restore; an hour later its lease has run out.
    expire(job).await;
    assert_eq!(job_status(job.to_string()).await["status"], "stuck");
    // The phone is plugged in at another workstation: that agent claims the same job.
    let (second, _) = fx.enrolled_agent(tenant).await;
    assert_eq!(claim(&second).await, job, "a stuck job is claimed again");
    let shown = job_status(job.to_string()).await;
    assert_eq!(
        (shown["status"].as_str(), shown["agent_id"].as_str()),
        (Some("running"), Some(&*second.accepted.agent.to_string()))
    );
    // The dead agent's late report is refused: the job is no longer its own.
    let late = first.request(&Request::EndRestore { job, end: RestoreEnd::Succeeded }).await.unwrap_err();
    assert_eq!(late.code(), Some(ErrorCode::NotFound), "{late}");

    // The second agent dies too; the help desk queues a new restore: it is accepted, and
    // the stuck job ends as failed, lease-expired.
    expire(job).await;
    let (status, body) = post().await;
    assert_eq!(status, 201, "{body}");
    let replacement = RestoreJobId(json(&body)["id"].as_str().unwrap().parse().unwrap());
    assert_ne!(replacement, job);
    let old = job_status(job.to_string()).await;
    assert_eq!((old["status"].as_str(), old["reason"].as_str()), (Some("failed"), Some("lease-expired")), "{old}");
    assert_eq!(claim(&second).await, replacement);
    second.request(&Request::EndRestore { job: replacement, end: RestoreEnd::Succeeded }).await.unwrap();
    assert_eq!(job_status(replacement.to_string()).await["status"], "succeeded");
    assert!(matches!(
        second.request(&Request::NextRestore { udid: TARGET.parse().unwrap() }).await.unwrap(),
        Response::Ok
    ));
    fx.server.stop().await.unwrap();
}

/// Regression (#24): two first-time `OpenRun`s for one device raced — both found no
/// running run, both inserted — and the loser got `Internal` from the unique index
/// instead of `LeaseHeld`. The test holds the table so that both are past their look and
/// waiting to insert, then lets them go.
#[tokio::test]
async fn two_agents_opening_a_first_run_at_once_one_wins_and_the_other_hears_lease_held() {
    let Some(fx) = start_server().await else { return };
    let tenant = fx.tenant("acme").await;
    let (a, _) = fx.enrolled_agent(tenant).await;
    let (b, _) = fx.enrolled_agent(tenant).await;
    let dev = device(SOURCE);
    a.request(&Request::RegisterDevice { device: dev.clone(), serial_number: None }).await.unwrap();

    let mut gate = fx.db.client().await;
    let tx = gate.transaction().await.unwrap();
    // SHARE mode lets SELECT … FOR UPDATE through and holds every INSERT.
    tx.batch_execute("LOCK TABLE backup_runs IN SHARE MODE").await.unwrap();
    let open = |c: &lifeboat_agent::net::Client| {
        let (c, udid) = (c.clone(), dev.udid.clone());
        tokio::spawn(async move { c.request(&Request::OpenRun { udid, resume: None }).await })
    };
    let (ra, rb) = (open(&a), open(&b));
    let watcher = fx.db.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                 WHERE c.relname = 'backup_runs' AND NOT l.granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the two OpenRuns never both waited to insert ({waiting} waiting)");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tx.rollback().await.unwrap();

    let results = [ra.await.unwrap(), rb.await.unwrap()];
    let opened = results.iter().filter(|r| matches!(r, Ok(Response::RunOpened { .. }))).count();
    let held: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| {
            assert_eq!(e.code(), Some(ErrorCode::LeaseHeld), "{e}");
            e.to_string()
        })
        .collect();
    assert_eq!((opened, held.len()), (1, 1), "{results:?}");
    assert!(held[0].contains("another run was opened at the same moment"), "{held:?}");
    assert_eq!(fx.count("SELECT count(*) FROM backup_runs WHERE status = 'running'").await, 1);
    fx.server.stop().await.unwrap();
}
