//! Server configuration: a TOML file, `LIFEBOAT_*` environment variables and command-line
//! flags, loaded once into one validated [`Config`].
//!
//! Precedence, highest first: flag, environment variable, file, built-in default.
//! Every key of the file is shown in `deploy/lifeboat-server.example.toml`; unknown keys
//! are an error (a typo must not silently fall back to a default).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lifeboat_shared::Secret;
use serde::Deserialize;

pub const DEFAULT_DATA_DIR: &str = "./lifeboat-data";
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_QUIC_LISTEN: &str = "0.0.0.0:4433";
pub const DEFAULT_DB_MAX_CONNECTIONS: usize = 16;
/// Informational, without the database driver's and migration runner's chatter.
pub const DEFAULT_LOG: &str = "info,tokio_postgres=warn,refinery_core=warn";

/// Environment variables the server reads; anything else starting with `LIFEBOAT_` is
/// reported at start as a likely typo.
pub const KNOWN_ENV: &[&str] = &[
    "LIFEBOAT_CONFIG",
    "LIFEBOAT_DATA_DIR",
    "LIFEBOAT_DATABASE_URL",
    "LIFEBOAT_MASTER_KEY_FILE",
    "LIFEBOAT_MASTER_KEY",
    "LIFEBOAT_QUIC_CERT_FILE",
    "LIFEBOAT_QUIC_KEY_FILE",
    "LIFEBOAT_HTTP_LISTEN",
    "LIFEBOAT_QUIC_LISTEN",
    "LIFEBOAT_QUIC_ADVERTISE",
    "LIFEBOAT_STORAGE_BACKEND",
    "LIFEBOAT_STORAGE_ROOT",
    "LIFEBOAT_STORAGE_S3_ENDPOINT",
    "LIFEBOAT_STORAGE_S3_BUCKET",
    "LIFEBOAT_STORAGE_S3_REGION",
    "LIFEBOAT_STORAGE_S3_ACCESS_KEY_ID",
    "LIFEBOAT_STORAGE_S3_SECRET_ACCESS_KEY",
    "LIFEBOAT_LOG",
    "LIFEBOAT_LOG_FORMAT",
    "LIFEBOAT_PG_BINDIR",
    "LIFEBOAT_BACKUP_INTERVAL_SECONDS",
];

/// The `[...]` sections of the configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub master_key_file: Option<PathBuf>,
    #[serde(default)]
    pub database: DatabaseSection,
    #[serde(default)]
    pub storage: StorageSection,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub quic: QuicSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub monitoring: MonitoringSection,
    #[serde(default)]
    pub restore_tests: RestoreTestsSection,
    #[serde(default)]
    pub backup: BackupSection,
    #[serde(default)]
    pub audit: AuditSection,
}

/// How long the audit log keeps events.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    pub retention_days: Option<u64>,
}

/// The backup policy agents follow.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSection {
    pub interval_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitoringSection {
    pub refresh_seconds: Option<u64>,
    pub stale_after_hours: Option<u64>,
    pub needs_action_after_hours: Option<u64>,
    pub per_device_series: Option<PerDeviceSeries>,
}

/// Whether the fleet gauges have a series per device and per agent (`[monitoring]
/// per_device_series`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PerDeviceSeries {
    /// While the fleet has at most [`PER_DEVICE_AUTO_LIMIT`] devices and as many agents.
    #[default]
    Auto,
    On,
    Off,
}

