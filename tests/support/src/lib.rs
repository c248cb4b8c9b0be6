//! Test harness: one private PostgreSQL cluster per test process, one fresh database per
//! test cloned from a migrated template.
//!
//! initdb and migrating take about a second, so they happen once per machine: a migrated
//! template cluster is kept under the temp directory, keyed by the PostgreSQL binaries and
//! the migrations' checksums, and each test process starts from a copy of it. The
//! process's cluster is never dropped; its guard stops it and removes its directory when
//! the process exits.
//!
//! When PostgreSQL is not installed, [`test_db`] returns `None` so the test can skip with
//! a message — except in CI (`CI=true`), where it panics: a skipped suite must not pass.

use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::fcntl::{Flock, FlockArg};

use lifeboat_server::platform::db;
use lifeboat_server::platform::pg::{BinDir, Cluster, ClusterOptions, Durability};

/// Name of the migrated template database inside each test cluster.
pub const TEMPLATE_DB: &str = "lifeboat_template";

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// A fresh, migrated database of its own for one test.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub config: tokio_postgres::Config,
    pub url: String,
}

impl TestDb {
    pub async fn client(&self) -> tokio_postgres::Client {
        db::connect(&self.config, std::time::Duration::from_secs(10)).await.expect("connecting to the test database")
    }

    pub fn pool(&self) -> deadpool_postgres::Pool {
        db::pool(self.config.clone(), 8).expect("building the test pool")
    }
}

/// True when running in CI, where missing outside programs fail tests instead of skipping them.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Says why a test is skipped; in CI, fails it instead.
pub fn skip_or_fail(what: &str) {
    assert!(!in_ci(), "{what} (CI=true: a test that cannot run fails)");
    eprintln!("SKIPPED: {what}");
}

/// Whether PostgreSQL's server binaries are installed; if not, says the test is skipped
/// (and fails it in CI).
pub fn have_postgres() -> bool {
    match BinDir::locate() {
        Ok(_) => true,
        Err(e) => {
            skip_or_fail(&format!("PostgreSQL not installed: {e}"));
            false
        }
    }
}

/// The process-wide test cluster, started on first use.
pub fn cluster() -> Option<&'static Cluster> {
    match CLUSTER.get_or_init(start_process_cluster) {
        Ok(c) => Some(c),
        Err(e) => {
            skip_or_fail(&format!("no PostgreSQL for tests: {e}"));
            None
        }
    }
}

/// A new database cloned from the migrated template, or `None` (skip) without PostgreSQL.
pub async fn test_db() -> Option<TestDb> {
    let cluster = cluster()?;
    let name = format!("t_{}_{}", std::process::id(), NEXT_DB.fetch_add(1, Ordering::Relaxed));
    let admin = db::connect(&cluster.config("postgres"), std::time::Duration::from_secs(10))
        .await
        .expect("connecting to the test cluster");
    admin
        .batch_execute(&format!("CREATE DATABASE \"{name}\" TEMPLATE {TEMPLATE_DB} STRATEGY FILE_COPY"))
        .await
        .expect("cloning the template database");
    Some(TestDb { config: cluster.config(&name), url: cluster.url(&name), name })
}

fn start_process_cluster() -> Result<Cluster, String> {
    let template = template_cluster().map_err(|e| format!("{e:#}"))?;
    let root = tempfile::Builder::new()
        .prefix("lifeboat-test-pg-")
        .tempdir()
        .map_err(|e| format!("creating a temp dir: {e}"))?
        .keep();
    copy_dir(&template.join("data"), &root.join("data"))?;
    let opts = ClusterOptions { durability: Durability::Fast, ephemeral: true, ..ClusterOptions::new(&root) };
    Cluster::start(&opts).map_err(|e| e.to_string())
}

/// The migrated template cluster, built once per machine (under a file lock).
fn template_cluster() -> anyhow::Result<PathBuf> {
    let bindir = BinDir::locate()?;
    let mut h = DefaultHasher::new();
    bindir.path().hash(&mut h);
    for (version, name) in db::known_migrations() {
        (version, name).hash(&mut h);
    }
    // Checksums too: an edited migration must not reuse a stale template.
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations"))? {
        let path = entry?.path();
        std::fs::read(&path)?.hash(&mut h);
    }
    let base = std::env::temp_dir();
    let dir = base.join(format!("lifeboat-test-pg-template-{:016x}", h.finish()));
    let lock_file = std::fs::File::create(base.join("lifeboat-test-pg-template.lock"))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| e)?;
    if dir.join("ready").exists() {
        return Ok(dir);
    }
    let building = base.join(format!("{}.building", dir.file_name().and_then(|n| n.to_str()).unwrap_or("t")));
    let _ = std::fs::remove_dir_all(&building);
    let opts = ClusterOptions { durability: Durability::Fast, ..ClusterOptions::new(&building) };
    let cluster = Cluster::start(&opts)?;
    let config = cluster.config("postgres");
    let template_config = cluster.config(TEMPLATE_DB);
    // Callers may be inside a runtime already: migrate on a thread of our own.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let admin = db::connect(&config, std::time::Duration::from_secs(10)).await?;
            db::ensure_database(&admin, TEMPLATE_DB).await?;
            let mut client = db::connect(&template_config, std::time::Duration::from_secs(10)).await?;
            db::migrate(&mut client).await?;
            anyhow::Ok(())
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("migrating the template database panicked"))??;
    cluster.stop()?;
    std::fs::write(building.join("ready"), b"")?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&building, &dir)?;
    Ok(dir)
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), String> {
    // `cp -a` keeps ownership (the `postgres` user when tests run as root) and modes.
    let out = Command::new("cp").arg("-a").arg(from).arg(to).output().map_err(|e| format!("running cp: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("cp -a {} {}: {}", from.display(), to.display(), String::from_utf8_lossy(&out.stderr)))
    }
}

/// A minimal HTTP/1.1 GET for tests (no client library needed): returns status and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str, bearer: Option<&str>) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, bearer).await
}

