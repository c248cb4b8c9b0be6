//! Harness for the end-to-end tests: find the workspace's binaries, run them as real
//! processes, read their structured logs, and look at what they leave running.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod bench;

pub use lifeboat_test_support::{have_postgres, http_get, http_json, http_post_json, in_ci, skip_or_fail};

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

/// `len` incompressible bytes, the same for the same `seed`: BLAKE3's output stream (an
/// optimised dependency, so fast even in debug builds).
pub fn incompressible(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0; len];
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut data);
    data
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
            data = incompressible(len, next());
        }
        data.truncate(len);
        // As in a real backup directory: <first two hex digits>/<fileID>.
        std::fs::write(dir.join(&name), &data)?;
    }
    Ok(())
}

/// Every file under `root` with its bytes, by relative path.
pub fn read_tree(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    lifeboat_agent::pipeline::transfer::list_files(root)
        .expect("listing a tree")
        .into_iter()
        .map(|rel| {
            let bytes = std::fs::read(root.join(&rel)).expect("reading a file");
            (rel, bytes)
        })
        .collect()
}

/// Every chunk of the regular files under `root` as the agent cuts and names them with
/// `keys` (FastCDC with the id key's gear seed, keyed BLAKE3 ids), each with the length of
/// its sealed blob (zstd when that pays, plus version, compression, nonce and tag: it
/// depends on the plaintext alone, not the nonce) — what an upload of it sends and what
/// the server indexes. Also the number of chunk references (a chunk in two files twice).
pub fn sealed_chunks(
    root: &Path,
    keys: &lifeboat_agent::pipeline::transfer::Keys,
) -> (std::collections::HashMap<lifeboat_shared::ids::ChunkId, u64>, u64) {
    let seed = keys.id.chunker_seed();
    let mut chunks = std::collections::HashMap::new();
    let mut refs = 0u64;
    for rel in lifeboat_agent::pipeline::transfer::list_files(root).expect("listing a tree") {
        let data = std::fs::read(root.join(&rel)).expect("reading a file");
        for range in lifeboat_shared::chunk::boundaries(&data, seed) {
            let plain = &data[range];
            let id = keys.id.chunk_id(plain);
            refs += 1;
            chunks.entry(id).or_insert_with(|| {
                let nonce = [0; lifeboat_shared::format::NONCE_BYTES];
                lifeboat_shared::chunk::seal_chunk(&keys.data, &id, plain, nonce).len() as u64
            });
        }
    }
    (chunks, refs)
}