/// Above this many devices (or agents), `auto` turns per-device series off: at 10,000
/// devices they would be about 50,000 series per replica, for alerts the fleet-wide
/// gauges carry too.
pub const PER_DEVICE_AUTO_LIMIT: usize = 1000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreTestsSection {
    pub enabled: Option<bool>,
    pub interval_seconds: Option<u64>,
    pub sample_percent: Option<u8>,
    pub window_days: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSection {
    /// libpq URL of an operator-run PostgreSQL; absent = embedded private cluster.
    pub url: Option<Secret<String>>,
    pub max_connections: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    pub backend: Option<StorageBackend>,
    /// Root directory of the `fs` backend; key prefix of the `s3` backend.
    pub root: Option<PathBuf>,
    #[serde(default)]
    pub s3: S3Section,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    /// e.g. `https://s3.eu-central-1.amazonaws.com` or a MinIO/Ceph URL; default AWS.
    pub endpoint: Option<String>,
    pub bucket: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<Secret<String>>,
    pub secret_access_key: Option<Secret<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicSection {
    pub listen: Option<SocketAddr>,
    /// Certificate (PEM or DER) instead of the one generated in `<data-dir>/quic/`.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PKCS#8, PEM or DER).
    pub key_file: Option<PathBuf>,
    /// `host:port` agents use to reach this endpoint; written into enrolment tokens.
    pub advertise: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// A `tracing` filter such as `info` or `lifeboat_server=debug,info`.
    pub level: Option<String>,
    pub format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// Local disk (OpenDAL `fs`).
    Fs,
    /// Amazon S3 or any S3-compatible object store (OpenDAL `s3`).
    S3,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Values given as flags or environment variables (clap merges those two).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Configuration file (TOML). Every key is optional; see deploy/lifeboat-server.example.toml.
    #[arg(long, env = "LIFEBOAT_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Where the server keeps its state: embedded PostgreSQL, local storage, keys
    /// [default: ./lifeboat-data].
    #[arg(long, env = "LIFEBOAT_DATA_DIR", value_name = "DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// File holding the master key that wraps every tenant's keys; generated on first start
    /// if missing [default: <data-dir>/master.key]. Back it up: without it nothing restores.
    #[arg(long, env = "LIFEBOAT_MASTER_KEY_FILE", value_name = "FILE", global = true)]
    pub master_key_file: Option<PathBuf>,
    /// PostgreSQL to use instead of the embedded one, as a libpq URL
    /// (postgresql://user:password@host:5432/lifeboat).
    #[arg(long, env = "LIFEBOAT_DATABASE_URL", value_name = "URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// Address of the HTTP API, /healthz, /readyz and /metrics [default: 127.0.0.1:8080].
    #[arg(long, env = "LIFEBOAT_HTTP_LISTEN", value_name = "ADDR", global = true)]
    pub http_listen: Option<SocketAddr>,
    /// Serve /metrics on this address of its own instead of the API's (it shows tenant
    /// names and UDIDs: keep it where only Prometheus reaches) [default: on the API's].
    #[arg(long, env = "LIFEBOAT_METRICS_LISTEN", value_name = "ADDR", global = true)]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the HTTP API over TLS with this certificate chain (PEM); read again on SIGHUP.
    #[arg(long, env = "LIFEBOAT_HTTP_TLS_CERT_FILE", value_name = "FILE", global = true)]
    pub http_tls_cert_file: Option<PathBuf>,
    /// The private key of --http-tls-cert-file (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "LIFEBOAT_HTTP_TLS_KEY_FILE", value_name = "FILE", global = true)]
    pub http_tls_key_file: Option<PathBuf>,
    /// UDP address of the QUIC endpoint agents connect to [default: 0.0.0.0:4433].
    #[arg(long, env = "LIFEBOAT_QUIC_LISTEN", value_name = "ADDR", global = true)]
    pub quic_listen: Option<SocketAddr>,
    /// host:port agents use to reach the QUIC endpoint, written into enrolment tokens
    /// [default: the listen address, with 127.0.0.1 for an unspecified IP].
    #[arg(long, env = "LIFEBOAT_QUIC_ADVERTISE", value_name = "HOST:PORT", global = true)]
    pub quic_advertise: Option<String>,
    /// QUIC certificate file (PEM or DER) [default: generated in <data-dir>/quic/].
    #[arg(long, env = "LIFEBOAT_QUIC_CERT_FILE", value_name = "FILE", global = true)]
    pub quic_cert_file: Option<PathBuf>,
    /// Private key of the QUIC certificate (PKCS#8, PEM or DER).
    #[arg(long, env = "LIFEBOAT_QUIC_KEY_FILE", value_name = "FILE", global = true)]
    pub quic_key_file: Option<PathBuf>,
    /// Object storage backend [default: fs].
    #[arg(long, env = "LIFEBOAT_STORAGE_BACKEND", value_name = "BACKEND", global = true)]
    pub storage_backend: Option<StorageBackend>,
    /// Root directory of the fs storage backend [default: <data-dir>/storage], or key
    /// prefix within the S3 bucket [default: none].
    #[arg(long, env = "LIFEBOAT_STORAGE_ROOT", value_name = "DIR", global = true)]
    pub storage_root: Option<PathBuf>,
    /// S3 endpoint URL [default: AWS for the region].
    #[arg(long, env = "LIFEBOAT_STORAGE_S3_ENDPOINT", value_name = "URL", global = true)]
    pub storage_s3_endpoint: Option<String>,
    /// S3 bucket (required with --storage-backend s3).
    #[arg(long, env = "LIFEBOAT_STORAGE_S3_BUCKET", value_name = "BUCKET", global = true)]
    pub storage_s3_bucket: Option<String>,
    /// S3 region [default: us-east-1].
    #[arg(long, env = "LIFEBOAT_STORAGE_S3_REGION", value_name = "REGION", global = true)]
    pub storage_s3_region: Option<String>,
    /// S3 access key id [default: the AWS credential chain].
    #[arg(long, env = "LIFEBOAT_STORAGE_S3_ACCESS_KEY_ID", value_name = "ID", hide_env_values = true, global = true)]
    pub storage_s3_access_key_id: Option<String>,
    /// S3 secret access key [default: the AWS credential chain]. Prefer the environment
    /// variable or the file to a flag, which other users can see in the process list.
    #[arg(
        long,
        env = "LIFEBOAT_STORAGE_S3_SECRET_ACCESS_KEY",
        value_name = "KEY",
        hide_env_values = true,
        global = true
    )]
    pub storage_s3_secret_access_key: Option<String>,
    /// Log filter, e.g. `info` or `lifeboat_server=debug,info` [default: info].
    #[arg(long, env = "LIFEBOAT_LOG", value_name = "FILTER", global = true)]
    pub log: Option<String>,
    /// Log line format [default: text].
    #[arg(long, env = "LIFEBOAT_LOG_FORMAT", value_name = "FORMAT", global = true)]
    pub log_format: Option<LogFormat>,
    /// Agents back up an attached iPhone when its last successful backup is older than
    /// this many seconds [default: 86400, a day].
    #[arg(long, env = "LIFEBOAT_BACKUP_INTERVAL_SECONDS", value_name = "SECONDS", global = true)]
    pub backup_interval_seconds: Option<u64>,
}

