//! Objects: storage through Apache OpenDAL (local disk by default), the paths of
//! every object, and reading blobs back out of packs (`packs`).
//!
//! Everything the server stores — packs, snapshot manifests, wrapped keys — goes through
//! one [`opendal::Operator`], so a backend is a configuration choice, not a code path.
//! Never here: SQL, keys, or deciding what an object means.

pub mod packs;

use std::time::Duration;

use crate::config::StorageConfig;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage backend {backend}: {cause}")]
    Backend { backend: &'static str, cause: opendal::Error },
    #[error("storage root {path}: {cause}")]
    Root { path: std::path::PathBuf, cause: std::io::Error },
    #[error("building the HTTP client for storage: {0}")]
    Http(String),
}

/// Builds the operator for `config`, creating a local root directory if needed.
pub fn operator(config: &StorageConfig) -> Result<opendal::Operator, StorageError> {
    match config {
        StorageConfig::S3(s3) => {
            // reqwest's rustls has no provider of its own: it uses the process default (ring).
            crate::platform::tls::install_default_provider();
            let client = reqwest::Client::builder().build().map_err(|e| StorageError::Http(e.to_string()))?;
            let mut builder = opendal::services::S3::default().bucket(&s3.bucket).region(&s3.region).root(&s3.root);
            if let Some(endpoint) = &s3.endpoint {
                builder = builder.endpoint(endpoint);
            }
            if let Some(id) = &s3.access_key_id {
                builder = builder.access_key_id(id.expose());
            }
            if let Some(key) = &s3.secret_access_key {
                builder = builder.secret_access_key(key.expose());
            }
            let transport =
                opendal::HttpTransporter::new(opendal_http_transport_reqwest::ReqwestTransport::new(client));
            let op = opendal::Operator::new(builder)
                .map_err(|cause| StorageError::Backend { backend: "s3", cause })?
                .with_context(opendal::OperationContext::new().with_http_transport(transport));
            Ok(op)
        }
        StorageConfig::Fs { root } => {
            std::fs::create_dir_all(root).map_err(|cause| StorageError::Root { path: root.clone(), cause })?;
            let root = std::fs::canonicalize(root).map_err(|cause| StorageError::Root { path: root.clone(), cause })?;
            // Objects are written to a temporary file and renamed into place, so a crash never
            // leaves a partial object under a final name.
            let tmp = root.join(".tmp");
            std::fs::create_dir_all(&tmp).map_err(|cause| StorageError::Root { path: tmp.clone(), cause })?;
            let builder =
                opendal::services::Fs::default().root(&root.to_string_lossy()).atomic_write_dir(&tmp.to_string_lossy());
            let op = opendal::Operator::new(builder).map_err(|cause| StorageError::Backend { backend: "fs", cause })?;
            Ok(op)
        }
    }
}

/// The directory objects live in when storage is the local disk (fs backend), for what
/// OpenDAL does not offer: see [`drop_cached`].
pub fn local_root(config: &StorageConfig) -> Option<std::path::PathBuf> {
    match config {
        StorageConfig::Fs { root } => std::fs::canonicalize(root).ok(),
        StorageConfig::S3(_) => None,
    }
}

/// Drops a durable object's pages from the page cache (`posix_fadvise` DONTNEED), as
/// backup repositories do with what they write (borg with its segment files): packs are
/// read back rarely, and gigabytes of them written in one backup would otherwise push
/// out what is read often (PostgreSQL's pages). The page cache then recycles a few packs'
/// worth of memory instead of taking fresh memory for every pack, which is also what
/// made writing packs the dearest part of ingest on the benchmark machine, a VM whose
/// host takes back freed memory (docs/performance.md). The fs backend writes an object
/// and `fsync`s it before it is visible, so its pages are clean and simply dropped.
/// Only Linux (and Android) builds ask; elsewhere the pages stay (a cache hint, nothing
/// more).
pub fn drop_cached(path: &std::path::Path) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    nix::fcntl::posix_fadvise(&file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)?;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    drop(file);
    Ok(())
}

/// Object written and read back by the readiness check.
pub const PROBE_PATH: &str = "health/ready-probe";

/// The readiness check: storage is ready when it takes a write and gives it back.
/// Writes one small object (always the same one), bounded in time.
pub async fn ping(op: &opendal::Operator, timeout: Duration) -> Result<(), String> {
    let probe = async {
        let body = format!("lifeboat-server {} ready-probe", std::process::id());
        op.write(PROBE_PATH, body.clone()).await.map_err(|e| format!("writing {PROBE_PATH}: {e}"))?;
        let back = op.read(PROBE_PATH).await.map_err(|e| format!("reading {PROBE_PATH}: {e}"))?;
        if back.to_vec() == body.as_bytes() {
            Ok(())
        } else {
            Err(format!("{PROBE_PATH} read back different bytes than were written"))
        }
    };
    tokio::time::timeout(timeout, probe).await.map_err(|_| format!("no answer within {timeout:?}"))?
}

/// Where a pack lives: `tenants/<tenant>/packs/<xx>/<pack id>`.
pub fn pack_path(tenant: &lifeboat_shared::ids::TenantId, pack: &lifeboat_shared::ids::PackId) -> String {
    let hex = pack.to_string();
    format!("tenants/{tenant}/packs/{}/{hex}", &hex[..2])
}

/// Where a snapshot's manifest lives: `tenants/<tenant>/snapshots/<snapshot id>`.
pub fn manifest_path(tenant: &lifeboat_shared::ids::TenantId, snapshot: &lifeboat_shared::ids::SnapshotId) -> String {
    format!("tenants/{tenant}/snapshots/{snapshot}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_dropped_object_reads_back_whole_and_a_missing_one_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pack");
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        super::drop_cached(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "dropping cached pages loses nothing");
        let missing = super::drop_cached(&dir.path().join("missing")).unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
    }
}
