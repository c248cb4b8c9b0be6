//! Benchmark: a full restore of a committed snapshot of a `medium` virtual iPhone (50,000
//! files, 1,984 MB) onto another virtual iPhone — the release `lifeboat-agent restore`
//! against a release `lifeboat-server` on loopback — beside what a host would do without
//! Lifeboat, in the same run: `restic restore` of the same backup from a local
//! repository, then `idevicebackup2 restore` of that directory onto the same phone.
//! Both restores skip the reboot (`--no-reboot`), so the figure is the data's way onto
//! the phone. Also the agent's peak memory (VmHWM) and CPU time.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p lifeboat-e2e --bench restore`
//! (needs PostgreSQL; idevicebackup2 and restic are optional: the comparison is skipped
//! without them). `LIFEBOAT_BENCH_DIR` puts the run's files elsewhere than /tmp;
//! `LIFEBOAT_BENCH_PROFILE` restores another virtual iPhone than `medium`;
//! `LIFEBOAT_BENCH_LIFEBOAT_ONLY=1` skips the comparison.
//! Results in docs/performance.md. Goal: Lifeboat at most half the time of the two tools.

use std::process::Command;

use lifeboat_e2e::bench::{Rig, expect_mb, have, restic, timed};

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(std::env::var_os("LIFEBOAT_BENCH_DIR").unwrap_or_else(|| "/tmp".into()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = rt.block_on(run(&dir));
    drop(rt);
    result
}

async fn run(dir: &tempfile::TempDir) -> anyhow::Result<()> {
    let rig = Rig::start(dir.path(), 2).await?;
    let (profile, mux) = (rig.profile, rig.mux.clone());
    let ((source, phone), (target, new_phone)) = (rig.phone(0)?, rig.phone(1)?);
    let expected = phone.expect()?;
    let size_mb = expect_mb(&expected);
    let agent = |args: &[&str]| rig.agent(args);
    tokio::task::block_in_place(|| timed(agent(&["backup", "--device", &source, "--json"])))?;
    println!("restore: a snapshot of a `{profile}` virtual iPhone ({size_mb:.0} MB of files) onto another one");

    let _ = tokio::task::block_in_place(|| Command::new("sync").status());
    let (secs, peak, cpu, _) = tokio::task::block_in_place(|| {
        timed(agent(&["restore", "--device", &target, "--from-device", &source, "--no-reboot", "--json"]))
    })?;
    anyhow::ensure!(new_phone.expect()? == expected, "the restored phone does not hold the source's files");
    println!(
        "lifeboat-agent restore (download, then MobileBackup2 Restore): {secs:6.1} s  {:6.0} MB/s  (peak agent memory {} MiB, {cpu:.1} CPU-s)",
        size_mb / secs,
        peak >> 20
    );

    if std::env::var_os("LIFEBOAT_BENCH_LIFEBOAT_ONLY").is_some() {
        println!("LIFEBOAT_BENCH_LIFEBOAT_ONLY: the comparison is skipped");
        return Ok(());
    }
    if !have("idevicebackup2") || !have("restic") {
        println!("idevicebackup2 or restic: not installed, the comparison is skipped");
        return Ok(());
    }
    // The same backup as the tools would hold it: idevicebackup2's folder in a restic
    // repository (made untimed).
    let backup = dir.path().join("idevicebackup2");
    std::fs::create_dir_all(&backup)?;
    let mut cmd = Command::new("idevicebackup2");
    cmd.args(["-u", &source, "backup", "--full"]).arg(&backup).env("USBMUXD_SOCKET_ADDRESS", &mux);
    tokio::task::block_in_place(|| timed(cmd))?;
    let restic = |args: &[&str]| restic(dir.path(), args);
    tokio::task::block_in_place(|| timed(restic(&["init"])))?;
    let mut cmd = restic(&["backup", "--quiet"]);
    cmd.arg(&backup);
    tokio::task::block_in_place(|| timed(cmd))?;
    std::fs::remove_dir_all(&backup)?;

    let restored = dir.path().join("restic-restored");
    let _ = tokio::task::block_in_place(|| Command::new("sync").status());
    let mut cmd = restic(&["restore", "latest", "--target"]);
    cmd.arg(&restored);
    let (r_secs, _, _, _) = tokio::task::block_in_place(|| timed(cmd))?;
    // restic restores the directory under its absolute path.
    let folder = restored.join(backup.strip_prefix("/")?);
    let mut cmd = Command::new("idevicebackup2");
    cmd.args(["-u", &target, "-s", &source, "restore", "--system", "--no-reboot"])
        .arg(&folder)
        .env("USBMUXD_SOCKET_ADDRESS", &mux);
    let (i_secs, _, _, _) = tokio::task::block_in_place(|| timed(cmd))?;
    anyhow::ensure!(new_phone.expect()? == expected, "idevicebackup2 restore did not restore the source's files");
    println!("restic restore of the backup folder:                     {r_secs:6.1} s");
    println!("then idevicebackup2 restore of that folder:              {i_secs:6.1} s");
    println!(
        "restic + idevicebackup2 together:                        {:6.1} s  {:6.0} MB/s  (Lifeboat: {:.2}× their time)",
        r_secs + i_secs,
        size_mb / (r_secs + i_secs),
        secs / (r_secs + i_secs)
    );
    Ok(())
}