/// A connection to the embedded PostgreSQL of a server process running on `data_dir`.
pub async fn embedded_db(data_dir: &Path) -> tokio_postgres::Client {
    let mut config = tokio_postgres::Config::new();
    config.host_path(data_dir.join("postgres")).port(5432).user("lifeboat").dbname("lifeboat");
    lifeboat_server::platform::db::connect(&config, Duration::from_secs(10))
        .await
        .expect("connecting to the embedded database")
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

/// Creates `tenant` on the running `server` and returns a one-time enrolment token that
/// names the server's real QUIC address.
pub fn tenant_with_token(server: &ServerProcess, tenant: &str) -> anyhow::Result<String> {
    let (ok, _, err) = server_cli(&server.data_dir, &["tenant", "create", tenant, "--encryption", "off"]);
    anyhow::ensure!(ok, "tenant create: {err}");
    let out = Command::new(bin("lifeboat-server"))
        .arg("--data-dir")
        .arg(&server.data_dir)
        .args(["--quic-advertise", &server.quic_addr.to_string(), "token", "create", "--tenant", tenant])
        .output()?;
    anyhow::ensure!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What [`make_iphone_backup`] put into a backup directory.
#[derive(Debug, Clone, Copy)]
pub struct BackupContent {
    pub messages: i64,
    pub contacts: i64,
    pub photos: i64,
}

/// Writes a small but well-formed iPhone backup directory (as MobileBackup2 leaves it):
/// Info.plist, Status.plist, Manifest.plist, Manifest.db with MBFile records, and
/// `xx/<fileID>` files — sms.db, AddressBook.sqlitedb and Photos.sqlite with the given
/// numbers of rows, photos with JPEG headers, app data.
pub fn make_iphone_backup(root: &Path, seed: u64, content: BackupContent, photo_bytes: usize) -> std::io::Result<()> {
    std::fs::create_dir_all(root)?;
    let tmp = tempfile::tempdir()?;
    let sql = |name: &str, ddl: &str, insert: &str, n: i64| -> std::io::Result<Vec<u8>> {
        let path = tmp.path().join(name);
        let db = rusqlite::Connection::open(&path).map_err(std::io::Error::other)?;
        db.execute_batch(ddl).map_err(std::io::Error::other)?;
        for i in 0..n {
            db.execute(insert, [i]).map_err(std::io::Error::other)?;
        }
        drop(db);
        std::fs::read(&path)
    };
    let mut files: Vec<(String, String, Vec<u8>)> = vec![
        (
            "HomeDomain".into(),
            "Library/SMS/sms.db".into(),
            sql(
                "sms.db",
                "CREATE TABLE handle (ROWID INTEGER PRIMARY KEY, id TEXT); \
                 CREATE TABLE message (ROWID INTEGER PRIMARY KEY, text TEXT, handle_id INTEGER, date INTEGER);",
                "INSERT INTO message (text, handle_id, date) VALUES ('message ' || ?1, 1, ?1)",
                content.messages,
            )?,
        ),
        (
            "HomeDomain".into(),
            "Library/AddressBook/AddressBook.sqlitedb".into(),
            sql(
                "ab.db",
                "CREATE TABLE ABPerson (ROWID INTEGER PRIMARY KEY, first TEXT, middle TEXT, last TEXT, organization TEXT); \
                 CREATE TABLE ABMultiValue (UID INTEGER PRIMARY KEY, record_id INTEGER, value TEXT);",
                "INSERT INTO ABPerson (first, last) VALUES ('Person', ?1)",
                content.contacts,
            )?,
        ),
        (
            "CameraRollDomain".into(),
            "Media/PhotoData/Photos.sqlite".into(),
            sql(
                "photos.db",
                "CREATE TABLE ZASSET (Z_PK INTEGER PRIMARY KEY, ZFILENAME TEXT);",
                "INSERT INTO ZASSET (ZFILENAME) VALUES ('IMG_' || ?1 || '.JPG')",
                content.photos,
            )?,
        ),
    ];
    for i in 0..content.photos {
        let mut body = vec![0u8; photo_bytes];
        blake3::Hasher::new().update(&seed.to_le_bytes()).update(&i.to_le_bytes()).finalize_xof().fill(&mut body);
        body[..4].copy_from_slice(&[0xff, 0xd8, 0xff, 0xe1]);
        files.push(("CameraRollDomain".into(), format!("Media/DCIM/100APPLE/IMG_{i:04}.JPG"), body));
    }
    for i in 0..20 {
        files.push((
            "AppDomain-com.example.notes".into(),
            format!("Library/Preferences/pref{i}.plist"),
            format!("<plist><dict><key>n</key><integer>{i}</integer></dict></plist>").into_bytes(),
        ));
    }
    let mut rows = Vec::with_capacity(files.len());
    for (domain, path, data) in &files {
        let row =
            virtual_iphone::manifest::ManifestFile::file(domain, path, data.len() as u64, 1_700_000_000, 0o100644);
        std::fs::create_dir_all(root.join(&row.file_id[..2]))?;
        std::fs::write(root.join(&row.file_id[..2]).join(&row.file_id), data)?;
        rows.push(row);
    }
    let db = virtual_iphone::manifest::build_manifest_db(&rows).map_err(std::io::Error::other)?;
    std::fs::write(root.join("Manifest.db"), db)?;
    let status = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\"><dict>\
        <key>BackupState</key><string>new</string><key>IsFullBackup</key><true/>\
        <key>SnapshotState</key><string>finished</string><key>UUID</key><string>00000000-0000-0000-0000-000000000000</string>\
        <key>Version</key><string>3.3</string></dict></plist>\n";
    std::fs::write(root.join("Status.plist"), status)?;
    let info = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\"><dict>\
        <key>Device Name</key><string>Test iPhone</string><key>Product Type</key><string>iPhone15,2</string>\
        <key>Product Version</key><string>17.5</string></dict></plist>\n";
    std::fs::write(root.join("Info.plist"), info)?;
    std::fs::write(
        root.join("Manifest.plist"),
        "<?xml version=\"1.0\"?><plist version=\"1.0\"><dict><key>IsEncrypted</key><false/></dict></plist>\n",
    )?;
    Ok(())
}

/// A backup fileID: SHA-1 of `domain-relativePath`, lowercase hex.
pub use virtual_iphone::manifest::file_id;

/// The files of an iPhone backup directory in `virtual-iphone expect`'s format (domain,
/// relative path, size, SHA-256), sorted: what a restored or downloaded backup is
/// compared against.
pub fn iphone_backup_content(dir: &Path) -> Vec<String> {
    let rows =
        virtual_iphone::manifest::read_manifest_db(&std::fs::read(dir.join("Manifest.db")).expect("Manifest.db"))
            .expect("a readable Manifest.db");
    let mut lines: Vec<String> = rows
        .iter()
        .filter(|r| r.flags == 1)
        .map(|r| {
            let bytes = std::fs::read(dir.join(&r.file_id[..2]).join(&r.file_id)).expect("a file of the backup");
            let sha: String = ring::digest::digest(&ring::digest::SHA256, &bytes)
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("{}\t{}\t{}\t{sha}", r.domain, r.path, bytes.len())
        })
        .collect();
    lines.sort();
    lines
}

/// Configuration for an in-process test server: a test database, loopback ports chosen by
/// the OS, local-disk storage in `data_dir`, and no background restore tests (tests run
/// them when they want them).
pub fn server_config(db_url: &str, data_dir: &Path) -> lifeboat_server::config::Config {
    use lifeboat_server::config::{Config, FileConfig, Overrides};
    let o = Overrides {
        data_dir: Some(data_dir.to_path_buf()),
        database_url: Some(db_url.to_string()),
        http_listen: "127.0.0.1:0".parse().ok(),
        quic_listen: "127.0.0.1:0".parse().ok(),
        ..Default::default()
    };
    let mut config = Config::merge(FileConfig::default(), &o).expect("a valid test configuration");
    config.fleet.restore_tests = false;
    config
}

/// Enrols a new agent of `tenant` into a running server; returns its connection and keys.
pub async fn enrol(
    server: &lifeboat_server::serve::Running,
    db: &tokio_postgres::Client,
    tenant: lifeboat_shared::ids::TenantId,
    hostname: &str,
) -> anyhow::Result<(lifeboat_agent::net::Client, lifeboat_agent::pipeline::transfer::Keys)> {
    let addr = server.quic_addr.to_string();
    let token = lifeboat_server::auth::create_enroll_token(
        db,
        tenant,
        Duration::from_secs(3600),
        addr.clone(),
        server.cert_fingerprint,
    )
    .await?;
    let auth = lifeboat_shared::wire::Auth::Enroll {
        token_secret: token.secret.to_vec(),
        hostname: hostname.into(),
        agent_version: "test".into(),
    };
    let client = lifeboat_agent::net::Client::connect(&addr, server.cert_fingerprint, auth).await?;
    let e = client.accepted.enrolled.clone().ok_or_else(|| anyhow::anyhow!("the welcome carried no keys"))?;
    Ok((client, lifeboat_agent::pipeline::transfer::Keys::from_bytes(e.id_key, e.data_key)))
}

/// Registers `device` and opens a backup run for it: returns the run and its snapshot id.
pub async fn open_run(
    client: &lifeboat_agent::net::Client,
    device: &lifeboat_shared::manifest::DeviceInfo,
) -> anyhow::Result<(lifeboat_shared::ids::RunId, lifeboat_shared::ids::SnapshotId)> {
    use lifeboat_shared::wire::{Request, Response};
    client.request(&Request::RegisterDevice { device: device.clone(), serial_number: None }).await?;
    match client.request(&Request::OpenRun { udid: device.udid.clone(), resume: None }).await? {
        Response::RunOpened { run, snapshot, .. } => Ok((run, snapshot)),
        other => anyhow::bail!("expected RunOpened, got {other:?}"),
    }
}

/// The regular files under `root` with a `packs` directory in their path below it: a
/// local-disk storage's packs.
pub fn pack_files(root: &Path) -> Vec<PathBuf> {
    lifeboat_agent::pipeline::transfer::list_files(root)
        .unwrap_or_default()
        .into_iter()
        .filter(|rel| rel.split('/').any(|c| c == "packs"))
        .map(|rel| root.join(rel))
        .collect()
}

/// How many bytes of `path` are in the page cache, as util-linux's `fincore` reports them
/// (Debian package `util-linux-extra`, which `scripts/test` installs). `None` where the
/// file system keeps everything in memory anyway (tmpfs), so the question means nothing.
pub fn cached_bytes(path: &Path) -> std::io::Result<Option<u64>> {
    if nix::sys::statfs::statfs(path)?.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC {
        return Ok(None);
    }
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
        .arg(path)
        .output()
        .map_err(|e| {
            std::io::Error::new(e.kind(), format!("running fincore (Debian package util-linux-extra): {e}"))
        })?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!("fincore: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().map(Some).map_err(|e| std::io::Error::other(format!("fincore said {text:?}: {e}")))
}

/// A new help-desk user's API credential in `tenant` (`lifeboat-server user create
/// --role helpdesk`, done on the database).
pub async fn helpdesk_credential(db: &tokio_postgres::Client, tenant: lifeboat_shared::ids::TenantId) -> String {
    lifeboat_server::users::create(db, tenant, "e2e help desk", lifeboat_server::users::Role::Helpdesk, None)
        .await
        .expect("creating a help-desk user")
        .1
}

/// Starts an export of `snapshot` for a new help-desk user, so `client`'s agent may read
/// it (a server serves a snapshot only within a job of the agent's); returns the job.
pub async fn start_export(
    client: &lifeboat_agent::net::Client,
    db: &tokio_postgres::Client,
    snapshot: lifeboat_shared::ids::SnapshotId,
) -> lifeboat_shared::ids::RestoreJobId {
    use lifeboat_shared::wire::{JobRequest, JobSource, Request, Response};
    let credential = helpdesk_credential(db, client.accepted.tenant).await;
    let job = JobRequest::Export { source: JobSource::Snapshot(snapshot) };
    match client.request(&Request::StartJob { credential: credential.into(), job }).await {
        Ok(Response::RestoreJob { job, snapshot: s }) if s == snapshot => job,
        other => panic!("starting an export of {snapshot}: {other:?}"),
    }
}

/// Ends `job` as succeeded: the agent reads nothing more of its snapshot.
pub async fn end_job(client: &lifeboat_agent::net::Client, job: lifeboat_shared::ids::RestoreJobId) {
    use lifeboat_shared::wire::{Request, RestoreEnd};
    client.request(&Request::EndRestore { job, end: RestoreEnd::Succeeded }).await.expect("ending the job");
}

/// Downloads `snapshot` into `dest` as a help-desk export (started and ended around it),
/// every chunk verified.
pub async fn download_as_export(
    client: &lifeboat_agent::net::Client,
    db: &tokio_postgres::Client,
    keys: &lifeboat_agent::pipeline::transfer::Keys,
    snapshot: lifeboat_shared::ids::SnapshotId,
    dest: &Path,
) -> lifeboat_shared::manifest::Manifest {
    let job = start_export(client, db, snapshot).await;
    let manifest = lifeboat_agent::pipeline::transfer::download_snapshot(client, keys, snapshot, dest)
        .await
        .expect("downloading the snapshot");
    end_job(client, job).await;
    manifest
}
