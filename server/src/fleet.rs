//! Background jobs over the whole fleet:
//! - the fleet gauges: device status, last successful backups, waiting devices, agents,
//!   restore-test results and coverage, storage — read from PostgreSQL on an interval so
//!   every replica exports the same truth;
//! - the restore-test runner: one runner across replicas (a PostgreSQL advisory lock),
//!   testing new snapshots right away (a configurable sample), every snapshot once it is
//!   older than the window if it was not sampled, and every snapshot again when its last
//!   test is older than the window; one snapshot at a time, at most 16 a pass, so I/O
//!   stays bounded.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lifeboat_shared::ids::{SnapshotId, TenantId};

use crate::ingest::Hub;
use crate::metrics::FleetMetrics;
use crate::verify;

/// Snapshots tested per pass of the runner at most: bounds the I/O of one pass.
const RESTORE_TESTS_PER_PASS: i64 = 16;

/// Advisory lock key held by the restore-test runner ("lbverify").
pub const RESTORE_TEST_LOCK_KEY: i64 = 0x6c62_7665_7269_6679;

/// Settings of the fleet jobs (`[monitoring]` and `[restore_tests]` in the configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// How often the fleet gauges are refreshed.
    pub refresh: Duration,
    /// A device without a committed snapshot for this long is stale.
    pub stale_after: Duration,
    pub restore_tests: bool,
    /// How often the runner looks for work.
    pub restore_test_interval: Duration,
    /// Share (0–100) of new snapshots tested right after they are committed.
    pub restore_test_sample_percent: u8,
    /// A device's newest snapshot is tested again when its last test is older than this;
    /// also the coverage window.
    pub restore_test_window: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(15),
            stale_after: Duration::from_secs(3 * 86400),
            restore_tests: true,
            restore_test_interval: Duration::from_secs(60),
            restore_test_sample_percent: 100,
            restore_test_window: Duration::from_secs(7 * 86400),
        }
    }
}

/// Runs both jobs until the future is dropped.
pub async fn run(hub: Arc<Hub>, config: FleetConfig) {
    let gauges = async {
        let mut every = tokio::time::interval(config.refresh);
        let mut known = Known::default();
        loop {
            every.tick().await;
            if let Err(e) = refresh(&hub, &config, &mut known).await {
                tracing::warn!(error = %e, "refreshing fleet metrics");
            }
        }
    };
    let tests = async {
        if !config.restore_tests {
            return std::future::pending().await;
        }
        let mut every = tokio::time::interval(config.restore_test_interval);
        loop {
            every.tick().await;
            match restore_test_pass(&hub, &config).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(snapshots = n, "restore tests done"),
                Err(e) => tracing::warn!(error = %e, "restore tests"),
            }
        }
    };
    tokio::join!(gauges, tests);
}

/// Label sets exported by the previous refresh, so series of deleted devices and agents go away.
#[derive(Debug, Default)]
pub struct Known {
    devices: HashSet<(String, String)>,
    agents: HashSet<(String, String)>,
    tenants: HashSet<String>,
}

