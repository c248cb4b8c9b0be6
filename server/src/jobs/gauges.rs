//! The fleet gauges: device status, last successful backups, waiting devices, agents,
//! restore-test results and coverage, storage — read from PostgreSQL on an interval so
//! every replica exports the same truth.

use std::collections::HashSet;
use std::time::SystemTime;

use super::FleetConfig;
use crate::app::App;
use crate::config::{PER_DEVICE_AUTO_LIMIT, PerDeviceSeries};
use crate::platform::metrics::FleetMetrics;
use crate::store;

/// Label sets exported by the previous refresh, so series of deleted devices and agents go away.
#[derive(Debug, Default)]
pub struct Known {
    devices: HashSet<(String, String)>,
    agents: HashSet<(String, String)>,
    tenants: HashSet<String>,
}

/// Refreshes the fleet gauges from the database once.
pub async fn refresh(app: &App, config: &FleetConfig, known: &mut Known) -> Result<(), String> {
    let client = app.db.get().await.map_err(|e| e.to_string())?;
    let m: &FleetMetrics = &app.metrics.fleet;
    let stale = config.stale_after.as_secs_f64();
    m.stale_after.set(stale);
    m.needs_action_after.set(config.needs_action_after.as_secs_f64());
    let rows = store::fleet::devices(&client).await.map_err(|e| e.to_string())?;
    let agent_rows = store::fleet::agents(&client).await.map_err(|e| e.to_string())?;
    let per_device = match config.per_device_series {
        PerDeviceSeries::On => true,
        PerDeviceSeries::Off => false,
        PerDeviceSeries::Auto => rows.len() <= PER_DEVICE_AUTO_LIMIT && agent_rows.len() <= PER_DEVICE_AUTO_LIMIT,
    };
    m.per_device_series.set(i64::from(per_device));
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let mut by_status: std::collections::HashMap<(String, &str), i64> = std::collections::HashMap::new();
    let mut devices = HashSet::new();
    let mut tenants: HashSet<String> = HashSet::new();
    for r in rows {
        let store::fleet::DeviceStanding {
            tenant,
            udid,
            state,
            needs_action_since_unix: waiting_since,
            first_seen_unix: first_seen,
            last_success_unix: last,
            failed_since_success: failed,
        } = r;
        // Waiting for a person from the first time in this episode until the next
        // successful backup, through the agent's retries.
        let waiting = waiting_since.is_some()
            || matches!(state.as_str(), "needs-trust" | "needs-passcode" | "needs-backup-password");
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
        tenants.insert(tenant.clone());
        if !per_device {
            continue;
        }
        let labels = [tenant.as_str(), udid.as_str()];
        match last {
            Some(t) => m.device_last_success.with_label_values(&labels).set(t),
            None => {
                let _ = m.device_last_success.remove_label_values(&labels);
            }
        }
        m.device_failed_runs.with_label_values(&labels).set(failed);
        m.device_needs_action_since.with_label_values(&labels).set(waiting_since.unwrap_or(0.0));
        m.device_first_seen.with_label_values(&labels).set(first_seen);
        devices.insert((tenant, udid));
    }
    for gone in known.devices.difference(&devices) {
        let labels = [gone.0.as_str(), gone.1.as_str()];
        let _ = m.device_last_success.remove_label_values(&labels);
        let _ = m.device_failed_runs.remove_label_values(&labels);
        let _ = m.device_needs_action_since.remove_label_values(&labels);
        let _ = m.device_first_seen.remove_label_values(&labels);
    }
    known.devices = devices;

    let tenant_rows = store::fleet::tenants(&client, config.restore_test_window).await.map_err(|e| e.to_string())?;
    for r in tenant_rows {
        let tenant = r.tenant;
        let t = [tenant.as_str()];
        match r.restore_test_last_success_unix {
            Some(at) => m.restore_test_last_success.with_label_values(&t).set(at),
            None => {
                let _ = m.restore_test_last_success.remove_label_values(&t);
            }
        }
        m.restore_tests_failing.with_label_values(&t).set(r.restore_tests_failing);
        m.latest_unrestorable.with_label_values(&t).set(r.latest_unrestorable);
        let (devices, covered) = (r.devices, r.devices_covered);
        m.restore_test_coverage.with_label_values(&t).set(if devices == 0 {
            1.0
        } else {
            covered as f64 / devices as f64
        });
        m.storage_bytes.with_label_values(&t).set(r.stored_bytes);
        m.snapshots.with_label_values(&t).set(r.snapshots);
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
        let _ = m.latest_unrestorable.remove_label_values(&t);
        let _ = m.restore_test_coverage.remove_label_values(&t);
        let _ = m.storage_bytes.remove_label_values(&t);
        let _ = m.snapshots.remove_label_values(&t);
        for status in ["protected", "stale", "needs-action", "failing"] {
            let _ = m.devices.remove_label_values(&[gone.as_str(), status]);
        }
    }
    known.tenants = tenants;

    let mut agents = HashSet::new();
    for (tenant, agent, seen) in agent_rows.into_iter().filter(|_| per_device) {
        m.agent_last_seen.with_label_values(&[tenant.as_str(), agent.as_str()]).set(seen);
        agents.insert((tenant, agent));
    }
    for gone in known.agents.difference(&agents) {
        let _ = m.agent_last_seen.remove_label_values(&[gone.0.as_str(), gone.1.as_str()]);
    }
    known.agents = agents;
    Ok(())
}
