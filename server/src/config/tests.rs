//! Settings from defaults, file, environment and flags, and the errors bad ones get.

use super::*;

fn parse(text: &str) -> Result<FileConfig, ConfigError> {
    Config::parse_file(Path::new("test.toml"), text)
}

#[test]
fn empty_everything_gives_the_embedded_defaults() {
    let c = Config::merge(FileConfig::default(), &Overrides::default()).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("./lifeboat-data"));
    assert!(matches!(c.database, DatabaseConfig::Embedded));
    assert_eq!(c.storage, StorageConfig::Fs { root: PathBuf::from("./lifeboat-data/storage") });
    assert_eq!(c.http_listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.log_format, LogFormat::Text);
    assert_eq!(c.quic_listen.to_string(), "0.0.0.0:4433");
    assert_eq!(c.quic_advertise, "127.0.0.1:4433");
}

#[test]
fn flags_beat_the_file() {
    let file = parse("data_dir = '/srv/a'\n[http]\nlisten = '0.0.0.0:9000'\n[database]\nurl = 'postgresql://x@db/l'\n")
        .unwrap();
    let o = Overrides { data_dir: Some("/srv/b".into()), ..Default::default() };
    let c = Config::merge(file, &o).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/srv/b"));
    assert_eq!(c.http_listen.to_string(), "0.0.0.0:9000");
    assert_eq!(c.storage, StorageConfig::Fs { root: PathBuf::from("/srv/b/storage") });
    match c.database {
        DatabaseConfig::External(url) => assert_eq!(url.expose(), "postgresql://x@db/l"),
        DatabaseConfig::Embedded => panic!("expected the file's database URL"),
    }
}

#[test]
fn unknown_keys_are_named() {
    let err = parse("[http]\nlisten = '127.0.0.1:1'\nlisen = 'x'\n").unwrap_err().to_string();
    assert!(err.contains("test.toml"), "{err}");
    assert!(err.contains("unknown field `lisen`"), "{err}");
    let err = parse("[databse]\nurl = 'x'\n").unwrap_err().to_string();
    assert!(err.contains("unknown field `databse`"), "{err}");
}

#[test]
fn bad_values_are_named() {
    let err = parse("[http]\nlisten = 'localhost'\n").unwrap_err().to_string();
    assert!(err.contains("listen"), "{err}");
    let err = parse("[storage]\nbackend = 'ftp'\n").unwrap_err().to_string();
    assert!(err.contains("unknown variant `ftp`"), "{err}");
    let file = parse("[database]\nmax_connections = 0\n").unwrap();
    let err = Config::merge(file, &Overrides::default()).unwrap_err().to_string();
    assert!(err.contains("max_connections must be between 1 and 1000"), "{err}");
}

#[test]
fn s3_needs_a_bucket_and_hides_its_secret() {
    let file = parse("[storage]\nbackend = 's3'\n").unwrap();
    let err = Config::merge(file, &Overrides::default()).unwrap_err().to_string();
    assert_eq!(err, "configuration: storage.s3.bucket is required with storage backend s3");
    let file =
        parse("[storage]\nbackend = 's3'\nroot = 'prod'\n[storage.s3]\nbucket = 'b'\nsecret_access_key = 'hunter2'\n")
            .unwrap();
    let c = Config::merge(file, &Overrides::default()).unwrap();
    match &c.storage {
        StorageConfig::S3(s3) => {
            assert_eq!((s3.bucket.as_str(), s3.region.as_str(), s3.root.as_str()), ("b", "us-east-1", "prod"));
        }
        other => panic!("{other:?}"),
    }
    assert!(!format!("{c:?}").contains("hunter2"));
}

#[test]
fn the_database_url_never_shows_in_debug_output() {
    let file = parse("[database]\nurl = 'postgresql://u:hunter2@db/l'\n").unwrap();
    let c = Config::merge(file, &Overrides::default()).unwrap();
    assert!(!format!("{c:?}").contains("hunter2"));
}

#[test]
fn the_example_config_is_complete_and_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lifeboat-server.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // Every key is present, commented out or not: uncomment them all and parse.
    let uncommented: String = text
        .lines()
        .map(|l| l.strip_prefix("# ").filter(|r| r.contains(" = ") || r.starts_with('[')).unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let file = parse(&uncommented).unwrap();
    assert!(file.data_dir.is_some() && file.master_key_file.is_some());
    assert!(file.database.url.is_some() && file.database.max_connections.is_some());
    assert!(file.storage.backend.is_some() && file.storage.root.is_some());
    let s3 = &file.storage.s3;
    assert!(s3.endpoint.is_some() && s3.bucket.is_some() && s3.region.is_some());
    assert!(s3.access_key_id.is_some() && s3.secret_access_key.is_some());
    assert!(file.http.listen.is_some());
    assert!(file.quic.listen.is_some() && file.quic.advertise.is_some());
    assert!(file.quic.cert_file.is_some() && file.quic.key_file.is_some());
    assert!(file.log.level.is_some() && file.log.format.is_some());
    assert!(file.monitoring.refresh_seconds.is_some() && file.monitoring.stale_after_hours.is_some());
    let rt = &file.restore_tests;
    assert!(
        rt.enabled.is_some()
            && rt.interval_seconds.is_some()
            && rt.sample_percent.is_some()
            && rt.window_days.is_some()
    );
    assert!(file.backup.interval_seconds.is_some());
}
