//! Keys: the server's master key, and each tenant's id and data keys wrapped by it.
//!
//! The master key is 32 random bytes, hex in a file (`<data-dir>/master.key` by default,
//! mode 0600). The embedded default generates it at first start and says loudly to back
//! it up: without it, no tenant key — and so no snapshot — can be opened. Production
//! points `master_key_file` at a file from a secret store.
//!
//! Wrapped key = `nonce [12] | AES-256-GCM(master, key) | tag [16]`, associated data
//! `"lifeboat wrap v1" | purpose | subject`, so a wrapped key cannot be moved to another
//! tenant or purpose.

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use lifeboat_shared::chunk::{DataKey, IdKey};
use lifeboat_shared::format::NONCE_BYTES;
use lifeboat_shared::ids::TenantId;
use ring::aead;
use ring::rand::{SecureRandom as _, SystemRandom};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("master key file {path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("master key file {0} must hold exactly 64 hex digits")]
    Malformed(PathBuf),
    #[error("master key file {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error(
        "{what} was wrapped by master key {stored}, but the configured master key is {ours}; \
         configure the master key this database was created with"
    )]
    WrongMasterKey { what: String, stored: String, ours: String },
    #[error("{0} does not unwrap with the master key: damaged or tampered")]
    Unwrap(String),
    #[error("the system random number generator failed")]
    Random,
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn random(buf: &mut [u8]) -> Result<(), KeyError> {
    SystemRandom::new().fill(buf).map_err(|_| KeyError::Random)
}

pub fn random_32() -> Result<[u8; 32], KeyError> {
    let mut b = [0u8; 32];
    random(&mut b)?;
    Ok(b)
}

pub fn nonce() -> Result<[u8; NONCE_BYTES], KeyError> {
    let mut n = [0u8; NONCE_BYTES];
    random(&mut n)?;
    Ok(n)
}

pub struct MasterKey {
    key: aead::LessSafeKey,
    id: String,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({}: ***)", self.id)
    }
}

impl MasterKey {
    fn from_bytes(bytes: &[u8; 32]) -> Self {
        let id = blake3::hash(bytes).as_bytes()[..8].iter().map(|b| format!("{b:02x}")).collect();
        // Invariant: 32 bytes is the AES-256 key size.
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, bytes).expect("32-byte key");
        Self { key: aead::LessSafeKey::new(unbound), id }
    }

    /// Loads the master key from `path`, creating it if it does not exist.
    /// Returns whether it was created (the caller tells the operator to back it up).
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyError> {
        let io = |cause| KeyError::Io { path: path.to_path_buf(), cause };
        match std::fs::metadata(path) {
            Ok(_) => Ok((Self::load(path)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = random_32()?;
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                let mut f =
                    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
                f.write_all(format!("{hex}\n").as_bytes()).and_then(|()| f.sync_all()).map_err(io)?;
                Ok((Self::from_bytes(&bytes), true))
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io = |cause| KeyError::Io { path: path.to_path_buf(), cause };
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen { path: path.to_path_buf(), mode });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Self::from_hex(&text).ok_or_else(|| KeyError::Malformed(path.to_path_buf()))
    }

    /// A key given as 64 hex digits (surrounding white space ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.len() != 64 {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
            bytes[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(Self::from_bytes(&bytes))
    }

    /// Short, public identifier of this key (first 8 bytes of its BLAKE3).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn aad(purpose: &str, subject: &[u8]) -> Vec<u8> {
        let mut a = b"lifeboat wrap v1|".to_vec();
        a.extend_from_slice(purpose.as_bytes());
        a.push(b'|');
        a.extend_from_slice(subject);
        a
    }

    pub fn wrap(&self, purpose: &str, subject: &[u8], secret: &[u8]) -> Result<Vec<u8>, KeyError> {
        seal(&self.key, Self::aad(purpose, subject), secret)
    }

    pub fn unwrap(&self, purpose: &str, subject: &[u8], wrapped: &[u8]) -> Result<Vec<u8>, KeyError> {
        open(&self.key, Self::aad(purpose, subject), wrapped)
            .ok_or_else(|| KeyError::Unwrap(format!("{purpose} of {}", String::from_utf8_lossy(subject))))
    }

    fn unwrap_32(&self, purpose: &str, subject: &[u8], wrapped: &[u8]) -> Result<[u8; 32], KeyError> {
        let v = self.unwrap(purpose, subject, wrapped)?;
        v.try_into().map_err(|_| KeyError::Unwrap(format!("{purpose} of {}", String::from_utf8_lossy(subject))))
    }
}

