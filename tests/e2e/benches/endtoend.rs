//! Benchmark: end to end, from an unthrottled `medium` virtual iPhone (50,000 files,
//! 1,984 MB) to a committed snapshot — the release `lifeboat-agent backup` process against
//! a release `lifeboat-server` process on loopback — beside what a host could do without
//! Lifeboat on the same data in the same run: libimobiledevice's `idevicebackup2` writing
//! the backup to disk, then `restic backup` of that directory (Debian's restic). Also the
//! agent's peak memory (VmHWM) and an incremental backup after ~1 % of use. In the same
//! run, a second `medium` phone that encrypts its backups (password set on the phone,
//! escrowed on the server before the clock starts) is backed up the same way: full, and
//! incremental with the agent's cached password key and with it removed (a phone that
//! makes a new keybag per backup).
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p lifeboat-e2e --bench endtoend`
//! (the bench runs the release binaries, which `cargo bench` alone does not rebuild)
//! (needs PostgreSQL; idevicebackup2 and restic are optional: skipped if missing).
//! `LIFEBOAT_BENCH_DIR` puts the run's files elsewhere than /tmp;
//! `LIFEBOAT_BENCH_LIFEBOAT_ONLY=1` skips the comparison (quicker when trying changes);
//! `LIFEBOAT_BENCH_PROFILE` backs up another virtual iPhone than `medium` (e.g.
//! `large:8G`, one file per 40 kB: how the agent's memory grows with the backup);
//! `LIFEBOAT_BENCH_KDF_ROUNDS` sets the encrypting phone's PBKDF2-SHA256 count (iOS's
//! 10,000,000 by default);
//! `LIFEBOAT_BENCH_KEEP=1` leaves the run's files in place. Deleting them slows the next
//! run down on this machine: its ext4 has no journal and passes over inodes freed in the
//! last 60 s (5 minutes while their table block is dirty) when it creates a file, and the
//! page cache they free goes back to the VM's host, which makes writing into it dearer.
//! For runs in a row, keep their files and remove them all afterwards.
//! Results in docs/performance.md. Target: ≥ 150 MB/s for the agent on the 2-core machine.

use std::process::Command;

use lifeboat_e2e::bench::{Rig, cpu_seconds, expect_mb, have, restic, timed};

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(std::env::var_os("LIFEBOAT_BENCH_DIR").unwrap_or_else(|| "/tmp".into()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = rt.block_on(run(&dir));
    drop(rt);
    if std::env::var_os("LIFEBOAT_BENCH_KEEP").is_some() {
        println!("the run's files are kept in {}", dir.keep().display());
    }
    result
}

async fn run(dir: &tempfile::TempDir) -> anyhow::Result<()> {
    let rig = Rig::start(dir.path(), 2).await?;
    let (profile, mux) = (rig.profile, rig.mux.clone());
    let (udid, phone) = rig.phone(0)?;
    let (enc_udid, enc_phone) = rig.phone(1)?;
    rig.encrypt(&enc_udid, "bench backup password")?;
    let (size_mb, enc_mb) = (expect_mb(&phone.expect()?), expect_mb(&enc_phone.expect()?));
    println!(
        "end to end: two `{profile}` virtual iPhones on loopback, {size_mb:.0} MB of files unencrypted and {enc_mb:.0} MB encrypted by the phone (keybag at {} PBKDF2-SHA256 rounds)",
        enc_phone.encryption().keys().map(|k| k.keybag.dpic).unwrap_or_default()
    );

    let full = backup(&rig, &udid, "full, unencrypted, to a committed snapshot")?;
    let enc = backup(&rig, &enc_udid, "full, encrypted by the phone")?;
    println!(
        "  encrypted / unencrypted: {:.2}x the time, {:.2}x the rate (target: at most 1.3x the time)",
        enc.secs / full.secs,
        full.rate / enc.rate
    );

    phone.simulate_use(0.01, 1)?;
    enc_phone.simulate_use(0.01, 1)?;
    let inc = backup(&rig, &udid, "after ~1 % of use (incremental), unencrypted")?;
    let enc_inc = backup(&rig, &enc_udid, "after ~1 % of use (incremental), encrypted, password key cached")?;
    // A phone that makes a new keybag for each backup (new salts) misses the agent's cache
    // of the derived password key: one PBKDF2 at the keybag's counts more.
    enc_phone.simulate_use(0.01, 2)?;
    let _ = std::fs::remove_dir_all(rig.state.join("kdf"));
    let enc_miss = backup(&rig, &enc_udid, "after ~1 % more use, encrypted, password key derived again")?;
    println!(
        "  incremental encrypted / unencrypted: {:.2}x with the cached key, {:.2}x deriving it (target: within 1.2x)",
        enc_inc.secs / inc.secs,
        enc_miss.secs / inc.secs
    );
    println!(
        "  peak agent memory, full / incremental: unencrypted {} / {} MiB, encrypted {} / {} MiB",
        full.peak >> 20,
        inc.peak >> 20,
        enc.peak >> 20,
        enc_inc.peak.max(enc_miss.peak) >> 20
    );

    if std::env::var_os("LIFEBOAT_BENCH_LIFEBOAT_ONLY").is_some() {
        return Ok(());
    }
    if !have("idevicebackup2") {
        println!("idevicebackup2: not installed, skipped");
        return Ok(());
    }
    let target = dir.path().join("idevicebackup2");
    std::fs::create_dir_all(&target)?;
    let mut cmd = Command::new("idevicebackup2");
    cmd.args(["-u", &udid, "backup", "--full"]).arg(&target).env("USBMUXD_SOCKET_ADDRESS", &mux);
    let (ib_secs, _, _, _) = tokio::task::block_in_place(|| timed(cmd))?;
    let written = lifeboat_agent::pipeline::transfer::dir_bytes(&target) as f64 / 1e6;
    println!(
        "idevicebackup2 backup --full to the bench directory:    {ib_secs:6.1} s  {:6.0} MB/s  ({written:.0} MB written)",
        written / ib_secs
    );
    if !have("restic") {
        println!("restic: not installed, skipped");
        return Ok(());
    }
    let restic = |args: &[&str]| restic(dir.path(), args);
    tokio::task::block_in_place(|| timed(restic(&["init"])))?;
    let mut cmd = restic(&["backup", "--quiet"]);
    cmd.arg(&target);
    let (r_secs, r_peak, _, _) = tokio::task::block_in_place(|| timed(cmd))?;
    println!(
        "then restic backup of that directory (local repository): {r_secs:6.1} s  (peak memory {} MiB)",
        r_peak >> 20
    );
    println!(
        "idevicebackup2 + restic together:                      {:6.1} s  {:6.0} MB/s",
        ib_secs + r_secs,
        written / (ib_secs + r_secs)
    );
    Ok(())
}

/// What one `lifeboat-agent backup` did.
struct Backup {
    secs: f64,
    rate: f64,
    peak: u64,
}

/// Runs and times `lifeboat-agent backup --device UDID --json`, and prints what it did.
fn backup(rig: &Rig, udid: &str, what: &str) -> anyhow::Result<Backup> {
    let server_pid = rig.server.child.id().to_string();
    // Whatever the machine was writing before (an earlier run, a build) is on disk first:
    // its write-back would otherwise take CPU and disk time from this run.
    let _ = tokio::task::block_in_place(|| Command::new("sync").status());
    let (server_cpu, phone_cpu) = (cpu_seconds(&server_pid), cpu_seconds("self"));
    let (secs, peak, agent_cpu, out) =
        tokio::task::block_in_place(|| timed(rig.agent(&["backup", "--device", udid, "--json"])))?;
    let (server_cpu, phone_cpu) = (cpu_seconds(&server_pid) - server_cpu, cpu_seconds("self") - phone_cpu);
    let report: serde_json::Value = serde_json::from_str(&out)?;
    let logical = report["logical_bytes"].as_u64().unwrap_or(0) as f64 / 1e6;
    println!(
        "lifeboat-agent backup ({what}): {secs:6.1} s  {:6.0} MB/s  ({logical:.0} MB incl. Manifest.db; {:.1} MB of chunks sent; {} of {} files not read again thanks to the cache; peak agent memory {} MiB)",
        logical / secs,
        report["blob_bytes_sent"].as_u64().unwrap_or(0) as f64 / 1e6,
        report["cached_files"],
        report["files"],
        peak >> 20
    );
    println!(
        "  phases: phone sending {:.1} s, keys opened in {:.1} s, then {:.1} s to chunk, upload and commit the rest",
        report["phone_seconds"].as_f64().unwrap_or(0.0),
        report["keys_seconds"].as_f64().unwrap_or(0.0),
        report["after_phone_seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  CPU seconds: agent {agent_cpu:.1}, server {server_cpu:.1}, virtual iPhone (this process) {phone_cpu:.1}; {:.0} % of the 2 cores busy",
        (agent_cpu + server_cpu + phone_cpu) / secs / 2.0 * 100.0
    );
    Ok(Backup { secs, rate: logical / secs, peak })
}
