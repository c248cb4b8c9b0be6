//! The server's data directory: created and checked for writability at start, and locked
//! so that two servers never share one (they would fight over the embedded PostgreSQL).

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data directory {path} cannot be created: {cause}")]
    Create { path: PathBuf, cause: std::io::Error },
    #[error("data directory {path} is not writable: {cause}")]
    NotWritable { path: PathBuf, cause: std::io::Error },
    #[error("data directory {path} is in use by another lifeboat-server{}", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    InUse { path: PathBuf, pid: Option<u32> },
}

/// An open, locked data directory. The lock is released when this is dropped or the
/// process exits, however it exits.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: Flock<File>,
}

impl DataDir {
    pub fn open(path: &Path) -> Result<Self, DataDirError> {
        std::fs::create_dir_all(path).map_err(|cause| DataDirError::Create { path: path.to_path_buf(), cause })?;
        let path =
            std::fs::canonicalize(path).map_err(|cause| DataDirError::Create { path: path.to_path_buf(), cause })?;
        let not_writable = |cause| DataDirError::NotWritable { path: path.clone(), cause };

        let probe = path.join(".write-test");
        File::create(&probe).and_then(|mut f| f.write_all(b"ok")).map_err(not_writable)?;
        std::fs::remove_file(&probe).map_err(not_writable)?;

        let lock_path = path.join("lifeboat-server.lock");
        let mut file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(not_writable)?;
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err(_) => return Err(DataDirError::InUse { path, pid: holder.trim().parse().ok() }),
        };
        lock.set_len(0).and_then(|()| lock.seek(SeekFrom::Start(0))).map_err(not_writable)?;
        writeln!(lock, "{}", std::process::id()).map_err(not_writable)?;
        Ok(Self { path, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