/// A tenant's unwrapped keys.
#[derive(Debug)]
pub struct TenantKeys {
    pub tenant: TenantId,
    pub id: IdKey,
    pub data: DataKey,
    data_bytes: [u8; 32],
}

impl TenantKeys {
    /// New random keys for `tenant`, and their wrapped forms (id key, data key).
    pub fn generate(master: &MasterKey, tenant: TenantId) -> Result<(Self, Vec<u8>, Vec<u8>), KeyError> {
        let (id, data) = (random_32()?, random_32()?);
        let subject = tenant.to_string();
        let id_w = master.wrap("tenant id key", subject.as_bytes(), &id)?;
        let data_w = master.wrap("tenant data key", subject.as_bytes(), &data)?;
        Ok((
            Self { tenant, id: IdKey::from_bytes(id), data: DataKey::from_bytes(&data), data_bytes: data },
            id_w,
            data_w,
        ))
    }

    /// Unwraps keys stored for `tenant` (checking they were wrapped by this master key).
    pub fn unwrap(
        master: &MasterKey,
        tenant: TenantId,
        master_key_id: &str,
        id_w: &[u8],
        data_w: &[u8],
    ) -> Result<Self, KeyError> {
        if master_key_id != master.id() {
            return Err(KeyError::WrongMasterKey {
                what: format!("tenant {tenant}'s keys"),
                stored: master_key_id.to_string(),
                ours: master.id().to_string(),
            });
        }
        let subject = tenant.to_string();
        let id = master.unwrap_32("tenant id key", subject.as_bytes(), id_w)?;
        let data = master.unwrap_32("tenant data key", subject.as_bytes(), data_w)?;
        Ok(Self { tenant, id: IdKey::from_bytes(id), data: DataKey::from_bytes(&data), data_bytes: data })
    }

    /// The raw data key, only to hand it to an enrolling agent over TLS.
    pub fn data_bytes(&self) -> [u8; 32] {
        self.data_bytes
    }

    /// The tenant's key for secrets the server keeps for it (escrowed backup passwords):
    /// HKDF-SHA256 of the data key, so it is neither the data key nor usable on blobs.
    fn secret_key(&self) -> aead::LessSafeKey {
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"lifeboat").extract(&self.data_bytes);
        let okm = prk
            .expand(&[b"lifeboat tenant secret v1"], &aead::AES_256_GCM)
            // Invariant: one AES-256 key is far below HKDF-SHA256's 255-block limit.
            .expect("a 32-byte HKDF output");
        aead::LessSafeKey::new(aead::UnboundKey::from(okm))
    }

    fn secret_aad(&self, purpose: &str, subject: &str) -> Vec<u8> {
        format!("lifeboat tenant secret v1|{purpose}|{}|{subject}", self.tenant).into_bytes()
    }

    /// Seals `secret` for this tenant: `nonce [12] | AES-256-GCM(secret key, secret) | tag
    /// [16]`, bound to the tenant, the purpose and the subject (a device's UDID).
    pub fn seal_secret(&self, purpose: &str, subject: &str, secret: &[u8]) -> Result<Vec<u8>, KeyError> {
        seal(&self.secret_key(), self.secret_aad(purpose, subject), secret)
    }

    /// Opens what [`Self::seal_secret`] sealed for the same purpose and subject.
    pub fn open_secret(&self, purpose: &str, subject: &str, sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
        open(&self.secret_key(), self.secret_aad(purpose, subject), sealed)
            .ok_or_else(|| KeyError::Unwrap(format!("{purpose} of {subject}")))
    }
}

