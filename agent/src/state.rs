//! What an enrolled agent keeps in its state directory: the server's address and pinned
//! certificate fingerprint, its identity, its refresh secret and the tenant's keys —
//! `agent.json`, readable by its owner only, written atomically.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use lifeboat_shared::ids::{AgentId, TenantId};
use lifeboat_shared::wire::{Auth, Enrolled};
use serde::{Deserialize, Serialize};

use crate::pipeline::transfer::Keys;

const FILE: &str = "agent.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("this workstation is not enrolled (no {0}): run `lifeboat-agent enroll TOKEN` first")]
    NotEnrolled(PathBuf),
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("{path} is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
}

/// An enrolled agent's identity. `Debug` shows no secret.
#[derive(Clone, Serialize, Deserialize)]
pub struct AgentState {
    /// `host:port` of the server's QUIC endpoint.
    pub server: String,
    /// SHA-256 of the server's certificate, hex: the only certificate this agent accepts.
    pub cert_sha256: String,
    pub agent: AgentId,
    pub tenant: TenantId,
    refresh_secret: String,
    id_key: String,
    data_key: String,
}

impl std::fmt::Debug for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentState")
            .field("server", &self.server)
            .field("agent", &self.agent)
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let bytes: Option<Vec<u8>> =
        (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect();
    bytes?.try_into().ok()
}

impl AgentState {
    pub fn new(server: String, cert_sha256: [u8; 32], agent: AgentId, tenant: TenantId, enrolled: &Enrolled) -> Self {
        Self {
            server,
            cert_sha256: hex(&cert_sha256),
            agent,
            tenant,
            refresh_secret: STANDARD.encode(&enrolled.refresh_secret),
            id_key: STANDARD.encode(enrolled.id_key),
            data_key: STANDARD.encode(enrolled.data_key),
        }
    }

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE)
    }

    pub fn load(state_dir: &Path) -> Result<Self, StateError> {
        let path = Self::path(state_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StateError::NotEnrolled(path)),
            Err(cause) => return Err(StateError::Io { path, cause }),
        };
        let state: Self = serde_json::from_slice(&bytes)
            .map_err(|e| StateError::Damaged { path: path.clone(), why: e.to_string() })?;
        // Everything must decode now, not halfway through a backup.
        let ok = state.fingerprint().is_some() && state.keys().is_some() && state.refresh_auth().is_some();
        if !ok {
            return Err(StateError::Damaged { path, why: "a key or the fingerprint does not decode".into() });
        }
        Ok(state)
    }

    /// Writes `agent.json` (mode 0600) through a temporary file and a rename.
    pub fn save(&self, state_dir: &Path) -> Result<(), StateError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |cause| StateError::Io { path, cause }
        };
        if !state_dir.exists() {
            std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
            let _ = std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700));
        }
        let path = Self::path(state_dir);
        let tmp = state_dir.join(format!("{FILE}.tmp"));
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| StateError::Damaged { path: path.clone(), why: e.to_string() })?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(&json).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        if let Ok(dir) = std::fs::File::open(state_dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    pub fn fingerprint(&self) -> Option<[u8; 32]> {
        unhex32(&self.cert_sha256)
    }

    pub fn keys(&self) -> Option<Keys> {
        let id: [u8; 32] = STANDARD.decode(&self.id_key).ok()?.try_into().ok()?;
        let data: [u8; 32] = STANDARD.decode(&self.data_key).ok()?.try_into().ok()?;
        Some(Keys::from_bytes(id, data))
    }

    /// How this agent authenticates a new connection.
    pub fn refresh_auth(&self) -> Option<Auth> {
        Some(Auth::Refresh { agent: self.agent, secret: STANDARD.decode(&self.refresh_secret).ok()? })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn state_round_trips_privately_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let enrolled = Enrolled { refresh_secret: vec![7; 32], id_key: [1; 32], data_key: [2; 32] };
        let agent = AgentId(uuid::Uuid::from_u128(1));
        let tenant = TenantId(uuid::Uuid::from_u128(2));
        let state = AgentState::new("127.0.0.1:4433".into(), [9; 32], agent, tenant, &enrolled);
        assert!(matches!(AgentState::load(dir.path()), Err(StateError::NotEnrolled(_))));
        state.save(dir.path()).unwrap();
        let mode = std::fs::metadata(AgentState::path(dir.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "secrets are for the owner only");
        let loaded = AgentState::load(dir.path()).unwrap();
        assert_eq!(loaded.fingerprint(), Some([9; 32]));
        assert_eq!(loaded.refresh_auth(), Some(Auth::Refresh { agent, secret: vec![7; 32] }));
        assert!(!format!("{loaded:?}").contains(&STANDARD.encode([7u8; 32])), "Debug shows no secret");
        std::fs::write(AgentState::path(dir.path()), b"{\"server\": 1}").unwrap();
        assert!(matches!(AgentState::load(dir.path()), Err(StateError::Damaged { .. })));
    }
}
