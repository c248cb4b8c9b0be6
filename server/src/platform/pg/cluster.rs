//! Starting, watching and stopping one private PostgreSQL cluster.
//!
//! Layout of a cluster's root directory (owned by the user PostgreSQL runs as, mode 0700):
//!
//! ```text
//! <root>/cluster.lock      flock held by the owning process while the cluster runs
//! <root>/data/             PGDATA (initdb'd on first start, reused afterwards)
//! <root>/postgres.log      the server's own log
//! <root>/.s.PGSQL.<port>   the Unix socket (no TCP listener at all)
//! ```
//!
//! Lifetime: `postgres` is started by a small guard shell (`sh`), itself a child of the
//! owner, in its own process group. The guard holds the read end of a pipe whose write
//! end only the owner has. When the owner closes it — by [`Cluster::stop`], by dropping
//! the [`Cluster`], or because the kernel closed it when the owner died, SIGKILL included —
//! the guard asks PostgreSQL for a fast shutdown (SIGINT), escalates to SIGQUIT and
//! SIGKILL if it hangs, reaps it, and removes the directory if the cluster is ephemeral.
//! So no orphaned PostgreSQL outlives its owner by more than a shutdown, and a stale
//! one found at start (guard killed too) is stopped before the cluster starts again.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::{PermissionsExt as _, chown};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User};

use super::bindir::{BinDir, BinDirError};

/// The cluster's superuser (initdb `-U`), also the role the server connects as.
pub const SUPERUSER: &str = "lifeboat";
/// Port number used only to name the Unix socket (`.s.PGSQL.5432`); no TCP is opened.
const SOCKET_PORT: u16 = 5432;
/// `sun_path` is 108 bytes on Linux and 104 on macOS, including the terminating NUL.
const MAX_SOCKET_PATH_BYTES: usize = 103;

/// How much PostgreSQL should care about surviving a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Production settings: fsync on. The server's embedded default.
    Durable,
    /// fsync, synchronous commit and full-page writes off: for throw-away test clusters.
    Fast,
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Directory the cluster lives in; created if missing.
    pub root: PathBuf,
    pub durability: Durability,
    /// Remove `root` once PostgreSQL has stopped (test clusters).
    pub ephemeral: bool,
    /// How long PostgreSQL may take to accept connections.
    pub start_timeout: Duration,
}

impl ClusterOptions {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            durability: Durability::Durable,
            ephemeral: false,
            start_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    NotInstalled(#[from] BinDirError),
    #[error(
        "running as root, but PostgreSQL refuses to run as root and there is no `postgres` user \
         to run it as; create one (`useradd --system --home /var/lib/postgresql postgres`) \
         or run lifeboat as an ordinary user"
    )]
    NoPostgresUser,
    #[error(
        "PostgreSQL runs as user `{user}` (it refuses root), but that user cannot get through {path}; \
         make it searchable (`chmod o+x {path}`) or choose a data directory elsewhere (--data-dir)"
    )]
    Unreachable { user: String, path: PathBuf },
    #[error("the PostgreSQL cluster in {0} is already in use by another process")]
    InUse(PathBuf),
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("{0} exists but is not a PostgreSQL data directory (no PG_VERSION); move it away")]
    NotACluster(PathBuf),
    #[error(
        "the embedded PostgreSQL data in {data_dir} was created by PostgreSQL {data_major}, and the \
         PostgreSQL found ({bindir}) is {binaries}: nothing was changed. Install PostgreSQL {data_major} \
         beside it (its binaries are then used), or upgrade the data with pg_upgrade as \
         docs/operations.md says (\"Upgrading the embedded PostgreSQL\")"
    )]
    VersionMismatch { data_dir: PathBuf, data_major: u32, bindir: PathBuf, binaries: String },
    #[error("initdb failed ({status}):\n{output}")]
    Initdb { status: std::process::ExitStatus, output: String },
    #[error("PostgreSQL did not start; the end of its log {log}:\n{tail}")]
    Start { log: PathBuf, tail: String },
    #[error("PostgreSQL did not accept connections within {0:?}; see {1}")]
    StartTimeout(Duration, PathBuf),
    #[error("PostgreSQL did not stop within {0:?}")]
    StopTimeout(Duration),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |cause| ClusterError::Io { path: path.to_path_buf(), cause }
}