/// A minimal bodiless HTTP/1.1 request: returns status and body.
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
) -> std::io::Result<(u16, String)> {
    http_send(addr, method, path, bearer, None).await
}

/// `POST` of a JSON body: returns status and body.
pub async fn http_post_json(
    addr: std::net::SocketAddr,
    path: &str,
    bearer: Option<&str>,
    json: &str,
) -> std::io::Result<(u16, String)> {
    http_send(addr, "POST", path, bearer, Some(json)).await
}

/// Any method with a JSON body (`PUT`, `PATCH`…): returns status and body.
pub async fn http_json(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    json: &str,
) -> std::io::Result<(u16, String)> {
    http_send(addr, method, path, bearer, Some(json)).await
}

async fn http_send(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    json: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let auth = bearer.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let body = json.unwrap_or_default();
    let kind = if json.is_some() { "Content-Type: application/json\r\n" } else { "" };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{kind}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    Ok((status, if chunked { dechunk(body) } else { body.to_string() }))
}

/// An HTTP/1.1 answer: status, headers (names lowercased) and body bytes.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Any request with any headers and body, answered as bytes (chunked bodies joined).
pub async fn http_raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpAnswer> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| std::io::Error::other("no HTTP head"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
            let Ok(n) = usize::from_str_radix(String::from_utf8_lossy(&rest[..end]).trim(), 16) else { break };
            if n == 0 || rest.len() < end + 2 + n {
                break;
            }
            out.extend_from_slice(&rest[end + 2..end + 2 + n]);
            rest = &rest[(end + 4 + n).min(rest.len())..];
        }
        body = out;
    }
    Ok(HttpAnswer { status, headers, body })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A local S3-compatible server (moto, from PyPI) for the storage conformance suite,
/// one per test process, stopped by a guard shell when the process exits.
#[derive(Debug)]
pub struct S3Server {
    pub endpoint: String,
    _helper: Helper,
}

static S3: OnceLock<Result<S3Server, String>> = OnceLock::new();
static NEXT_BUCKET: AtomicU32 = AtomicU32::new(0);

/// Stops the child (fd 0 of the guard closes when this process exits) — the same
/// pattern as the PostgreSQL guard, for a process that needs no orderly shutdown.
const KILL_ON_EOF: &str = r#"exec 3<&0; "$@" </dev/null 3<&- & pid=$!; read -r _ <&3; kill "$pid"; wait "$pid""#;

/// A helper server for tests (moto, Prometheus), stopped (SIGTERM) when this is dropped or
/// when the test process exits, however it exits.
#[derive(Debug)]
pub struct Helper {
    guard: std::process::Child,
}

impl Drop for Helper {
    fn drop(&mut self) {
        drop(self.guard.stdin.take()); // the guard kills the helper and waits for it
        let _ = self.guard.wait();
    }
}

/// Starts `argv` under a guard shell; see [`Helper`].
pub fn spawn_stopped_on_exit(argv: &[&str]) -> std::io::Result<Helper> {
    let guard = Command::new("sh")
        .args(["-c", KILL_ON_EOF, "test-helper-guard"])
        .args(argv)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()?;
    Ok(Helper { guard })
}

/// A free TCP port on 127.0.0.1 (bound and released; tiny race with other processes).
pub fn free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port())
}

fn start_moto() -> Result<S3Server, String> {
    let probe = Command::new("python3").args(["-c", "import moto.server"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        return Err("moto is not installed (pip install 'moto[server]')".into());
    }
    let port = free_port().map_err(|e| format!("finding a free port: {e}"))?;
    let guard = spawn_stopped_on_exit(&["python3", "-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .map_err(|e| format!("starting moto: {e}"))?;
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
            return Err(format!("moto did not listen on {endpoint} within 30 s"));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(S3Server { endpoint, _helper: guard })
}

/// The process's S3 server, or `None` (skip; fails in CI) when moto is missing.
pub fn s3_server() -> Option<&'static S3Server> {
    match S3.get_or_init(start_moto) {
        Ok(s) => Some(s),
        Err(e) => {
            skip_or_fail(&format!("no S3-compatible server for tests: {e}"));
            None
        }
    }
}

/// A fresh bucket on the test S3 server, as storage configuration.
pub async fn s3_bucket() -> Option<lifeboat_server::config::StorageConfig> {
    let server = s3_server()?;
    let bucket = format!("lifeboat-test-{}-{}", std::process::id(), NEXT_BUCKET.fetch_add(1, Ordering::Relaxed));
    // moto does not check signatures: an unsigned PUT creates the bucket.
    let addr = server.endpoint.trim_start_matches("http://").parse().expect("moto address");
    let status = http_request(addr, "PUT", &format!("/{bucket}"), None).await.expect("creating a bucket").0;
    assert_eq!(status, 200, "creating bucket {bucket} on moto");
    Some(lifeboat_server::config::StorageConfig::S3(lifeboat_server::config::S3Config {
        endpoint: Some(server.endpoint.clone()),
        bucket,
        region: "us-east-1".into(),
        access_key_id: Some(lifeboat_shared::Secret::new("testing".into())),
        secret_access_key: Some(lifeboat_shared::Secret::new("testing".into())),
        root: "/lifeboat".into(),
    }))
}
