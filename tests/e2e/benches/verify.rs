//! Benchmark: restore-test verification throughput on one core — every chunk of a
//! snapshot read from local-disk packs, decrypted, decompressed, re-hashed, files
//! reassembled, then the iPhone-backup checks. Target: ≥ 400 MB/s.
//!
//! Run: `cargo bench -p lifeboat-e2e --bench verify` (needs PostgreSQL; results in
//! docs/performance.md).

use std::time::Instant;

use lifeboat_agent::pipeline::transfer;
use lifeboat_e2e::{BackupContent, enrol, make_iphone_backup, open_run, server_config};
use lifeboat_server::restore::verify;
use lifeboat_server::serve;
use lifeboat_server::store::tenants;
use lifeboat_shared::manifest::DeviceInfo;
use lifeboat_test_support as testing;

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (server, db, _dirs, tenant, snapshot) = rt.block_on(setup())?;
    let keys = rt.block_on(server.app.tenant_keys(tenant)).map_err(|e| anyhow::anyhow!(e.to_string()))?;
    let op = server.app.storage.clone();
    // Verification itself on a single-threaded runtime: one core.
    let one = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = one.block_on(db.client());
    for round in 0..3 {
        let start = Instant::now();
        let report =
            one.block_on(verify::verify_snapshot(&client, &op, &keys, &server.app.scratch, snapshot, |_| {}))?;
        let secs = start.elapsed().as_secs_f64();
        anyhow::ensure!(report.passed, "{:?}", report.problems);
        println!(
            "round {round}: verified {} files, {} MiB in {secs:.2} s: {:.0} MB/s",
            report.files_checked,
            report.bytes_checked >> 20,
            report.bytes_checked as f64 / secs / 1e6
        );
    }
    drop(client);
    rt.block_on(server.stop())?;
    Ok(())
}

async fn setup() -> anyhow::Result<(
    serve::Running,
    testing::TestDb,
    (tempfile::TempDir, tempfile::TempDir),
    lifeboat_shared::ids::TenantId,
    lifeboat_shared::ids::SnapshotId,
)> {
    let db = testing::test_db().await.ok_or_else(|| anyhow::anyhow!("PostgreSQL is needed"))?;
    let dir = tempfile::tempdir()?;
    let server = serve::start(server_config(&db.url, &dir.path().join("data"))).await?;
    let mut pg = db.client().await;
    let tenant = tenants::create(&mut pg, &server.app.master, "bench").await?.id;
    let (client, keys) = enrol(&server, &pg, tenant, "bench").await?;
    let backup = tempfile::tempdir()?;
    // About 1 GiB: 250 photos of 4 MiB, with the databases and plists of a backup.
    make_iphone_backup(backup.path(), 7, BackupContent { messages: 20_000, contacts: 2_000, photos: 250 }, 4 << 20)?;
    let device = DeviceInfo {
        udid: "00008030-001A2B3C4D5E6F70".parse()?,
        name: "bench".into(),
        product_type: "iPhone15,2".into(),
        ios_version: "17.5".into(),
    };
    let (run, snapshot) = open_run(&client, &device).await?;
    transfer::upload_dir(&client, &keys, run, snapshot, device, backup.path(), 0).await?;
    Ok((server, db, (dir, backup), tenant, snapshot))
}
