//! The fleet gauges' reads: across every tenant, for the metrics job alone.

use std::time::Duration;

use tokio_postgres::{Client, Error};

/// One device's standing.
#[derive(Debug, Clone)]
pub struct DeviceStanding {
    pub tenant: String,
    pub udid: String,
    pub state: String,
    /// Since when it has waited for a person, across retries (`devices.needs_action_since`).
    pub needs_action_since_unix: Option<f64>,
    pub first_seen_unix: f64,
    pub last_success_unix: Option<f64>,
    /// Failed runs since the last success.
    pub failed_since_success: i64,
}

pub async fn devices(client: &Client) -> Result<Vec<DeviceStanding>, Error> {
    let rows = client
        .query(
            "WITH last AS (SELECT tenant_id, udid, max(committed_at) AS at FROM snapshots GROUP BY tenant_id, udid) \
             SELECT t.name, d.udid, d.state, \
                    extract(epoch FROM l.at)::float8, \
                    extract(epoch FROM d.needs_action_since)::float8, extract(epoch FROM d.first_seen_at)::float8, \
                    (SELECT count(*) FROM backup_runs r WHERE r.tenant_id = d.tenant_id AND r.udid = d.udid \
                       AND r.status = 'failed' AND r.finished_at > coalesce(l.at, '-infinity')) \
             FROM devices d JOIN tenants t ON t.id = d.tenant_id \
             LEFT JOIN last l ON l.tenant_id = d.tenant_id AND l.udid = d.udid",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| DeviceStanding {
            tenant: r.get(0),
            udid: r.get(1),
            state: r.get(2),
            last_success_unix: r.get(3),
            needs_action_since_unix: r.get(4),
            first_seen_unix: r.get(5),
            failed_since_success: r.get(6),
        })
        .collect())
}

/// One tenant's totals.
#[derive(Debug, Clone)]
pub struct TenantTotals {
    pub tenant: String,
    pub restore_test_last_success_unix: Option<f64>,
    pub restore_tests_failing: i64,
    /// Devices whose newest snapshot failed its latest restore test.
    pub latest_unrestorable: i64,
    pub devices: i64,
    /// Devices with a passed restore test within the window.
    pub devices_covered: i64,
    pub stored_bytes: i64,
    pub snapshots: i64,
}

pub async fn tenants(client: &Client, window: Duration) -> Result<Vec<TenantTotals>, Error> {
    let rows = client
        .query(
            "SELECT t.name, \
               (SELECT extract(epoch FROM max(finished_at))::float8 FROM restore_tests r WHERE r.tenant_id = t.id AND r.passed), \
               (SELECT count(*) FROM (SELECT DISTINCT ON (snapshot_id) passed FROM restore_tests r \
                  WHERE r.tenant_id = t.id ORDER BY snapshot_id, finished_at DESC) latest WHERE NOT passed), \
               (SELECT count(*) FROM (SELECT DISTINCT ON (s.udid) s.id FROM snapshots s WHERE s.tenant_id = t.id \
                  ORDER BY s.udid, s.committed_at DESC) newest \
                  WHERE (SELECT r.passed FROM restore_tests r WHERE r.tenant_id = t.id AND r.snapshot_id = newest.id \
                         ORDER BY r.finished_at DESC LIMIT 1) = false), \
               (SELECT count(*) FROM devices d WHERE d.tenant_id = t.id), \
               (SELECT count(DISTINCT s.udid) FROM restore_tests r JOIN snapshots s ON s.tenant_id = r.tenant_id AND s.id = r.snapshot_id \
                  WHERE r.tenant_id = t.id AND r.passed AND r.finished_at > now() - make_interval(secs => $1)), \
               (SELECT coalesce(sum(size_bytes), 0)::bigint FROM packs p WHERE p.tenant_id = t.id), \
               (SELECT count(*) FROM snapshots s WHERE s.tenant_id = t.id) \
             FROM tenants t",
            &[&window.as_secs_f64()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TenantTotals {
            tenant: r.get(0),
            restore_test_last_success_unix: r.get(1),
            restore_tests_failing: r.get(2),
            latest_unrestorable: r.get(3),
            devices: r.get(4),
            devices_covered: r.get(5),
            stored_bytes: r.get(6),
            snapshots: r.get(7),
        })
        .collect())
}

/// (tenant, agent id, last seen or enrolled) of every unrevoked agent.
pub async fn agents(client: &Client) -> Result<Vec<(String, String, f64)>, Error> {
    let rows = client
        .query(
            "SELECT t.name, a.id::text, extract(epoch FROM coalesce(a.last_seen_at, a.enrolled_at))::float8 \
             FROM agents a JOIN tenants t ON t.id = a.tenant_id WHERE a.revoked_at IS NULL",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
}
