//! The HTTP endpoints of a server started in-process on a test database and temp storage.

use lifeboat_server::config::{Config, FileConfig, Overrides};
use lifeboat_server::serve;
use lifeboat_test_support::{http_get, test_db};

fn config(url: String, data_dir: &std::path::Path) -> Config {
    let o = Overrides {
        data_dir: Some(data_dir.to_path_buf()),
        database_url: Some(url),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        quic_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    Config::merge(FileConfig::default(), &o).unwrap()
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let Some(tdb) = test_db().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let running = serve::start(config(tdb.url.clone(), dir.path())).await.unwrap();
    let addr = running.http_addr;

    assert_eq!(http_get(addr, "/healthz", None).await.unwrap(), (200, "ok\n".into()));
    let (status, body) = http_get(addr, "/readyz", None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], true);

    let (status, body) = http_get(addr, "/metrics", None).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("lifeboat_build_info{version=\""), "{body}");
    assert!(body.contains("lifeboat_ready{dependency=\"database\"} 1"), "{body}");
    assert!(
        body.contains("lifeboat_http_request_duration_seconds_count{route=\"/readyz\",status=\"2xx\"} 1"),
        "{body}"
    );

    let (status, _) = http_get(addr, "/no-such-page", None).await.unwrap();
    assert_eq!(status, 404);
    running.stop().await.unwrap();
    assert!(http_get(addr, "/healthz", None).await.is_err(), "still serving after stop");
}

#[tokio::test]
async fn readiness_fails_and_names_storage_when_storage_breaks() {
    let Some(tdb) = test_db().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let running = serve::start(config(tdb.url.clone(), dir.path())).await.unwrap();
    let storage = dir.path().join("storage");
    std::fs::remove_dir_all(&storage).unwrap();
    std::fs::write(&storage, b"not a directory").unwrap();

    let (status, body) = http_get(running.http_addr, "/readyz", None).await.unwrap();
    assert_eq!(status, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], false);
    assert_eq!(v["database"]["ok"], true);
    assert_eq!(v["storage"]["ok"], false);
    let (_, metrics) = http_get(running.http_addr, "/metrics", None).await.unwrap();
    assert!(metrics.contains("lifeboat_ready{dependency=\"storage\"} 0"), "{metrics}");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_second_server_on_the_same_data_directory_is_refused() {
    let Some(tdb) = test_db().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let running = serve::start(config(tdb.url.clone(), dir.path())).await.unwrap();
    let err = serve::start(config(tdb.url.clone(), dir.path())).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("is in use by another lifeboat-server"), "{msg}");
    assert!(msg.contains(&format!("(pid {})", std::process::id())), "{msg}");
    running.stop().await.unwrap();
}