/// Where the database lives.
#[derive(Debug, Clone)]
pub enum DatabaseConfig {
    /// A private cluster in `<data-dir>/postgres`, started and stopped with the server.
    Embedded,
    /// An operator-run PostgreSQL.
    External(Secret<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageConfig {
    Fs { root: PathBuf },
    S3(S3Config),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    pub access_key_id: Option<Secret<String>>,
    pub secret_access_key: Option<Secret<String>>,
    /// Key prefix inside the bucket.
    pub root: String,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub master_key_file: PathBuf,
    pub database: DatabaseConfig,
    pub db_max_connections: usize,
    pub storage: StorageConfig,
    pub http_listen: SocketAddr,
    /// A listener of its own for /metrics (then not on `http_listen`).
    pub metrics_listen: Option<SocketAddr>,
    /// TLS on the HTTP listener: certificate chain and key files (PEM).
    pub http_tls: Option<(PathBuf, PathBuf)>,
    pub quic_listen: SocketAddr,
    /// `host:port` for enrolment tokens.
    pub quic_advertise: String,
    /// Operator-provided certificate and key, else generated in the data directory.
    pub quic_cert: Option<(PathBuf, PathBuf)>,
    pub log_level: String,
    pub log_format: LogFormat,
    /// Fleet metrics and restore-test runner settings.
    pub fleet: FleetConfig,
    /// The policy agents follow: back up a device whose last backup is older than this.
    pub backup_interval: Duration,
    /// The file the configuration came from, if any.
    pub source: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads the file named by `--config`/`LIFEBOAT_CONFIG` (if any) and merges the overrides.
    pub fn load(overrides: &Overrides) -> Result<Self, ConfigError> {
        let file = match &overrides.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|cause| ConfigError::Read { path: path.clone(), cause })?;
                Self::parse_file(path, &text)?
            }
            None => FileConfig::default(),
        };
        Self::merge(file, overrides)
    }

    pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            // toml's message names the key and shows the line; keep it on one line.
            message: e.to_string().trim().replace('\n', " ").replace("  ", " "),
        })
    }

    pub fn merge(file: FileConfig, o: &Overrides) -> Result<Self, ConfigError> {
        let data_dir = o.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("data_dir must not be empty".into()));
        }
        let database = match o.database_url.clone().map(Secret::new).or(file.database.url) {
            Some(url) if url.expose().trim().is_empty() => {
                return Err(ConfigError::Invalid("database.url is set but empty".into()));
            }
            Some(url) => DatabaseConfig::External(url),
            None => DatabaseConfig::Embedded,
        };
        let db_max_connections = file.database.max_connections.unwrap_or(DEFAULT_DB_MAX_CONNECTIONS);
        if !(1..=1000).contains(&db_max_connections) {
            return Err(ConfigError::Invalid(format!(
                "database.max_connections must be between 1 and 1000, not {db_max_connections}"
            )));
        }
        let backend = o.storage_backend.or(file.storage.backend).unwrap_or(StorageBackend::Fs);
        let s3 = file.storage.s3;
        let storage = match backend {
            StorageBackend::Fs => StorageConfig::Fs {
                root: o.storage_root.clone().or(file.storage.root).unwrap_or_else(|| data_dir.join("storage")),
            },
            StorageBackend::S3 => StorageConfig::S3(S3Config {
                endpoint: o.storage_s3_endpoint.clone().or(s3.endpoint),
                bucket: o.storage_s3_bucket.clone().or(s3.bucket).ok_or_else(|| {
                    ConfigError::Invalid("storage.s3.bucket is required with storage backend s3".into())
                })?,
                region: o.storage_s3_region.clone().or(s3.region).unwrap_or_else(|| "us-east-1".into()),
                access_key_id: o.storage_s3_access_key_id.clone().map(Secret::new).or(s3.access_key_id),
                secret_access_key: o.storage_s3_secret_access_key.clone().map(Secret::new).or(s3.secret_access_key),
                root: o
                    .storage_root
                    .clone()
                    .or(file.storage.root)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            }),
        };
        let http_listen = match o.http_listen.or(file.http.listen) {
            Some(addr) => addr,
            None => {
                DEFAULT_HTTP_LISTEN.parse().map_err(|e| ConfigError::Invalid(format!("default HTTP address: {e}")))?
            }
        };
        let quic_listen = match o.quic_listen.or(file.quic.listen) {
            Some(addr) => addr,
            None => {
                DEFAULT_QUIC_LISTEN.parse().map_err(|e| ConfigError::Invalid(format!("default QUIC address: {e}")))?
            }
        };
        let quic_advertise = match o.quic_advertise.clone().or(file.quic.advertise) {
            Some(a) if a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) => a,
            Some(a) => return Err(ConfigError::Invalid(format!("quic.advertise {a:?} is not host:port"))),
            None if quic_listen.ip().is_unspecified() => format!("127.0.0.1:{}", quic_listen.port()),
            None => quic_listen.to_string(),
        };
        let http_tls = match (
            o.http_tls_cert_file.clone().or(file.http.tls_cert_file),
            o.http_tls_key_file.clone().or(file.http.tls_key_file),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(ConfigError::Invalid("http.tls_cert_file and http.tls_key_file go together".into())),
        };
        let quic_cert =
            match (o.quic_cert_file.clone().or(file.quic.cert_file), o.quic_key_file.clone().or(file.quic.key_file)) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => return Err(ConfigError::Invalid("quic.cert_file and quic.key_file go together".into())),
            };
        let defaults = FleetConfig::default();
        let positive = |v: Option<u64>, name: &str, default: Duration, unit: u64| match v {
            Some(0) => Err(ConfigError::Invalid(format!("{name} must be at least 1"))),
            Some(n) => Ok(Duration::from_secs(n * unit)),
            None => Ok(default),
        };
        let fleet = FleetConfig {
            refresh: positive(file.monitoring.refresh_seconds, "monitoring.refresh_seconds", defaults.refresh, 1)?,
            stale_after: positive(
                file.monitoring.stale_after_hours,
                "monitoring.stale_after_hours",
                defaults.stale_after,
                3600,
            )?,
            per_device_series: file.monitoring.per_device_series.unwrap_or_default(),
            needs_action_after: positive(
                file.monitoring.needs_action_after_hours,
                "monitoring.needs_action_after_hours",
                defaults.needs_action_after,
                3600,
            )?,
            restore_tests: file.restore_tests.enabled.unwrap_or(defaults.restore_tests),
            restore_test_interval: positive(
                file.restore_tests.interval_seconds,
                "restore_tests.interval_seconds",
                defaults.restore_test_interval,
                1,
            )?,
            restore_test_sample_percent: match file.restore_tests.sample_percent {
                Some(p) if p > 100 => {
                    return Err(ConfigError::Invalid(format!(
                        "restore_tests.sample_percent must be 0 to 100, not {p}"
                    )));
                }
                Some(p) => p,
                None => defaults.restore_test_sample_percent,
            },
            restore_test_window: positive(
                file.restore_tests.window_days,
                "restore_tests.window_days",
                defaults.restore_test_window,
                86400,
            )?,
            audit_retention: match file.audit.retention_days {
                Some(d) if !(30..=3650).contains(&d) => {
                    return Err(ConfigError::Invalid(format!("audit.retention_days must be 30 to 3650, not {d}")));
                }
                Some(d) => Duration::from_secs(d * 86400),
                None => defaults.audit_retention,
            },
        };
        let backup_interval = positive(
            o.backup_interval_seconds.or(file.backup.interval_seconds),
            "backup.interval_seconds",
            DEFAULT_BACKUP_INTERVAL,
            1,
        )?;
        let master_key_file =
            o.master_key_file.clone().or(file.master_key_file).unwrap_or_else(|| data_dir.join("master.key"));
        let log_level = o.log.clone().or(file.log.level).unwrap_or_else(|| DEFAULT_LOG.into());
        let log_format = o.log_format.or(file.log.format).unwrap_or_default();
        Ok(Self {
            data_dir,
            master_key_file,
            database,
            db_max_connections,
            storage,
            http_listen,
            metrics_listen: o.metrics_listen.or(file.http.metrics_listen),
            http_tls,
            quic_listen,
            quic_advertise,
            quic_cert,
            log_level,
            log_format,
            fleet,
            backup_interval,
            source: o.config.clone(),
        })
    }
}