/// `nonce [12] | AES-256-GCM(key, secret, aad) | tag [16]`, with a fresh random nonce.
fn seal(key: &aead::LessSafeKey, aad: Vec<u8>, secret: &[u8]) -> Result<Vec<u8>, KeyError> {
    let n = nonce()?;
    let mut body = secret.to_vec();
    key.seal_in_place_append_tag(aead::Nonce::assume_unique_for_key(n), aead::Aad::from(aad), &mut body)
        .map_err(|_| KeyError::Random)?;
    let mut out = n.to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens what [`seal`] made with the same key and associated data; `None` if it does not.
fn open(key: &aead::LessSafeKey, aad: Vec<u8>, sealed: &[u8]) -> Option<Vec<u8>> {
    let (n, body) = sealed.split_first_chunk::<NONCE_BYTES>()?;
    let mut body = body.to_vec();
    let plain = key.open_in_place(aead::Nonce::assume_unique_for_key(*n), aead::Aad::from(aad), &mut body).ok()?;
    Some(plain.to_vec())
}

/// Environment variable that may hold the master key itself (64 hex digits), for
/// deployments that inject secrets as environment; it wins over `master_key_file`.
pub const MASTER_KEY_ENV: &str = "LIFEBOAT_MASTER_KEY";

/// Loads the master key from `LIFEBOAT_MASTER_KEY`, or from its file, creating the file
/// (with a loud note) if it is missing.
pub fn load_master(config: &crate::config::Config) -> anyhow::Result<MasterKey> {
    if let Some(value) = std::env::var_os(MASTER_KEY_ENV) {
        let value = lifeboat_shared::Secret::new(value.to_string_lossy().into_owned());
        return MasterKey::from_hex(value.expose())
            .ok_or_else(|| anyhow::anyhow!("{MASTER_KEY_ENV} must hold exactly 64 hex digits"));
    }
    if let Some(parent) = config.master_key_file.parent().filter(|p| !p.as_os_str().is_empty()) {
        anyhow::Context::with_context(std::fs::create_dir_all(parent), || format!("creating {}", parent.display()))?;
    }
    let (key, created) = MasterKey::load_or_create(&config.master_key_file)?;
    if created {
        tracing::warn!(
            master_key.file = %config.master_key_file.display(),
            master_key.id = key.id(),
            "generated a new master key: BACK IT UP, apart from the data directory; without it no snapshot can be restored"
        );
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_key_files_are_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let (a, created) = MasterKey::load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (b, created) = MasterKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.id(), b.id());
        assert_eq!(format!("{a:?}"), format!("MasterKey({}: ***)", a.id()));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(MasterKey::load(&path), Err(KeyError::TooOpen { mode: 0o644, .. })));
        std::fs::write(&path, "abc\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(MasterKey::load(&path), Err(KeyError::Malformed(_))));
    }

    #[test]
    fn wrapped_tenant_keys_unwrap_only_for_their_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let (master, _) = MasterKey::load_or_create(&dir.path().join("m")).unwrap();
        let t1 = TenantId(uuid::Uuid::from_bytes([1; 16]));
        let t2 = TenantId(uuid::Uuid::from_bytes([2; 16]));
        let (keys, id_w, data_w) = TenantKeys::generate(&master, t1).unwrap();
        let back = TenantKeys::unwrap(&master, t1, master.id(), &id_w, &data_w).unwrap();
        assert_eq!(back.id.chunk_id(b"x"), keys.id.chunk_id(b"x"));
        assert!(matches!(TenantKeys::unwrap(&master, t2, master.id(), &id_w, &data_w), Err(KeyError::Unwrap(_))));
        assert!(matches!(
            TenantKeys::unwrap(&master, t1, "0000000000000000", &id_w, &data_w),
            Err(KeyError::WrongMasterKey { .. })
        ));
    }

    #[test]
    fn sealed_secrets_open_only_for_their_tenant_purpose_and_subject() {
        let dir = tempfile::tempdir().unwrap();
        let (master, _) = MasterKey::load_or_create(&dir.path().join("m")).unwrap();
        let t1 = TenantId(uuid::Uuid::from_bytes([1; 16]));
        let t2 = TenantId(uuid::Uuid::from_bytes([2; 16]));
        let (k1, ..) = TenantKeys::generate(&master, t1).unwrap();
        let (k2, ..) = TenantKeys::generate(&master, t2).unwrap();
        let sealed = k1.seal_secret("backup password", "UDID-A", b"hunter2").unwrap();
        assert_eq!(sealed.len(), NONCE_BYTES + 7 + 16);
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(k1.open_secret("backup password", "UDID-A", &sealed).unwrap(), b"hunter2");
        assert_ne!(k1.seal_secret("backup password", "UDID-A", b"hunter2").unwrap(), sealed, "fresh nonce");
        for (keys, purpose, subject) in
            [(&k2, "backup password", "UDID-A"), (&k1, "other", "UDID-A"), (&k1, "backup password", "UDID-B")]
        {
            assert!(matches!(keys.open_secret(purpose, subject, &sealed), Err(KeyError::Unwrap(_))));
        }
        let mut bad = sealed.clone();
        bad[NONCE_BYTES] ^= 1;
        assert!(k1.open_secret("backup password", "UDID-A", &bad).is_err());
        assert!(k1.open_secret("backup password", "UDID-A", &sealed[..5]).is_err());
    }
}