/// A running private PostgreSQL cluster. Stopped by [`Cluster::stop`] or on drop.
#[derive(Debug)]
pub struct Cluster {
    root: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    pid: Pid,
    guard: Child,
    guard_stdin: Option<ChildStdin>,
    ephemeral: bool,
    _lock: Flock<File>,
}

/// The guard: starts PostgreSQL, reports its pid, and shuts it down once the owner's
/// pipe on fd 0 closes. Arguments: data dir, log file, dirs to remove afterwards (two,
/// either may be empty), then the postgres command line.
const GUARD_SCRIPT: &str = r#"
set -u
data=$1; log=$2; rm1=$3; rm2=$4; shift 4
exec 3<&0
"$@" </dev/null 3<&- >>"$log" 2>&1 &
pid=$!
echo "$pid"
(
  read -r _ <&3
  n=0
  while [ -f "$data/postmaster.pid" ] && kill -0 "$pid" 2>/dev/null; do
    case $n in 0) kill -INT "$pid" ;; 300) kill -QUIT "$pid" ;; 400) kill -KILL "$pid" ;; esac
    n=$((n+1)); sleep 0.1
  done
) </dev/null >/dev/null 2>&1 &
reader=$!
exec 3<&- 0</dev/null
wait "$pid"; status=$?
wait "$reader"
for d in "$rm1" "$rm2"; do [ -n "$d" ] && rm -rf -- "$d"; done
exit "$status"
"#;

impl Cluster {
    /// Starts the cluster in `opts.root`, creating it with initdb on first use.
    /// Blocking: call it from `spawn_blocking` inside an async runtime.
    pub fn start(opts: &ClusterOptions) -> Result<Self, ClusterError> {
        let root = &opts.root;
        // Data made by one major version runs only on its binaries: pinned to them, or
        // refused before anything touches it.
        let data_major = fs::read_to_string(root.join("data/PG_VERSION")).ok().and_then(|v| v.trim().parse().ok());
        let bindir = match data_major {
            Some(major) => {
                let bindir = BinDir::for_major(major)?;
                let found = bindir.major();
                if found != Some(major) {
                    return Err(ClusterError::VersionMismatch {
                        data_dir: root.join("data"),
                        data_major: major,
                        bindir: bindir.path().to_path_buf(),
                        binaries: found.map_or("of an unknown version".into(), |v| format!("version {v}")),
                    });
                }
                bindir
            }
            None => BinDir::locate()?,
        };
        let run_as = run_as_user()?;
        fs::create_dir_all(root).map_err(io_err(root))?;
        let root = fs::canonicalize(root).map_err(io_err(root))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).map_err(io_err(&root))?;
        if let Some(user) = &run_as {
            chown(&root, Some(user.uid.as_raw()), Some(user.gid.as_raw())).map_err(io_err(&root))?;
            check_reachable(user, &root)?;
        }