/// `LIFEBOAT_*` variables in the environment that no part of the server reads.
pub fn unknown_env_vars() -> Vec<String> {
    std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        // LIFEBOAT_AGENT_* belong to lifeboat-agent, which may share the environment.
        .filter(|k| k.starts_with("LIFEBOAT_") && !k.starts_with("LIFEBOAT_AGENT_") && !KNOWN_ENV.contains(&k.as_str()))
        .collect()
}

/// The default policy: back up a device once a day.
pub const DEFAULT_BACKUP_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Settings of the fleet jobs (`[monitoring]` and `[restore_tests]` in the configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// How often the fleet gauges are refreshed.
    pub refresh: Duration,
    /// A device without a committed snapshot for this long is stale.
    pub stale_after: Duration,
    /// A device waiting this long for a person raises the needs-action alert.
    pub needs_action_after: Duration,
    pub per_device_series: PerDeviceSeries,
    pub restore_tests: bool,
    /// How often the runner looks for work.
    pub restore_test_interval: Duration,
    /// Share (0–100) of new snapshots tested right after they are committed.
    pub restore_test_sample_percent: u8,
    /// A device's newest snapshot is tested again when its last test is older than this;
    /// also the coverage window.
    pub restore_test_window: Duration,
    /// Audit events older than this are deleted (`[audit] retention_days`).
    pub audit_retention: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(15),
            stale_after: Duration::from_secs(3 * 86400),
            needs_action_after: Duration::from_secs(4 * 3600),
            per_device_series: PerDeviceSeries::Auto,
            restore_tests: true,
            restore_test_interval: Duration::from_secs(60),
            restore_test_sample_percent: 100,
            restore_test_window: Duration::from_secs(7 * 86400),
            audit_retention: Duration::from_secs(365 * 86400),
        }
    }
}

#[cfg(test)]
mod tests;
