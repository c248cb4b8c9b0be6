//! What the benchmarks share: running a process to completion while sampling its peak
//! memory and CPU time, and whether a peer tool is installed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `tool` can be run (an optional peer of a benchmark).
pub fn have(tool: &str) -> bool {
    Command::new(tool).arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// CPU seconds (user + system) a process has used so far, from /proc/<pid>/stat.
pub fn cpu_seconds(pid: &str) -> f64 {
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
pub fn timed(mut cmd: Command) -> anyhow::Result<(f64, u64, f64, String)> {
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

/// What a device benchmark runs on: a `lifeboat-server` process, a tenant and an enrolled
/// `lifeboat-agent` state, and virtual iPhones of one profile (`LIFEBOAT_BENCH_PROFILE`,
/// `medium` by default) behind a usbmuxd on loopback.
#[derive(Debug)]
pub struct Rig {
    pub server: crate::ServerProcess,
    pub registry: std::sync::Arc<virtual_iphone::Registry>,
    pub profile: virtual_iphone::content::Profile,
    /// The usbmuxd address (`USBMUXD_SOCKET_ADDRESS`).
    pub mux: String,
    /// The agent's state directory.
    pub state: std::path::PathBuf,
    /// A help-desk user's credential, which the agent's restores and exports present
    /// (`LIFEBOAT_CREDENTIAL_FILE`).
    pub helpdesk_file: std::path::PathBuf,
}

impl Rig {
    /// Starts it all under `dir`, with `devices` phones, and enrols the agent.
    pub async fn start(dir: &std::path::Path, devices: u32) -> anyhow::Result<Self> {
        // No restore test in the background: it would take the cores from the next backup.
        std::fs::create_dir_all(dir)?;
        let config = dir.join("server.toml");
        std::fs::write(&config, "[restore_tests]\nenabled = false\n")?;
        let config = config.to_str().ok_or_else(|| anyhow::anyhow!("a non-UTF-8 bench directory"))?.to_string();
        let server = crate::ServerProcess::start(&dir.join("data"), &["--config", &config])?;
        let token = crate::tenant_with_token(&server, "bench")?;
        // Phones are backed up as they are: a bench that wants an encrypted one sets its
        // password (`Rig::encrypt`).
        let (ok, _, err) = crate::server_cli(&server.data_dir, &["tenant", "encryption", "bench", "off"]);
        anyhow::ensure!(ok, "tenant encryption bench off: {err}");
        let (ok, out, err) =
            crate::server_cli(&server.data_dir, &["user", "create", "--tenant", "bench", "--role", "helpdesk"]);
        anyhow::ensure!(ok, "user create: {err}");
        let helpdesk_file = dir.join("helpdesk.credential");
        std::fs::write(&helpdesk_file, out.trim())?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mux = listener.local_addr()?.to_string();
        let profile = match std::env::var("LIFEBOAT_BENCH_PROFILE") {
            Ok(p) => p.parse()?,
            Err(_) => virtual_iphone::content::Profile::Medium,
        };
        // The phones' keybags use iOS's PBKDF2 counts unless LIFEBOAT_BENCH_KDF_ROUNDS says
        // otherwise: an encrypted backup's cost includes the derivation a real phone's costs.
        let kdf_rounds = match std::env::var("LIFEBOAT_BENCH_KDF_ROUNDS") {
            Ok(r) => r.parse()?,
            Err(_) => lifeboat_shared::ios_crypto::IOS_DPIC,
        };
        let config = virtual_iphone::Config { seed: 9, devices, profile, state_dir: dir.join("phones"), kdf_rounds };
        let registry = std::sync::Arc::new(virtual_iphone::Registry::new(config)?);
        tokio::spawn(virtual_iphone::usbmuxd::serve(listener, registry.clone()));
        let rig = Self { server, registry, profile, mux, state: dir.join("agent"), helpdesk_file };
        tokio::task::block_in_place(|| timed(rig.agent(&["enroll", &token])))?;
        Ok(rig)
    }

    /// Gives the phone a backup password, as its user would, and escrows it on the server
    /// as an admin would, so the agent backs it up encrypted.
    pub fn encrypt(&self, udid: &str, password: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let state = self.registry.state_by_udid(udid).ok_or_else(|| anyhow::anyhow!("no phone {udid}"))?;
        // The server escrows only for a phone it knows: the agent registers one that does not
        // trust this computer yet (needs-trust) without backing it up.
        self.registry.untrust(udid);
        let _ = self.agent(&["backup", "--device", udid]).output()?;
        self.registry.trust(udid);
        // The phone derives its keybag now (seconds at iOS's counts), before any clock starts.
        state.encryption().set(Some(password.to_string()))?;
        let mut cli = Command::new(crate::bin("lifeboat-server"));
        cli.arg("--data-dir").arg(&self.server.data_dir).args(["--quic-listen", "127.0.0.1:0"]);
        cli.args(["device", "backup-password", "--tenant", "bench", "--udid", udid, "--set"]);
        let mut child = cli.stdin(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        child.stdin.take().ok_or_else(|| anyhow::anyhow!("no stdin"))?.write_all(format!("{password}\n").as_bytes())?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "escrowing the password: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// The `i`-th phone's UDID and state.
    pub fn phone(&self, i: usize) -> anyhow::Result<(String, std::sync::Arc<virtual_iphone::devices::DeviceState>)> {
        let udid = self.registry.all().get(i).map(|d| d.udid.clone()).ok_or_else(|| anyhow::anyhow!("no phone {i}"))?;
        let state = self.registry.state_by_udid(&udid).ok_or_else(|| anyhow::anyhow!("no phone {udid}"))?;
        Ok((udid, state))
    }

    /// A `lifeboat-agent` command on this rig's state and usbmuxd.
    pub fn agent(&self, args: &[&str]) -> Command {
        let mut c = Command::new(crate::bin("lifeboat-agent"));
        c.arg("--state-dir").arg(&self.state).args(args).env("USBMUXD_SOCKET_ADDRESS", &self.mux);
        c.env("LIFEBOAT_CREDENTIAL_FILE", &self.helpdesk_file);
        c
    }
}

/// A `restic` command on the bench's local repository `<dir>/restic-repo` (password
/// `bench`, cache in `<dir>/restic-cache`).
pub fn restic(dir: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new("restic");
    c.arg("--repo")
        .arg(dir.join("restic-repo"))
        .args(args)
        .env("RESTIC_PASSWORD", "bench")
        .env("RESTIC_CACHE_DIR", dir.join("restic-cache"));
    c
}

/// Megabytes of files a phone's `expect` lists.
pub fn expect_mb(lines: &[String]) -> f64 {
    lines.iter().filter_map(|l| l.split('\t').nth(2)?.parse::<u64>().ok()).sum::<u64>() as f64 / 1e6
}