        let lock_path = root.join("cluster.lock");
        let lock_file =
            File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(io_err(&lock_path))?;
        let lock =
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| ClusterError::InUse(root.clone()))?;

        let data_dir = root.join("data");
        stop_orphan(&data_dir)?;
        if !data_dir.join("PG_VERSION").is_file() {
            initdb(&bindir, run_as.as_ref(), &root, &data_dir, opts.durability)?;
        }

        let (socket_dir, socket_tmp) = socket_dir(&root, run_as.as_ref())?;
        let log = root.join("postgres.log");
        let mut postgres: Vec<String> = vec![
            bindir.postgres().display().to_string(),
            "-D".into(),
            data_dir.display().to_string(),
            "-k".into(),
            socket_dir.display().to_string(),
            "-p".into(),
            SOCKET_PORT.to_string(),
        ];
        let mut settings = vec!["listen_addresses=", "unix_socket_permissions=0700", "max_connections=200"];
        if opts.durability == Durability::Fast {
            settings.extend(["fsync=off", "synchronous_commit=off", "full_page_writes=off"]);
        }
        for s in settings {
            postgres.push("-c".into());
            postgres.push(s.into());
        }

        let remove_root = if opts.ephemeral { root.display().to_string() } else { String::new() };
        let remove_sock = socket_tmp.map(|p| p.display().to_string()).unwrap_or_default();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(GUARD_SCRIPT)
            .arg("lifeboat-pg-guard")
            .arg(&data_dir)
            .arg(&log)
            .arg(remove_root)
            .arg(remove_sock)
            .args(&postgres)
            .current_dir(&root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Own process group: a Ctrl-C at the terminal reaches the owner, which stops
            // the cluster in order, not PostgreSQL directly.
            .process_group(0);
        as_user(&mut cmd, run_as.as_ref());
        let mut guard = cmd.spawn().map_err(io_err(Path::new("sh")))?;
        let guard_stdin = guard.stdin.take();
        let pid = read_pid(&mut guard, &log)?;

        let cluster =
            Self { root, data_dir, socket_dir, pid, guard, guard_stdin, ephemeral: opts.ephemeral, _lock: lock };
        cluster.wait_ready(opts.start_timeout, &log)?;
        tracing::debug!(pg.root = %cluster.root.display(), pg.pid = pid.as_raw(), "PostgreSQL started");
        Ok(cluster)
    }

    /// Connection settings for database `dbname` as the cluster's superuser.
    pub fn config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.socket_dir)
            .port(SOCKET_PORT)
            .user(SUPERUSER)
            .dbname(dbname)
            .application_name("lifeboat")
            .connect_timeout(Duration::from_secs(10));
        c
    }

    /// The same as [`Cluster::config`], as a libpq-style URL (for `psql` and child processes).
    pub fn url(&self, dbname: &str) -> String {
        let host: String = self
            .socket_dir
            .display()
            .to_string()
            .bytes()
            .map(|b| match b {
                b'/' => "%2F".to_string(),
                b' ' => "%20".to_string(),
                _ => (b as char).to_string(),
            })
            .collect();
        format!("postgresql://{SUPERUSER}@{host}:{SOCKET_PORT}/{dbname}")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Process id of the postmaster.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Process id of the guard shell (tests kill it to make a real orphan).
    pub fn guard_pid(&self) -> u32 {
        self.guard.id()
    }

    /// Fast shutdown; waits until PostgreSQL has exited (and, for an ephemeral cluster,
    /// its directory is gone). Blocking.
    pub fn stop(mut self) -> Result<(), ClusterError> {
        self.shutdown(Duration::from_secs(60))
    }

    fn shutdown(&mut self, timeout: Duration) -> Result<(), ClusterError> {
        let Some(stdin) = self.guard_stdin.take() else {
            return Ok(());
        };
        drop(stdin);
        let deadline = Instant::now() + timeout;
        loop {
            match self.guard.try_wait() {
                Ok(Some(_)) | Err(_) => {
                    // The guard removes an ephemeral directory too, but running as `postgres`
                    // it may lack write access to the parent; the owner may have it.
                    if self.ephemeral && self.root.exists() {
                        fs::remove_dir_all(&self.root).map_err(io_err(&self.root))?;
                    }
                    return Ok(());
                }
                Ok(None) if Instant::now() >= deadline => return Err(ClusterError::StopTimeout(timeout)),
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn wait_ready(&self, timeout: Duration, log: &Path) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        let pidfile = self.data_dir.join("postmaster.pid");
        loop {
            // Line 8 of postmaster.pid is the postmaster's status; "ready" once it accepts
            // connections (PostgreSQL >= 10).
            if let Ok(text) = fs::read_to_string(&pidfile)
                && text.lines().nth(7).map(str::trim) == Some("ready")
            {
                return Ok(());
            }
            if kill(self.pid, None).is_err() {
                return Err(ClusterError::Start { log: log.to_path_buf(), tail: log_tail(log) });
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::StartTimeout(timeout, log.to_path_buf()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown(Duration::from_secs(60)) {
            tracing::warn!(pg.root = %self.root.display(), error = %e, "PostgreSQL did not stop cleanly");
        }
    }
}

/// PostgreSQL refuses to run as root; as root we run it as `postgres`.
fn run_as_user() -> Result<Option<User>, ClusterError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match User::from_name("postgres") {
        Ok(Some(user)) => Ok(Some(user)),
        _ => Err(ClusterError::NoPostgresUser),
    }
}

fn as_user(cmd: &mut Command, user: Option<&User>) {
    if let Some(u) = user {
        cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw()).env("HOME", &u.dir).env("USER", &u.name);
    }
    cmd.env_remove("PGDATA").env_remove("PGHOST").env_remove("PGPORT").env("LC_ALL", "C");
}

fn check_reachable(user: &User, dir: &Path) -> Result<(), ClusterError> {
    let test = |flag: &str, path: &Path| {
        let mut cmd = Command::new("test");
        cmd.arg(flag).arg(path).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        as_user(&mut cmd, Some(user));
        cmd.status().is_ok_and(|s| s.success())
    };
    if test("-w", dir) {
        return Ok(());
    }
    // Name the directory that stops it: usually a parent such as /root (mode 0700).
    let blocking = dir.ancestors().collect::<Vec<_>>().into_iter().rev().find(|a| !test("-x", a));
    Err(ClusterError::Unreachable { user: user.name.clone(), path: blocking.unwrap_or(dir).to_path_buf() })
}

fn initdb(
    bindir: &BinDir,
    user: Option<&User>,
    root: &Path,
    data_dir: &Path,
    durability: Durability,
) -> Result<(), ClusterError> {
    if data_dir.exists() {
        let empty = fs::read_dir(data_dir).map_err(io_err(data_dir))?.next().is_none();
        if !empty {
            return Err(ClusterError::NotACluster(data_dir.to_path_buf()));
        }
    }
    let mut cmd = Command::new(bindir.initdb());
    cmd.arg("-D")
        .arg(data_dir)
        .args(["-U", SUPERUSER, "--auth=trust", "--encoding=UTF8", "--no-locale"])
        .current_dir(root)
        .stdin(Stdio::null());
    if durability == Durability::Fast {
        cmd.arg("--no-sync");
    }
    as_user(&mut cmd, user);
    let out = cmd.output().map_err(io_err(&bindir.initdb()))?;
    if !out.status.success() {
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        return Err(ClusterError::Initdb { status: out.status, output });
    }
    tracing::info!(pg.data_dir = %data_dir.display(), "created PostgreSQL cluster");
    Ok(())
}

/// The socket lives in the cluster root unless that path is too long for a Unix socket;
/// then in a fresh private directory under /tmp (returned second, to be removed later).
fn socket_dir(root: &Path, user: Option<&User>) -> Result<(PathBuf, Option<PathBuf>), ClusterError> {
    let socket = root.join(format!(".s.PGSQL.{SOCKET_PORT}"));
    if socket.as_os_str().len() <= MAX_SOCKET_PATH_BYTES {
        return Ok((root.to_path_buf(), None));
    }
    let tmp =
        tempfile::Builder::new().prefix("lifeboat-pg-").tempdir_in("/tmp").map_err(io_err(Path::new("/tmp")))?.keep();
    if let Some(u) = user {
        chown(&tmp, Some(u.uid.as_raw()), Some(u.gid.as_raw())).map_err(io_err(&tmp))?;
    }
    Ok((tmp.clone(), Some(tmp)))
}

fn read_pid(guard: &mut Child, log: &Path) -> Result<Pid, ClusterError> {
    let mut line = String::new();
    if let Some(stdout) = guard.stdout.take() {
        // The guard prints the pid right after forking PostgreSQL, before anything else.
        let _ = BufReader::new(stdout).read_line(&mut line);
    }
    line.trim()
        .parse::<i32>()
        .map(Pid::from_raw)
        .map_err(|_| ClusterError::Start { log: log.to_path_buf(), tail: log_tail(log) })
}

/// A postmaster left running from an earlier owner whose guard died too: stop it.
fn stop_orphan(data_dir: &Path) -> Result<(), ClusterError> {
    let pidfile = data_dir.join("postmaster.pid");
    let Ok(text) = fs::read_to_string(&pidfile) else {
        return Ok(());
    };
    let Some(pid) = text.lines().next().and_then(|l| l.trim().parse::<i32>().ok()) else {
        return Ok(());
    };
    let pid = Pid::from_raw(pid);
    if !is_postgres(pid) {
        return Ok(()); // stale file; PostgreSQL itself checks and replaces it
    }
    tracing::warn!(pg.pid = pid.as_raw(), pg.data_dir = %data_dir.display(),
        "stopping a PostgreSQL left running by an earlier owner of this directory");
    let deadline = Instant::now() + Duration::from_secs(60);
    let _ = kill(pid, Signal::SIGINT);
    while is_postgres(pid) {
        if Instant::now() >= deadline {
            let _ = kill(pid, Signal::SIGKILL);
            return Err(ClusterError::StopTimeout(Duration::from_secs(60)));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn is_postgres(pid: Pid) -> bool {
    let Ok(exe) = fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Field 3 (after the parenthesised command) is the state; Z is a zombie, already dead.
    let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
    let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    name.starts_with("postgres") && state != Some('Z')
}

fn log_tail(log: &Path) -> String {
    let Ok(mut f) = File::open(log) else {
        return "(no log)".into();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
