//! Benchmark: end to end, from an unthrottled `medium` virtual iPhone (50,000 files,
//! 1,984 MB) to a committed snapshot — the release `lifeboat-agent backup` process against
//! a release `lifeboat-server` process on loopback — beside what a host could do without
//! Lifeboat on the same data in the same run: libimobiledevice's `idevicebackup2` writing
//! the backup to disk, then `restic backup` of that directory (Debian's restic). Also the
//! agent's peak memory (VmHWM) and an incremental backup after ~1 % of use.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p lifeboat-e2e --bench endtoend`
//! (the bench runs the release binaries, which `cargo bench` alone does not rebuild)
//! (needs PostgreSQL; idevicebackup2 and restic are optional: skipped if missing).
//! `LIFEBOAT_BENCH_DIR` puts the run's files elsewhere than /tmp;
//! `LIFEBOAT_BENCH_LIFEBOAT_ONLY=1` skips the comparison (quicker when trying changes);
//! `LIFEBOAT_BENCH_PROFILE` backs up another virtual iPhone than `medium` (e.g.
//! `large:8G`, one file per 40 kB: how the agent's memory grows with the backup);
//! `LIFEBOAT_BENCH_KEEP=1` leaves the run's files in place. Deleting them slows the next
//! run down on this machine: its ext4 has no journal and passes over inodes freed in the
//! last 60 s (5 minutes while their table block is dirty) when it creates a file, and the
//! page cache they free goes back to the VM's host, which makes writing into it dearer.
//! For runs in a row, keep their files and remove them all afterwards.
//! Results in docs/performance.md. Target: ≥ 150 MB/s for the agent on the 2-core machine.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lifeboat_e2e::{ServerProcess, bin, tenant_with_token};
use virtual_iphone::content::Profile;
use virtual_iphone::{Config, Registry, usbmuxd};

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

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// CPU seconds (user + system) a process has used so far, from /proc/<pid>/stat.
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // After the command name in parentheses: state is field 3; utime and stime are 14, 15.
    let Some((_, rest)) = stat.rsplit_once(") ") else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Linux reports in USER_HZ, 100 on every mainstream build.
    (ticks(14) + ticks(15)) / 100.0
}

/// Runs `cmd` to completion, sampling its peak resident memory and CPU time; returns
/// (seconds, peak bytes, CPU seconds, stdout).
fn timed(mut cmd: Command) -> anyhow::Result<(f64, u64, f64, String)> {
    let start = Instant::now();
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id().to_string();
    let status_path = format!("/proc/{pid}/status");
    let mut peak = 0u64;
    let mut cpu = 0.0f64;
    let out = std::thread::scope(|s| {
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let o = s.spawn(move || stdout.map(|r| std::io::read_to_string(r).unwrap_or_default()).unwrap_or_default());
        let e = s.spawn(move || stderr.map(|r| std::io::read_to_string(r).unwrap_or_default()).unwrap_or_default());
        loop {
            // VmHWM only grows: the last reading before exit is the peak.
            if let Ok(text) = std::fs::read_to_string(&status_path)
                && let Some(kb) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak = peak.max(kb * 1024);
            }
            cpu = cpu.max(cpu_seconds(&pid));
            if child.try_wait()?.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = child.wait()?;
        let (out, err) = (o.join().unwrap_or_default(), e.join().unwrap_or_default());
        anyhow::ensure!(status.success(), "{cmd:?} failed: {status}\n{err}");
        anyhow::Ok(out)
    })?;
    Ok((start.elapsed().as_secs_f64(), peak, cpu, out))
}

async fn run(dir: &tempfile::TempDir) -> anyhow::Result<()> {
    let data = dir.path().join("data");
    let server = ServerProcess::start(&data, &[])?;
    let token = tenant_with_token(&server, "bench")?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mux = listener.local_addr()?.to_string();
    let profile: Profile = match std::env::var("LIFEBOAT_BENCH_PROFILE") {
        Ok(p) => p.parse()?,
        Err(_) => Profile::Medium,
    };
    let config = Config { seed: 9, devices: 1, profile, state_dir: dir.path().join("phones") };
    let registry = Arc::new(Registry::new(config)?);
    tokio::spawn(usbmuxd::serve(listener, registry.clone()));
    let udid = registry.all()[0].udid.clone();
    let phone = registry.state_by_udid(&udid).ok_or_else(|| anyhow::anyhow!("no phone"))?;
    let size_mb =
        phone.expect()?.iter().filter_map(|l| l.split('\t').nth(2)?.parse::<u64>().ok()).sum::<u64>() as f64 / 1e6;

    let state = dir.path().join("agent");
    let agent = |args: &[&str]| {
        let mut c = Command::new(bin("lifeboat-agent"));
        c.arg("--state-dir").arg(&state).args(args).env("USBMUXD_SOCKET_ADDRESS", &mux);
        c
    };
    tokio::task::block_in_place(|| timed(agent(&["enroll", &token])))?;
    let server_pid = server.child.id().to_string();
    println!("end to end: a `{profile}` virtual iPhone ({size_mb:.0} MB of files) on loopback");

    // Whatever the machine was writing before (an earlier run, a build) is on disk first:
    // its write-back would otherwise take CPU and disk time from this run.
    let _ = tokio::task::block_in_place(|| Command::new("sync").status());
    let (server_cpu, phone_cpu) = (cpu_seconds(&server_pid), cpu_seconds("self"));
    let (secs, peak, agent_cpu, out) =
        tokio::task::block_in_place(|| timed(agent(&["backup", "--device", &udid, "--json"])))?;
    let (server_cpu, phone_cpu) = (cpu_seconds(&server_pid) - server_cpu, cpu_seconds("self") - phone_cpu);
    let report: serde_json::Value = serde_json::from_str(&out)?;
    let logical = report["logical_bytes"].as_u64().unwrap_or(0) as f64 / 1e6;
    println!(
        "lifeboat-agent backup (full, to a committed snapshot): {secs:6.1} s  {:6.0} MB/s  ({logical:.0} MB incl. Manifest.db; {:.0} MB of chunks sent; peak agent memory {} MiB)",
        logical / secs,
        report["blob_bytes_sent"].as_u64().unwrap_or(0) as f64 / 1e6,
        peak >> 20
    );
    println!(
        "  CPU seconds: agent {agent_cpu:.1}, server {server_cpu:.1}, virtual iPhone (this process) {phone_cpu:.1}; {:.0} % of the 2 cores busy",
        (agent_cpu + server_cpu + phone_cpu) / secs / 2.0 * 100.0
    );

    phone.simulate_use(0.01, 1)?;
    let (secs, peak, _, out) = tokio::task::block_in_place(|| timed(agent(&["backup", "--device", &udid, "--json"])))?;
    let report: serde_json::Value = serde_json::from_str(&out)?;
    println!(
        "lifeboat-agent backup after ~1 % of use (incremental): {secs:5.1} s  ({:.1} MB of chunks sent, {} of {} files not read again thanks to the cache; peak agent memory {} MiB)",
        report["blob_bytes_sent"].as_u64().unwrap_or(0) as f64 / 1e6,
        report["cached_files"],
        report["files"],
        peak >> 20
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
    let repo = dir.path().join("restic-repo");
    let restic = |args: &[&str]| {
        let mut c = Command::new("restic");
        c.arg("--repo")
            .arg(&repo)
            .args(args)
            .env("RESTIC_PASSWORD", "bench")
            .env("RESTIC_CACHE_DIR", dir.path().join("restic-cache"));
        c
    };
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
    drop(server);
    Ok(())
}
