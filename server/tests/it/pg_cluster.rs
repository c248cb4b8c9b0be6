//! The private PostgreSQL cluster manager: start, reuse, lock, orphan handling, cleanup.

use std::path::Path;
use std::time::Duration;

use lifeboat_server::platform::db;
use lifeboat_server::platform::pg::{Cluster, ClusterError, ClusterOptions, Durability};
use lifeboat_test_support::have_postgres;

/// A temp dir that the `postgres` user can traverse when the tests run as root.
fn tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn fast(root: &Path) -> ClusterOptions {
    ClusterOptions { durability: Durability::Fast, ..ClusterOptions::new(root) }
}

fn alive(pid: i32) -> bool {
    // A zombie is not alive; its parent just has not reaped it yet.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

fn children_of(parent: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').nth(1)?.parse::<i32>().ok()) == Some(parent)
            })
        })
        .collect()
}

async fn query_i64(cluster: &Cluster, db: &str, sql: &str) -> i64 {
    let client = db::connect(&cluster.config(db), Duration::from_secs(10)).await.unwrap();
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn starts_answers_on_its_socket_only_and_stops() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    let cluster = Cluster::start(&fast(dir.path())).unwrap();
    let pid = cluster.pid();
    assert!(alive(pid));
    assert_eq!(query_i64(&cluster, "postgres", "SELECT (40 + 2)::bigint").await, 42);
    let client = db::connect(&cluster.config("postgres"), Duration::from_secs(10)).await.unwrap();
    let listen: String = client.query_one("SHOW listen_addresses", &[]).await.unwrap().get(0);
    assert_eq!(listen, "", "no TCP listener");
    let root: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(root, "lifeboat");
    drop(client);

    let socket = cluster.root().join(".s.PGSQL.5432");
    assert!(socket.exists());
    tokio::task::spawn_blocking(move || cluster.stop()).await.unwrap().unwrap();
    assert!(!alive(pid), "postmaster {pid} still running after stop");
    assert!(!socket.exists(), "socket left behind");
    assert!(dir.path().join("data/PG_VERSION").exists(), "a durable cluster keeps its data");
}

/// Creates a cluster in `root` holding table `kept` with the row 7, and stops it.
async fn create_with_a_kept_row(root: &Path) {
    let cluster = Cluster::start(&ClusterOptions::new(root)).unwrap();
    let client = db::connect(&cluster.config("postgres"), Duration::from_secs(10)).await.unwrap();
    client.batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)").await.unwrap();
    drop(client);
    tokio::task::spawn_blocking(move || cluster.stop()).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_restarted_cluster_keeps_its_data() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    create_with_a_kept_row(dir.path()).await;

    let cluster = Cluster::start(&ClusterOptions::new(dir.path())).unwrap();
    assert_eq!(query_i64(&cluster, "postgres", "SELECT sum(v)::bigint FROM kept").await, 7);
}

#[tokio::test]
async fn a_running_cluster_cannot_be_started_twice() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    let _first = Cluster::start(&fast(dir.path())).unwrap();
    match Cluster::start(&fast(dir.path())) {
        Err(ClusterError::InUse(path)) => assert_eq!(path, std::fs::canonicalize(dir.path()).unwrap()),
        other => panic!("expected InUse, got {other:?}"),
    }
}

#[tokio::test]
async fn an_ephemeral_cluster_removes_its_directory() {
    if !have_postgres() {
        return;
    }
    let parent = tempdir();
    let root = parent.path().join("pg");
    let opts = ClusterOptions { ephemeral: true, ..fast(&root) };
    let cluster = Cluster::start(&opts).unwrap();
    assert!(root.join("data").exists());
    drop(cluster);
    assert!(!root.exists(), "{} still exists", root.display());
}

