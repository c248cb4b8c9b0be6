//! Background jobs, each on its own task under one runner: the fleet gauges (`gauges`),
//! restore tests (`restore_tests`) and housekeeping (ended console sessions, expired
//! audit events); later retention, GC and copies.
//!
//! Each job runs a pass on its interval, independently of the others (a slow restore
//! test never delays the gauges). A job that must run once across replicas takes its
//! PostgreSQL job lock first (`store::locks`), released with its connection however the
//! pass ends — returned, failed, panicked or cancelled. A failed or panicked pass is
//! logged and counted (`lifeboat_job_failures_total`); a good one sets
//! `lifeboat_job_last_success_timestamp_seconds`, so an alert sees a job that stopped.
//! Never here: SQL of its own (the jobs ask `store`), or work done on an agent's request.

pub mod gauges;
pub mod restore_tests;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::app::App;
use crate::store::locks;

/// Advisory lock key held by the restore-test runner ("lbverify").
pub const RESTORE_TEST_LOCK_KEY: i64 = 0x6c62_7665_7269_6679;
/// Advisory lock key held by housekeeping ("lbhouse!").
pub const HOUSEKEEPING_LOCK_KEY: i64 = 0x6c62_686f_7573_6521;

pub use crate::config::FleetConfig;

/// One background job: its name (the metrics' `job` label), how often it runs, and the
/// lock that makes it run on one replica at a time (`None`: every replica runs it).
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub name: &'static str,
    pub every: Duration,
    pub lock: Option<i64>,
}

/// How one pass ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Another replica holds the job's lock.
    Skipped,
    Failed(String),
    Panicked(String),
}

/// Aborts the task when dropped: a pass cancelled with its runner does not go on alone.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one pass of `job`: takes its lock, runs `work` on a task of its own (so a panic
/// is caught here), records the outcome in the metrics and the log.
pub async fn pass<F>(app: &App, job: Job, work: F) -> Outcome
where
    F: Future<Output = Result<(), String>> + Send + 'static,
{
    let _lock = match job.lock {
        None => None,
        Some(key) => match locks::try_lock(&app.db, key).await {
            Ok(Some(lock)) => Some(lock),
            Ok(None) => return Outcome::Skipped,
            Err(e) => return failed(app, job, Outcome::Failed(format!("taking the job lock: {e}"))),
        },
    };
    let mut task = AbortOnDrop(tokio::spawn(work));
    let outcome = match (&mut task.0).await {
        Ok(Ok(())) => Outcome::Done,
        Ok(Err(e)) => Outcome::Failed(e),
        Err(e) if e.is_panic() => {
            let p = e.into_panic();
            let what = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Outcome::Panicked(what)
        }
        Err(e) => Outcome::Failed(e.to_string()),
    };
    match outcome {
        Outcome::Done => {
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
            app.metrics.job_last_success.with_label_values(&[job.name]).set(now);
            Outcome::Done
        }
        other => failed(app, job, other),
    }
    // `_lock` drops here: its connection closes and PostgreSQL releases the lock.
}

fn failed(app: &App, job: Job, outcome: Outcome) -> Outcome {
    app.metrics.job_failures.with_label_values(&[job.name]).inc();
    match &outcome {
        Outcome::Panicked(what) => tracing::error!(job = job.name, panic = %what, "background job panicked"),
        Outcome::Failed(e) => tracing::warn!(job = job.name, error = %e, "background job failed"),
        _ => {}
    }
    outcome
}

/// Runs `job` every `job.every` until dropped; `make` builds each pass's work.
pub async fn every<F, W>(app: Arc<App>, job: Job, mut make: F)
where
    F: FnMut() -> W,
    W: Future<Output = Result<(), String>> + Send + 'static,
{
    let mut tick = tokio::time::interval(job.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        pass(&app, job, make()).await;
    }
}

/// Ended console sessions and old sign-in failures removed; audit events past their
/// retention expired, tenant by tenant.
async fn housekeeping(app: &App, retention: Duration) -> Result<(), String> {
    let mut client = app.db.get().await.map_err(|e| e.to_string())?;
    let sessions = crate::store::console::sweep(&client, app.console.idle.as_secs() as i64)
        .await
        .map_err(|e| format!("sweeping console sessions: {e}"))?;
    let days = i32::try_from(retention.as_secs() / 86400).unwrap_or(i32::MAX);
    let mut expired = 0;
    for t in crate::store::tenants::list(&client).await.map_err(|e| e.to_string())? {
        expired += crate::store::audit::expire(&mut client, t.id, days)
            .await
            .map_err(|e| format!("expiring audit events of tenant {}: {e}", t.name))?;
    }
    if sessions > 0 || expired > 0 {
        tracing::info!(sessions, audit_events = expired, retention_days = days, "housekeeping done");
    }
    Ok(())
}

/// Runs every job until the future is dropped.
pub async fn run(app: Arc<App>, config: FleetConfig) {
    // Until its first good pass, a job's last success is this start: a job that fails
    // from the start has a series that ages, so the alert on it can fire.
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let mut names = vec!["fleet-gauges", "housekeeping"];
    if config.restore_tests {
        names.push("restore-tests");
    }
    for name in names {
        app.metrics.job_last_success.with_label_values(&[name]).set(now);
    }
    let config = Arc::new(config);
    let gauges = {
        let (app, config) = (app.clone(), config.clone());
        let known = Arc::new(tokio::sync::Mutex::new(gauges::Known::default()));
        every(app.clone(), Job { name: "fleet-gauges", every: config.refresh, lock: None }, move || {
            let (app, config, known) = (app.clone(), config.clone(), known.clone());
            async move { gauges::refresh(&app, &config, &mut *known.lock().await).await }
        })
    };
    let housekeeping = {
        let (app, retention) = (app.clone(), config.audit_retention);
        let job = Job { name: "housekeeping", every: Duration::from_secs(900), lock: Some(HOUSEKEEPING_LOCK_KEY) };
        every(app.clone(), job, move || {
            let app = app.clone();
            async move { housekeeping(&app, retention).await }
        })
    };
    let tests = async move {
        if !config.restore_tests {
            return std::future::pending().await;
        }
        let job = Job { name: "restore-tests", every: config.restore_test_interval, lock: Some(RESTORE_TEST_LOCK_KEY) };
        every(app.clone(), job, || {
            let (app, config) = (app.clone(), config.clone());
            async move {
                let n = restore_tests::pass(&app, &config).await?;
                if n > 0 {
                    tracing::info!(snapshots = n, "restore tests done");
                }
                Ok(())
            }
        })
        .await;
    };
    // Each on its own task: one job's slow pass never delays another's.
    let (mut g, mut t, mut h) =
        (AbortOnDrop(tokio::spawn(gauges)), AbortOnDrop(tokio::spawn(tests)), AbortOnDrop(tokio::spawn(housekeeping)));
    let _ = tokio::join!(&mut g.0, &mut t.0, &mut h.0);
}
