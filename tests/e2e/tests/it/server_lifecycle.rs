//! `lifeboat-server serve` on the embedded defaults, as an operator runs it: ready on
//! /readyz, stops everything on Ctrl-C, leaves no PostgreSQL behind after SIGKILL, and
//! finds its data again on the next start.

use std::sync::Arc;
use std::time::Duration;

use lifeboat_e2e::{
    ServerProcess, embedded_db, eventually, have_postgres, http_get, postgres_processes_under, server_cli, tempdir,
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

/// A self-signed certificate for `localhost` and its key, PEM.
fn tls_pair() -> (String, String, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    (ck.cert.pem(), ck.signing_key.serialize_pem(), ck.cert.der().to_vec())
}

/// GET `path` over TLS trusting `roots`; the status and the leaf certificate presented.
async fn https_get(addr: std::net::SocketAddr, roots: &[&[u8]], path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(rustls::pki_types::CertificateDer::from(r.to_vec())).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    tls.read_to_string(&mut response).await?;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, leaf))
}

/// The HTTP listener over TLS with the operator's certificate, replaced on SIGHUP
/// without a restart; a pair that does not load is refused at start (naming the file)
/// and, on reload, leaves the certificate in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_listener_serves_tls_and_rotates_its_certificate_on_sighup() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    let (cert_pem, key_pem, first) = tls_pair();
    let (cert_file, key_file) = (dir.path().join("http.crt"), dir.path().join("http.key"));
    std::fs::write(&cert_file, &cert_pem).unwrap();
    std::fs::write(&key_file, &key_pem).unwrap();
    let (c, k) = (cert_file.to_str().unwrap(), key_file.to_str().unwrap());

    // A key of another certificate: refused before anything is served.
    let (_, other_key, _) = tls_pair();
    let wrong_key = dir.path().join("other.key");
    std::fs::write(&wrong_key, other_key).unwrap();
    let (ok, _, err) = server_cli(
        &dir.path().join("refused"),
        &["--http-tls-cert-file", c, "--http-tls-key-file", wrong_key.to_str().unwrap(), "serve"],
    );
    assert!(!ok && err.contains("other.key: does not match the certificate"), "{err}");

    let mut server =
        ServerProcess::start(&dir.path().join("data"), &["--http-tls-cert-file", c, "--http-tls-key-file", k]).unwrap();
    let addr = server.http_addr;
    let (status, leaf) = https_get(addr, &[&first], "/healthz").await.unwrap();
    assert_eq!((status, leaf == first), (200, true));
    let (status, _) = https_get(addr, &[&first], "/readyz").await.unwrap();
    assert_eq!(status, 200);
    assert!(http_get(addr, "/healthz", None).await.map(|(s, _)| s).unwrap_or(0) != 200, "no plain HTTP");

    // Rotation: new files, SIGHUP, the next connections get the new certificate.
    let (cert_pem, key_pem, second) = tls_pair();
    std::fs::write(&key_file, key_pem).unwrap();
    std::fs::write(&cert_file, cert_pem).unwrap();
    server.signal(Signal::SIGHUP);
    server
        .wait_log(Duration::from_secs(10), |v| {
            v["message"].as_str().is_some_and(|m| m.contains("presents the certificate read again"))
        })
        .unwrap();
    let (status, leaf) = https_get(addr, &[&first, &second], "/healthz").await.unwrap();
    assert_eq!((status, leaf == second), (200, true));

    // A damaged file on the next reload: logged, and the rotated certificate stays.
    std::fs::write(&cert_file, "not a certificate").unwrap();
    server.signal(Signal::SIGHUP);
    let logged = server
        .wait_log(Duration::from_secs(10), |v| {
            v["message"].as_str().is_some_and(|m| m.contains("could not be read again"))
        })
        .unwrap();
    assert!(logged["error"].as_str().unwrap().contains("http.crt: no PEM certificate in it"), "{logged}");
    let (status, leaf) = https_get(addr, &[&first, &second], "/healthz").await.unwrap();
    assert_eq!((status, leaf == second), (200, true));
}
