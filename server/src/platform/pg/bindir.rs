//! Finding the PostgreSQL server binaries (`initdb`, `postgres`) on this machine.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable that names the directory holding `initdb` and `postgres`.
pub const BINDIR_ENV: &str = "LIFEBOAT_PG_BINDIR";

/// A directory that holds both `initdb` and `postgres`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinDir(PathBuf);

#[derive(Debug, thiserror::Error)]
pub enum BinDirError {
    #[error(
        "{BINDIR_ENV}={0} does not contain both `initdb` and `postgres`; \
         point it at PostgreSQL's bin directory (for example /usr/lib/postgresql/15/bin)"
    )]
    BadOverride(PathBuf),
    #[error(
        "PostgreSQL is not installed: no `initdb` and `postgres` found on PATH, in `pg_config --bindir` \
         or in /usr/lib/postgresql/*/bin.\n  \
         Install it with `sudo apt-get install postgresql` (Debian/Ubuntu), \
         `sudo dnf install postgresql-server` (Fedora/RHEL) or `brew install postgresql` (macOS),\n  \
         or set {BINDIR_ENV} to its bin directory,\n  \
         or configure `database.url` (LIFEBOAT_DATABASE_URL) to use a PostgreSQL server you run yourself."
    )]
    NotInstalled,
}

impl BinDir {
    /// Finds the binaries: `$LIFEBOAT_PG_BINDIR`, then `PATH` (following symlinks, as Debian's
    /// `/usr/bin` wrappers and hand-made links point into the versioned directory), then
    /// `pg_config --bindir`, then the newest `/usr/lib/postgresql/<version>/bin`.
    pub fn locate() -> Result<Self, BinDirError> {
        if let Some(dir) = std::env::var_os(BINDIR_ENV) {
            let dir = PathBuf::from(dir);
            return Self::check(&dir).ok_or(BinDirError::BadOverride(dir));
        }
        Self::from_path()
            .or_else(Self::from_pg_config)
            .or_else(Self::from_debian_layout)
            .ok_or(BinDirError::NotInstalled)
    }

    /// The binaries for a data directory PostgreSQL `major` created: `$LIFEBOAT_PG_BINDIR`
    /// if set, else `/usr/lib/postgresql/<major>/bin` if installed, else [`Self::locate`]'s
    /// (whose version the caller compares).
    pub fn for_major(major: u32) -> Result<Self, BinDirError> {
        if std::env::var_os(BINDIR_ENV).is_none()
            && let Some(dir) = Self::check(&Path::new("/usr/lib/postgresql").join(major.to_string()).join("bin"))
        {
            return Ok(dir);
        }
        Self::locate()
    }

    /// The major version of these binaries, from `postgres --version`
    /// (`postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)` → 15).
    pub fn major(&self) -> Option<u32> {
        let out = Command::new(self.postgres()).arg("--version").output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        let version = text.split_whitespace().find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
        version.split(['.', '-']).next()?.parse().ok()
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn initdb(&self) -> PathBuf {
        self.0.join("initdb")
    }

    pub fn postgres(&self) -> PathBuf {
        self.0.join("postgres")
    }

    fn check(dir: &Path) -> Option<Self> {
        (dir.join("initdb").is_file() && dir.join("postgres").is_file()).then(|| Self(dir.to_path_buf()))
    }

    fn from_path() -> Option<Self> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).find_map(|dir| {
            let initdb = std::fs::canonicalize(dir.join("initdb")).ok()?;
            Self::check(initdb.parent()?)
        })
    }

    fn from_pg_config() -> Option<Self> {
        let out = Command::new("pg_config").arg("--bindir").output().ok()?;
        if !out.status.success() {
            return None;
        }
        let dir = String::from_utf8(out.stdout).ok()?;
        Self::check(Path::new(dir.trim()))
    }

    fn from_debian_layout() -> Option<Self> {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| {
                let e = e.ok()?;
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .collect();
        versions.sort();
        versions.into_iter().rev().find_map(|(_, dir)| Self::check(&dir))
    }
}