/// Refreshes the fleet gauges from the database once.
pub async fn refresh(hub: &Hub, config: &FleetConfig, known: &mut Known) -> Result<(), String> {
    let client = hub.db.get().await.map_err(|e| e.to_string())?;
    let m: &FleetMetrics = &hub.metrics.fleet;
    let stale = config.stale_after.as_secs_f64();
    let rows = client
        .query(
            "WITH last AS (SELECT tenant_id, udid, max(committed_at) AS at FROM snapshots GROUP BY tenant_id, udid) \
             SELECT t.name, d.udid, d.state, extract(epoch FROM d.state_changed_at)::float8, \
                    extract(epoch FROM l.at)::float8, \
                    (SELECT count(*) FROM backup_runs r WHERE r.tenant_id = d.tenant_id AND r.udid = d.udid \
                       AND r.status = 'failed' AND r.finished_at > coalesce(l.at, '-infinity')) \
             FROM devices d JOIN tenants t ON t.id = d.tenant_id \
             LEFT JOIN last l ON l.tenant_id = d.tenant_id AND l.udid = d.udid",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let mut by_status: std::collections::HashMap<(String, &str), i64> = std::collections::HashMap::new();
    let mut devices = HashSet::new();
    let mut tenants: HashSet<String> = HashSet::new();
    for r in &rows {
        let (tenant, udid, state): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let changed: f64 = r.get(3);
        let last: Option<f64> = r.get(4);
        let failed: i64 = r.get(5);
        let waiting = matches!(state.as_str(), "needs-trust" | "needs-passcode");
        let status = if waiting {
            "needs-action"
        } else if state == "failing" || failed > 0 {
            "failing"
        } else if last.is_some_and(|t| now - t <= stale) {
            "protected"
        } else {
            "stale"
        };
        *by_status.entry((tenant.clone(), status)).or_default() += 1;
        let labels = [tenant.as_str(), udid.as_str()];
        match last {
            Some(t) => m.device_last_success.with_label_values(&labels).set(t),
            None => {
                let _ = m.device_last_success.remove_label_values(&labels);
            }
        }
        m.device_failed_runs.with_label_values(&labels).set(failed);
        m.device_needs_action_since.with_label_values(&labels).set(if waiting { changed } else { 0.0 });
        tenants.insert(tenant.clone());
        devices.insert((tenant, udid));
    }
    for gone in known.devices.difference(&devices) {
        let labels = [gone.0.as_str(), gone.1.as_str()];
        let _ = m.device_last_success.remove_label_values(&labels);
        let _ = m.device_failed_runs.remove_label_values(&labels);
        let _ = m.device_needs_action_since.remove_label_values(&labels);
    }
    known.devices = devices;

    let tenant_rows = client
        .query(
            "SELECT t.name, \
               (SELECT extract(epoch FROM max(finished_at))::float8 FROM restore_tests r WHERE r.tenant_id = t.id AND r.passed), \
               (SELECT count(*) FROM (SELECT DISTINCT ON (snapshot_id) passed FROM restore_tests r \
                  WHERE r.tenant_id = t.id ORDER BY snapshot_id, finished_at DESC) latest WHERE NOT passed), \
               (SELECT count(*) FROM devices d WHERE d.tenant_id = t.id), \
               (SELECT count(DISTINCT s.udid) FROM restore_tests r JOIN snapshots s ON s.tenant_id = r.tenant_id AND s.id = r.snapshot_id \
                  WHERE r.tenant_id = t.id AND r.passed AND r.finished_at > now() - make_interval(secs => $1)), \
               (SELECT coalesce(sum(size_bytes), 0)::bigint FROM packs p WHERE p.tenant_id = t.id), \
               (SELECT count(*) FROM snapshots s WHERE s.tenant_id = t.id) \
             FROM tenants t",
            &[&config.restore_test_window.as_secs_f64()],
        )
        .await
        .map_err(|e| e.to_string())?;
    for r in &tenant_rows {
        let tenant: String = r.get(0);
        let t = [tenant.as_str()];
        match r.get::<_, Option<f64>>(1) {
            Some(at) => m.restore_test_last_success.with_label_values(&t).set(at),
            None => {
                let _ = m.restore_test_last_success.remove_label_values(&t);
            }
        }
        m.restore_tests_failing.with_label_values(&t).set(r.get(2));
        let (devices, covered): (i64, i64) = (r.get(3), r.get(4));
        m.restore_test_coverage.with_label_values(&t).set(if devices == 0 {
            1.0
        } else {
            covered as f64 / devices as f64
        });
        m.storage_bytes.with_label_values(&t).set(r.get(5));
        m.snapshots.with_label_values(&t).set(r.get(6));
        for status in ["protected", "stale", "needs-action", "failing"] {
            let n = by_status.get(&(tenant.clone(), status)).copied().unwrap_or(0);
            m.devices.with_label_values(&[tenant.as_str(), status]).set(n);
        }
        tenants.insert(tenant);
    }
    for gone in known.tenants.difference(&tenants) {
        let t = [gone.as_str()];
        let _ = m.restore_test_last_success.remove_label_values(&t);
        let _ = m.restore_tests_failing.remove_label_values(&t);
        let _ = m.restore_test_coverage.remove_label_values(&t);
        let _ = m.storage_bytes.remove_label_values(&t);
        let _ = m.snapshots.remove_label_values(&t);
        for status in ["protected", "stale", "needs-action", "failing"] {
            let _ = m.devices.remove_label_values(&[gone.as_str(), status]);
        }
    }
    known.tenants = tenants;

    let agent_rows = client
        .query(
            "SELECT t.name, a.id::text, extract(epoch FROM coalesce(a.last_seen_at, a.enrolled_at))::float8 \
             FROM agents a JOIN tenants t ON t.id = a.tenant_id WHERE a.revoked_at IS NULL",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut agents = HashSet::new();
    for r in &agent_rows {
        let (tenant, agent): (String, String) = (r.get(0), r.get(1));
        m.agent_last_seen.with_label_values(&[tenant.as_str(), agent.as_str()]).set(r.get(2));
        agents.insert((tenant, agent));
    }
    for gone in known.agents.difference(&agents) {
        let _ = m.agent_last_seen.remove_label_values(&[gone.0.as_str(), gone.1.as_str()]);
    }
    known.agents = agents;
    Ok(())
}

/// Whether a freshly committed snapshot is in the sample tested right away.
fn sampled(snapshot: &SnapshotId, percent: u8) -> bool {
    u32::from(snapshot.0.as_bytes()[15]) * 100 / 256 < u32::from(percent)
}

/// One pass of the runner, if this replica holds the lock: returns how many snapshots it tested.
pub async fn restore_test_pass(hub: &Hub, config: &FleetConfig) -> Result<usize, String> {
    let client = hub.db.get().await.map_err(|e| e.to_string())?;
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&RESTORE_TEST_LOCK_KEY])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if !locked {
        return Ok(0);
    }
    let result = async {
        // Snapshots never tested, and snapshots whose last test is older than the window —
        // every snapshot, not only the newest, so old ones stay proven restorable —
        // newest first, a bounded number per pass.
        let rows = client
            .query(
                "SELECT s.tenant_id, s.id, r.last IS NULL FROM snapshots s \
                 LEFT JOIN LATERAL (SELECT max(finished_at) AS last FROM restore_tests r \
                   WHERE r.tenant_id = s.tenant_id AND r.snapshot_id = s.id) r ON true \
                 WHERE r.last IS NULL OR r.last < now() - make_interval(secs => $1) \
                 ORDER BY s.committed_at DESC LIMIT $2",
                &[&config.restore_test_window.as_secs_f64(), &RESTORE_TESTS_PER_PASS],
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut done = 0;
        for r in rows {
            let (tenant, snapshot) = (TenantId(r.get(0)), SnapshotId(r.get(1)));
            let never_tested: bool = r.get(2);
            // New snapshots are tested right away only if sampled; every one is tested on schedule.
            let due = !never_tested || sampled(&snapshot, config.restore_test_sample_percent) || {
                let age: Option<bool> = client
                    .query_one(
                        "SELECT committed_at < now() - make_interval(secs => $3) FROM snapshots \
                         WHERE tenant_id = $1 AND id = $2",
                        &[&tenant.0, &snapshot.0, &config.restore_test_window.as_secs_f64()],
                    )
                    .await
                    .map_err(|e| e.to_string())?
                    .get(0);
                age.unwrap_or(false)
            };
            if !due {
                continue;
            }
            let keys = hub.tenant_keys(tenant).await.map_err(|r| r.message)?;
            let started = SystemTime::now();
            let report =
                verify::verify_snapshot(&client, &hub.storage, &keys, snapshot, |_| {}).await.map_err(|e| e.to_string())?;
            verify::record(&client, tenant, &report, started).await.map_err(|e| e.to_string())?;
            hub.metrics.restore_tests.with_label_values(&[if report.passed { "passed" } else { "failed" }]).inc();
            hub.metrics.restore_test_duration.observe(report.seconds);
            if !report.passed {
                tracing::warn!(tenant.id = %tenant, snapshot.id = %snapshot, problems = ?report.problems, "restore test failed");
            }
            done += 1;
        }
        Ok(done)
    }
    .await;
    let _ = client.query_one("SELECT pg_advisory_unlock($1)", &[&RESTORE_TEST_LOCK_KEY]).await;
    result
}