#[tokio::test]
async fn an_orphan_left_by_a_dead_owner_and_guard_is_stopped_at_the_next_start() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    let cluster = Cluster::start(&fast(dir.path())).unwrap();
    let orphan = cluster.pid();
    // Kill the guard and its watcher subshell outright: nothing is left to stop PostgreSQL.
    let guard = cluster.guard_pid() as i32;
    for pid in children_of(guard).into_iter().filter(|p| *p != orphan).chain([guard]) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    }
    drop(cluster); // releases the lock, as a dead owner would
    assert!(alive(orphan), "PostgreSQL should outlive its killed guard for this test");

    let cluster = Cluster::start(&fast(dir.path())).unwrap();
    assert_ne!(cluster.pid(), orphan);
    assert!(!alive(orphan), "the orphan {orphan} was not stopped");
    assert_eq!(query_i64(&cluster, "postgres", "SELECT 1::bigint").await, 1);
}

#[tokio::test]
async fn a_socket_path_too_long_for_unix_sockets_moves_to_tmp() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    let deep = dir.path().join("a".repeat(60)).join("b".repeat(60));
    let cluster = Cluster::start(&fast(&deep)).unwrap();
    assert_eq!(query_i64(&cluster, "postgres", "SELECT 5::bigint").await, 5);
    let url = cluster.url("postgres");
    assert!(url.starts_with("postgresql://lifeboat@%2Ftmp%2Flifeboat-pg-"), "{url}");
}

#[test]
fn a_data_directory_that_is_not_a_cluster_is_refused() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/precious.txt"), b"do not overwrite").unwrap();
    let err = Cluster::start(&fast(dir.path())).unwrap_err();
    assert!(matches!(err, ClusterError::NotACluster(_)), "{err}");
    assert_eq!(std::fs::read(dir.path().join("data/precious.txt")).unwrap(), b"do not overwrite");
}

#[test]
fn as_root_a_directory_postgres_cannot_reach_is_named() {
    if !nix::unistd::geteuid().is_root() || !have_postgres() {
        return; // only root hands PostgreSQL to another user
    }
    use std::os::unix::fs::PermissionsExt as _;
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap(); // like /root
    let err = Cluster::start(&fast(&private.path().join("pg"))).unwrap_err();
    match &err {
        ClusterError::Unreachable { user, path } => {
            assert_eq!(user, "postgres");
            assert_eq!(path, &std::fs::canonicalize(private.path()).unwrap());
        }
        other => panic!("expected Unreachable, got {other}"),
    }
    assert!(err.to_string().contains("chmod o+x"), "{err}");
}

/// Every file under `dir` with its length and modification time.
fn listing(dir: &Path) -> Vec<(std::path::PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), m.len(), m.modified().unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Data created by another major version than the binaries found (here: the data says
/// 14, the machine has newer binaries) is refused before anything touches it, with the
/// documented way out; with its own version back it starts as before.
#[tokio::test]
async fn data_of_another_postgresql_major_version_is_refused_untouched() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    create_with_a_kept_row(dir.path()).await;

    let data = std::fs::canonicalize(dir.path()).unwrap().join("data");
    let version_file = data.join("PG_VERSION");
    let ours = std::fs::read_to_string(&version_file).unwrap();
    let binaries: u32 = ours.trim().parse().unwrap();
    std::fs::write(&version_file, "14\n").unwrap();
    let before = listing(dir.path());
    match Cluster::start(&ClusterOptions::new(dir.path())) {
        Err(e @ ClusterError::VersionMismatch { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&format!("{} was created by PostgreSQL 14", data.display())), "{text}");
            assert!(text.contains(&format!("is version {binaries}: nothing was changed")), "{text}");
            assert!(text.contains("upgrade the data with pg_upgrade as docs/operations.md says"), "{text}");
        }
        other => panic!("expected VersionMismatch, got {other:?}"),
    }
    assert_eq!(listing(dir.path()), before, "the data directory was touched");

    std::fs::write(&version_file, ours).unwrap();
    let cluster = Cluster::start(&ClusterOptions::new(dir.path())).unwrap();
    assert_eq!(query_i64(&cluster, "postgres", "SELECT sum(v)::bigint FROM kept").await, 7);
}
