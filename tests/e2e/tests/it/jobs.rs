//! The background job runner against a real PostgreSQL: a job's lock is released however
//! its pass ends, and a failure or panic is logged and counted, never lost.
//! Regressions of the server layout issue (#24): the runner took a session advisory lock
//! on a pooled connection (a cancellation or panic left it held), shared one `join!`
//! between the jobs, and dropped a panic silently.

use std::time::{Duration, Instant};

use lifeboat_server::jobs::{self, Job, Outcome};
use lifeboat_server::store::locks;

use crate::ingest::start_server;

const KEY: i64 = 0x7465_7374_6a6f_6273;

async fn until_released(db: &tokio_postgres::Client, key: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while locks::held(db, key).await.unwrap() {
        assert!(Instant::now() < deadline, "the job lock is still held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_job_that_panics_is_counted_and_its_lock_released() {
    let Some(fx) = start_server().await else { return };
    let (app, db) = (fx.server.app.clone(), fx.db.client().await);
    let job = Job { name: "test-panics", every: Duration::from_secs(60), lock: Some(KEY) };

    // Positive control: what the old runner did. A session lock taken on a pooled
    // connection by work that panics before its unlock stays held once the connection
    // is back in the pool — the check below can see a held lock.
    let pooled = app.db.get().await.unwrap();
    let locked: bool = pooled.query_one("SELECT pg_try_advisory_lock($1)", &[&KEY]).await.unwrap().get(0);
    assert!(locked);
    drop(pooled);
    assert!(locks::held(&db, KEY).await.unwrap(), "a lock on a pooled connection outlives its work");
    // Only ending that pooled session frees it.
    db.query_one(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' \
         AND ((classid::bigint << 32) | objid::bigint) = $1",
        &[&KEY],
    )
    .await
    .unwrap();
    until_released(&db, KEY).await;

    let outcome = jobs::pass(&app, job, async { panic!("boom") }).await;
    assert_eq!(outcome, Outcome::Panicked("boom".into()));
    until_released(&db, KEY).await;
    let failed = jobs::pass(&app, job, async { Err("the storage said no".to_string()) }).await;
    assert_eq!(failed, Outcome::Failed("the storage said no".into()));
    until_released(&db, KEY).await;
    assert_eq!(app.metrics.job_failures.with_label_values(&["test-panics"]).get(), 2);
    assert!(!app.metrics.render().contains("lifeboat_job_last_success_timestamp_seconds{job=\"test-panics\"}"));

    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert_eq!(jobs::pass(&app, job, async { Ok(()) }).await, Outcome::Done);
    let at = app.metrics.job_last_success.with_label_values(&["test-panics"]).get();
    assert!(at >= before.floor(), "last success {at}, the pass began at {before}");
    until_released(&db, KEY).await;
    fx.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_cancelled_job_releases_its_lock_and_another_replica_skips_while_it_runs() {
    let Some(fx) = start_server().await else { return };
    let (app, db) = (fx.server.app.clone(), fx.db.client().await);
    let job = Job { name: "test-cancelled", every: Duration::from_secs(60), lock: Some(KEY) };
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let app = app.clone();
        tokio::spawn(async move {
            jobs::pass(&app, job, async move {
                let _dropped = dropped_tx; // dropped when the work is aborted
                let _ = started_tx.send(());
                std::future::pending::<Result<(), String>>().await
            })
            .await
        })
    };
    started_rx.await.unwrap();
    assert!(locks::held(&db, KEY).await.unwrap());
    // While it runs, the same job elsewhere (another replica) does not run.
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = ran.clone();
    let other = jobs::pass(&app, job, async move {
        r.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    })
    .await;
    assert_eq!(other, Outcome::Skipped);
    assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));

    // Shutdown cancels the runner mid-pass: the work is aborted and the lock released.
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    assert!(dropped_rx.await.is_err(), "the pass's work was aborted with it");
    until_released(&db, KEY).await;
    assert_eq!(jobs::pass(&app, job, async { Ok(()) }).await, Outcome::Done);
    fx.server.stop().await.unwrap();
}
