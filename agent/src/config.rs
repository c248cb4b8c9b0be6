//! Agent configuration: a TOML file, `LIFEBOAT_AGENT_*` environment variables and flags.
//! A flag beats its environment variable, which beats the file, which beats the default.
//! Unknown keys in the file are an error. Every key is shown in
//! `deploy/lifeboat-agent.example.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::job::service::ServiceConfig;

pub const DEFAULT_STATE_DIR: &str = "./lifeboat-agent";
pub const DEFAULT_MAX_CONCURRENT: usize = 2;
pub const DEFAULT_RETRY_INITIAL_SECONDS: u64 = 30;
pub const DEFAULT_RETRY_MAX_SECONDS: u64 = 3600;
pub const DEFAULT_HEARTBEAT_SECONDS: u64 = 300;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub state_dir: Option<PathBuf>,
    /// `host:port` or a socket path.
    pub usbmuxd: Option<String>,
    pub max_concurrent_backups: Option<usize>,
    pub mirror_budget_mb: Option<u64>,
    pub retry_initial_seconds: Option<u64>,
    pub retry_max_seconds: Option<u64>,
    pub heartbeat_seconds: Option<u64>,
    pub log: Option<String>,
}

/// Flags, each with its environment variable (clap merges the two).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Configuration file (TOML); see deploy/lifeboat-agent.example.toml.
    #[arg(long, env = "LIFEBOAT_AGENT_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Where the agent keeps its identity, keys, local backup mirror and cache
    /// [default: ./lifeboat-agent].
    #[arg(long, env = "LIFEBOAT_AGENT_STATE_DIR", value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// usbmuxd as host:port or socket path [default: USBMUXD_SOCKET_ADDRESS, else the
    /// system's /var/run/usbmuxd].
    #[arg(long, env = "LIFEBOAT_AGENT_USBMUXD", value_name = "ADDR", global = true)]
    pub usbmuxd: Option<String>,
    /// iPhones backed up at once by `run` [default: 2].
    #[arg(long, env = "LIFEBOAT_AGENT_MAX_CONCURRENT_BACKUPS", value_name = "N", global = true)]
    pub max_concurrent_backups: Option<usize>,
    /// The most disk one iPhone's local mirror may use, in MB [default: no limit beyond
    /// the disk's free space]. A backup that would not fit fails as out-of-space.
    #[arg(long, env = "LIFEBOAT_AGENT_MIRROR_BUDGET_MB", value_name = "MB", global = true)]
    pub mirror_budget_mb: Option<u64>,
    /// Delay before the first retry of a failed backup, doubling with each further
    /// failure [default: 30].
    #[arg(long, env = "LIFEBOAT_AGENT_RETRY_INITIAL_SECONDS", value_name = "SECONDS", global = true)]
    pub retry_initial_seconds: Option<u64>,
    /// The longest delay between retries [default: 3600].
    #[arg(long, env = "LIFEBOAT_AGENT_RETRY_MAX_SECONDS", value_name = "SECONDS", global = true)]
    pub retry_max_seconds: Option<u64>,
    /// How often `run` reports in to the server with no iPhone attached, so an idle
    /// workstation is not taken for a dead one [default: 300; 5 to 3600].
    #[arg(long, env = "LIFEBOAT_AGENT_HEARTBEAT_SECONDS", value_name = "SECONDS", global = true)]
    pub heartbeat_seconds: Option<u64>,
    /// Log filter, e.g. `info` or `lifeboat_agent=debug` [default: warn, info for `run`].
    #[arg(long, env = "LIFEBOAT_LOG", value_name = "FILTER", global = true)]
    pub log: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub usbmuxd: Option<String>,
    pub mirror_budget: Option<u64>,
    pub service: ServiceConfig,
    pub log: Option<String>,
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
    pub fn load(o: &Overrides) -> Result<Self, ConfigError> {
        let file = match &o.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|cause| ConfigError::Read { path: path.clone(), cause })?;
                Self::parse_file(path, &text)?
            }
            None => FileConfig::default(),
        };
        Self::merge(file, o)
    }

    pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " ").replace("  ", " "),
        })
    }

    pub fn merge(file: FileConfig, o: &Overrides) -> Result<Self, ConfigError> {
        let state_dir = o.state_dir.clone().or(file.state_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if state_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("state_dir must not be empty".into()));
        }
        let max_concurrent = o.max_concurrent_backups.or(file.max_concurrent_backups).unwrap_or(DEFAULT_MAX_CONCURRENT);
        if !(1..=64).contains(&max_concurrent) {
            return Err(ConfigError::Invalid(format!(
                "max_concurrent_backups must be between 1 and 64, not {max_concurrent}"
            )));
        }
        let mirror_budget = match o.mirror_budget_mb.or(file.mirror_budget_mb) {
            Some(0) => return Err(ConfigError::Invalid("mirror_budget_mb must be at least 1".into())),
            Some(mb) => Some(mb.saturating_mul(1_000_000)),
            None => None,
        };
        let retry_initial =
            o.retry_initial_seconds.or(file.retry_initial_seconds).unwrap_or(DEFAULT_RETRY_INITIAL_SECONDS);
        let retry_max = o.retry_max_seconds.or(file.retry_max_seconds).unwrap_or(DEFAULT_RETRY_MAX_SECONDS);
        if retry_initial == 0 || retry_max < retry_initial {
            return Err(ConfigError::Invalid(format!(
                "retry_initial_seconds ({retry_initial}) must be at least 1 and at most retry_max_seconds ({retry_max})"
            )));
        }
        let heartbeat = o.heartbeat_seconds.or(file.heartbeat_seconds).unwrap_or(DEFAULT_HEARTBEAT_SECONDS);
        if !(5..=3600).contains(&heartbeat) {
            return Err(ConfigError::Invalid(format!("heartbeat_seconds must be between 5 and 3600, not {heartbeat}")));
        }
        let usbmuxd = o.usbmuxd.clone().or(file.usbmuxd).filter(|a| !a.is_empty());
        Ok(Self {
            state_dir,
            usbmuxd,
            mirror_budget,
            service: ServiceConfig {
                max_concurrent,
                retry_initial: Duration::from_secs(retry_initial),
                retry_max: Duration::from_secs(retry_max),
                heartbeat: Duration::from_secs(heartbeat),
            },
            log: o.log.clone().or(file.log),
        })
    }

    /// Where usbmuxd is: the setting, else `USBMUXD_SOCKET_ADDRESS`, else the system's.
    pub fn usbmuxd_addr(&self) -> Result<idevice::usbmuxd::UsbmuxdAddr, crate::device::DeviceError> {
        use idevice::usbmuxd::UsbmuxdAddr;
        match &self.usbmuxd {
            Some(a) => Ok(match a.parse::<std::net::SocketAddr>() {
                Ok(sock) => UsbmuxdAddr::TcpSocket(sock),
                Err(_) if a.starts_with('/') => UsbmuxdAddr::UnixSocket(a.clone()),
                Err(_) => {
                    return Err(crate::device::DeviceError::Address(format!(
                        "usbmuxd {a:?} is neither host:port nor an absolute socket path"
                    )));
                }
            }),
            None => crate::device::usbmuxd_addr(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        Config::parse_file(Path::new("agent.toml"), text)
    }

    #[test]
    fn defaults_then_file_then_flags() {
        let c = Config::merge(FileConfig::default(), &Overrides::default()).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("./lifeboat-agent"));
        assert_eq!((c.service.max_concurrent, c.service.retry_initial.as_secs()), (2, 30));
        assert_eq!(c.mirror_budget, None);
        let file = parse("state_dir = '/var/lib/a'\nmax_concurrent_backups = 4\nmirror_budget_mb = 500\n").unwrap();
        let o = Overrides { max_concurrent_backups: Some(1), ..Default::default() };
        let c = Config::merge(file, &o).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/a"));
        assert_eq!(c.service.max_concurrent, 1);
        assert_eq!(c.mirror_budget, Some(500_000_000));
    }

    #[test]
    fn bad_settings_are_named() {
        let err = parse("max_concurent_backups = 3\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `max_concurent_backups`"), "{err}");
        let err = Config::merge(parse("max_concurrent_backups = 0\n").unwrap(), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert_eq!(err, "configuration: max_concurrent_backups must be between 1 and 64, not 0");
        let o = Overrides { retry_initial_seconds: Some(100), retry_max_seconds: Some(10), ..Default::default() };
        let err = Config::merge(FileConfig::default(), &o).unwrap_err().to_string();
        assert!(err.contains("retry_initial_seconds (100)"), "{err}");
        let o = Overrides { usbmuxd: Some("localhost".into()), ..Default::default() };
        let err = Config::merge(FileConfig::default(), &o).unwrap().usbmuxd_addr().unwrap_err().to_string();
        assert!(err.contains("neither host:port nor an absolute socket path"), "{err}");
    }

    #[test]
    fn the_example_config_is_complete_and_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lifeboat-agent.example.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let uncommented: String = text
            .lines()
            .map(|l| l.strip_prefix("# ").filter(|r| r.contains(" = ")).unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let f = parse(&uncommented).unwrap();
        assert!(f.state_dir.is_some() && f.usbmuxd.is_some() && f.max_concurrent_backups.is_some());
        assert!(f.mirror_budget_mb.is_some() && f.retry_initial_seconds.is_some() && f.retry_max_seconds.is_some());
        assert!(f.log.is_some());
        Config::merge(f, &Overrides::default()).unwrap();
    }
}
