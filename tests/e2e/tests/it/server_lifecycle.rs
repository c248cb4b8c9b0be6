//! `lifeboat-server serve` on the embedded defaults, as an operator runs it: ready on
//! /readyz, stops everything on Ctrl-C, leaves no PostgreSQL behind after SIGKILL, and
//! finds its data again on the next start.

use std::time::Duration;

use lifeboat_e2e::{
    ServerProcess, embedded_db, eventually, have_postgres, http_get, postgres_processes_under, tempdir,
};
use nix::sys::signal::Signal;

#[tokio::test]
async fn ctrl_c_stops_the_server_and_its_postgres() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    let data = dir.path().join("data");
    let mut server = ServerProcess::start(&data, &[]).unwrap();
    let (status, body) = http_get(server.http_addr, "/readyz", None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let pg = postgres_processes_under(&data);
    assert!(!pg.is_empty(), "no embedded PostgreSQL found under {}", data.display());

    server.signal(Signal::SIGINT);
    let status = server.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "exit status {status}");
    let left = postgres_processes_under(&data);
    assert!(left.is_empty(), "PostgreSQL processes left after Ctrl-C: {left:?}");
    assert!(!data.join("postgres/data/postmaster.pid").exists(), "PostgreSQL did not shut down cleanly");
}

#[tokio::test]
async fn sigkill_leaves_no_postgres_and_the_next_start_keeps_the_data() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    let data = dir.path().join("data");
    let mut server = ServerProcess::start(&data, &[]).unwrap();
    let client = embedded_db(&data).await;
    client.execute("INSERT INTO tenants (name) VALUES ('survives-kill-9')", &[]).await.unwrap();
    drop(client);

    server.signal(Signal::SIGKILL);
    server.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(
        eventually(Duration::from_secs(15), || postgres_processes_under(&data).is_empty()),
        "orphaned PostgreSQL still running: {:?}",
        postgres_processes_under(&data)
    );

    let server = ServerProcess::start(&data, &[]).unwrap();
    let (status, body) = http_get(server.http_addr, "/readyz", None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let client = embedded_db(&data).await;
    let n: i64 =
        client.query_one("SELECT count(*) FROM tenants WHERE name = 'survives-kill-9'", &[]).await.unwrap().get(0);
    assert_eq!(n, 1, "the data written before SIGKILL is gone");
}

#[tokio::test]
async fn sigterm_stops_cleanly_too() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    let data = dir.path().join("data");
    let mut server = ServerProcess::start(&data, &[]).unwrap();
    server.signal(Signal::SIGTERM);
    server.wait_log(Duration::from_secs(60), |v| v["message"] == "lifeboat-server stopped").unwrap();
    assert!(server.wait_exit(Duration::from_secs(30)).unwrap().success());
    assert!(postgres_processes_under(&data).is_empty());
}
