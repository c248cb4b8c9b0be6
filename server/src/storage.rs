//! Object storage through Apache OpenDAL: local disk by default.
//!
//! Everything the server stores — packs, snapshot manifests, wrapped keys — goes through
//! one [`opendal::Operator`], so a backend is a configuration choice, not a code path.

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
            crate::tls::install_default_provider();
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
