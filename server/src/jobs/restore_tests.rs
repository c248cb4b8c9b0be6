//! The restore-test job: new snapshots right away (a configurable sample), every snapshot
//! once it is older than the window if it was not sampled, and every snapshot again when
//! its last test is older than the window; one snapshot at a time, at most
//! [`RESTORE_TESTS_PER_PASS`] a pass, so I/O stays bounded. One replica at a time runs it
//! (the runner's job lock).

use std::time::SystemTime;

use lifeboat_shared::ids::SnapshotId;

use super::FleetConfig;
use crate::app::App;
use crate::restore::verify;
use crate::store;

/// Snapshots tested per pass of the runner at most: bounds the I/O of one pass.
pub const RESTORE_TESTS_PER_PASS: i64 = 16;

/// Whether a freshly committed snapshot is in the sample tested right away.
fn sampled(snapshot: &SnapshotId, percent: u8) -> bool {
    u32::from(snapshot.0.as_bytes()[15]) * 100 / 256 < u32::from(percent)
}

/// One pass: returns how many snapshots it tested.
pub async fn pass(app: &App, config: &FleetConfig) -> Result<usize, String> {
    let client = app.db.get().await.map_err(|e| e.to_string())?;
    let candidates = store::restore_tests::candidates(&client, config.restore_test_window, RESTORE_TESTS_PER_PASS)
        .await
        .map_err(|e| e.to_string())?;
    let mut done = 0;
    for c in candidates {
        // New snapshots are tested right away only if sampled; every one is tested on schedule.
        let due = !c.never_tested || c.older_than_window || sampled(&c.snapshot, config.restore_test_sample_percent);
        if !due {
            continue;
        }
        let keys = app.tenant_keys(c.tenant).await.map_err(|e| e.to_string())?;
        let started = SystemTime::now();
        let report = verify::verify_snapshot(&client, &app.storage, &keys, &app.scratch, c.snapshot, |_| {})
            .await
            .map_err(|e| e.to_string())?;
        verify::record(&client, c.tenant, &report, started).await.map_err(|e| e.to_string())?;
        app.metrics.restore_tests.with_label_values(&[if report.passed { "passed" } else { "failed" }]).inc();
        app.metrics.restore_test_duration.observe(report.seconds);
        if !report.passed {
            tracing::warn!(tenant.id = %c.tenant, snapshot.id = %c.snapshot, problems = ?report.problems, "restore test failed");
        }
        done += 1;
    }
    Ok(done)
}
