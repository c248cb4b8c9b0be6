//! Harness for the end-to-end tests: find the workspace's binaries, run them as real
//! processes, read their structured logs, and look at what they leave running.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use lifeboat_server::testing::{http_get, in_ci, skip_or_fail};

/// Path of a workspace binary (`lifeboat-server`, `lifeboat-agent`), built next to this
/// test executable (`target/<profile>/deps/it-…` → `target/<profile>/<name>`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let path = dir.join(name);
    assert!(path.is_file(), "{} is missing: build it first with `cargo build --workspace --bins`", path.display());
    path
}

/// A `lifeboat-server serve` child process with JSON logs.
#[derive(Debug)]
pub struct ServerProcess {
    pub child: Child,
    pub http_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    pub data_dir: PathBuf,
    logs: mpsc::Receiver<serde_json::Value>,
}

impl ServerProcess {
    /// Starts the server on `data_dir` (embedded PostgreSQL) and waits until it is ready.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin("lifeboat-server"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("LIFEBOAT_") {
                cmd.env_remove(k);
            }
        }
        cmd.args([
            "--log-format",
            "json",
            "--http-listen",
            "127.0.0.1:0",
            "--quic-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra_args)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow::anyhow!("no stderr"))?;
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let unset: SocketAddr = "0.0.0.0:0".parse()?;
        let mut server = Self { child, http_addr: unset, quic_addr: unset, data_dir: data_dir.to_path_buf(), logs };
        let ready = server.wait_log(Duration::from_secs(60), |v| v.get("http.addr").is_some())?;
        server.http_addr = ready["http.addr"].as_str().unwrap_or_default().parse()?;
        server.quic_addr = ready["quic.addr"].as_str().unwrap_or_default().parse()?;
        Ok(server)
    }

    /// Waits for a log line matching `pred`; fails (with what was logged) if the process
    /// exits or the time runs out first.
    pub fn wait_log(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.logs.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(v) if pred(&v) => return Ok(v),
                Ok(v) => seen.push(v.to_string()),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    anyhow::bail!("lifeboat-server exited; it logged:\n{}", seen.join("\n"))
                }
                Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                    anyhow::bail!("timed out after {timeout:?}; lifeboat-server logged:\n{}", seen.join("\n"))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(Instant::now() < deadline, "lifeboat-server still running after {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(nix::sys::signal::Signal::SIGTERM);
            let _ = self.wait_exit(Duration::from_secs(30));
        }
    }
}

/// Live (non-zombie) `postgres` processes whose command line mentions `dir`.
pub fn postgres_processes_under(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            let is_pg = exe.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("postgres"));
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'));
            is_pg && !zombie && String::from_utf8_lossy(&cmdline).contains(&needle)
        })
        .collect()
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A temp dir the `postgres` user can traverse when tests run as root.
pub fn tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod tempdir");
    dir
}

/// Writes a deterministic tree of `files` files adding up to about `total_bytes`:
/// mostly small files (some compressible, some not) and a few large incompressible ones,
/// as in an iPhone backup directory (`xx/<40 hex>` names).
pub fn make_tree(root: &Path, files: usize, total_bytes: usize, seed: u64) -> std::io::Result<()> {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let large = (files / 20).max(1);
    let small_total = total_bytes / 5;
    let large_each = (total_bytes - small_total) / large;
    for i in 0..files {
        let name = format!("{:040x}", u128::from(next()) << 64 | u128::from(next()));
        let dir = root.join(&name[..2]);
        std::fs::create_dir_all(&dir)?;
        let len = if i < large { large_each } else { (next() as usize % (2 * small_total / (files - large))).max(1) };
        let mut data = Vec::with_capacity(len + 8);
        if i % 3 == 0 && i >= large {
            while data.len() < len {
                data.extend_from_slice(format!("row {} of file {i}; ", next() % 1000).as_bytes());
            }
        } else {
            // Incompressible bytes from BLAKE3's output stream (an optimised dependency:
            // fast even in debug builds).
            data.resize(len, 0);
            blake3::Hasher::new().update(&next().to_le_bytes()).finalize_xof().fill(&mut data);
        }
        data.truncate(len);
        // As in a real backup directory: <first two hex digits>/<fileID>.
        std::fs::write(dir.join(&name), &data)?;
    }
    Ok(())
}

/// Every file under `root` with its bytes, by relative path.
pub fn read_tree(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    lifeboat_agent::transfer::list_files(root)
        .expect("listing a tree")
        .into_iter()
        .map(|rel| {
            let bytes = std::fs::read(root.join(&rel)).expect("reading a file");
            (rel, bytes)
        })
        .collect()
}

/// A connection to the embedded PostgreSQL of a server process running on `data_dir`.
pub async fn embedded_db(data_dir: &Path) -> tokio_postgres::Client {
    let mut config = tokio_postgres::Config::new();
    config.host_path(data_dir.join("postgres")).port(5432).user("lifeboat").dbname("lifeboat");
    lifeboat_server::db::connect(&config, Duration::from_secs(10)).await.expect("connecting to the embedded database")
}

/// Runs `lifeboat-server --data-dir DIR ARGS…`; returns (success, stdout, stderr).
pub fn server_cli(data_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("lifeboat-server"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--quic-listen", "127.0.0.1:0"])
        .args(args)
        .output()
        .expect("running lifeboat-server");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
