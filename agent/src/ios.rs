//! An iPhone backup folder's encryption on the agent: opening what the phone encrypted,
//! so the pipeline stores plaintext, and encrypting it again, so a restore or an export
//! hands over the phone's own bytes.
//!
//! A file's key arrives only in Manifest.db, after the last file, so [`Decryption::open`]
//! runs once the phone is done: Manifest.plist's keybag is unlocked with the escrowed
//! password (the double PBKDF2, once per backup — or not at all when the keybag's salts
//! and counts are those the agent derived a key for last time, [`KdfCache`]), Manifest.db is decrypted with
//! `ManifestKey` into a private copy, and every file's `EncryptionKey` is unwrapped with
//! its protection class. AES-256-CBC with a zero IV and PKCS7 is a function of key and
//! plaintext, so [`Encryption`] rebuilds the phone's ciphertext exactly (`docs/format.md`,
//! "iOS-encrypted snapshots"). Keys and passwords never reach a log line.
//! Never here: the phone's protocol (`device`) or the server (`net`).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use lifeboat_shared::Secret;
use lifeboat_shared::chunk::DataKey;
use lifeboat_shared::ios_backup::{self, PlistEncryption};
use lifeboat_shared::ios_crypto::{ClassKeys, Decryptor, FileKey, Keybag, KeybagError, PasscodeKey};
use lifeboat_shared::manifest::IosKey;

#[derive(Debug, thiserror::Error)]
pub enum IosError {
    #[error(
        "the escrowed backup password does not open this iPhone's backup: it was changed on the phone, or a wrong \
         one was entered; an admin enters the right one (PUT /api/v1/devices/{{udid}}/backup-password), or the \
         user resets it on the iPhone with Settings > General > Transfer or Reset iPhone > Reset All Settings"
    )]
    WrongPassword,
    #[error("the encrypted backup is damaged: {0}")]
    Damaged(String),
    #[error("{}: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IosError + '_ {
    move |cause| IosError::Io { path: path.to_path_buf(), cause }
}

/// Unlocks a keybag with a password, on the blocking pool's time (the phone's PBKDF2
/// counts take seconds). With a `cache`, a password key derived before for the same
/// password and the same salts and counts is used instead of deriving again.
pub fn unlock(keybag: &[u8], password: &Secret<String>, cache: Option<&KdfCache>) -> Result<ClassKeys, IosError> {
    let bag = Keybag::parse(keybag).map_err(|e| IosError::Damaged(format!("Manifest.plist BackupKeyBag: {e}")))?;
    let wrong = |e| match e {
        KeybagError::WrongPassword => IosError::WrongPassword,
        e => IosError::Damaged(format!("Manifest.plist BackupKeyBag: {e}")),
    };
    let id = KdfCache::id(&bag, password);
    if let Some(keys) = cache.and_then(|c| c.load(&id)).and_then(|k| bag.unlock(&k).ok()) {
        return Ok(keys);
    }
    let key = bag.derive(password.expose());
    let keys = bag.unlock(&key).map_err(wrong)?;
    if let Some(c) = cache {
        c.store(&id, &key);
    }
    Ok(keys)
}

/// The password key of a device's last keybag, kept between backups so an incremental
/// backup of a phone that kept its keybag does not pay the PBKDF2 again (seconds at iOS's
/// 10,000,000 rounds). `<state>/kdf/<udid>` (0600): `nonce [12] | AES-256-GCM(tenant data
/// key, id [32] | password key [32], AAD "lifeboat agent kdf cache v1|<udid>") | tag [16]`,
/// where `id` is SHA-256 of the password with the keybag's SALT, ITER, DPSL and DPIC: a
/// new password or a new keybag salt misses. It reveals nothing the state directory does
/// not already hold (the tenant keys and the agent's credentials, which fetch the
/// password itself), and a damaged or foreign file is a miss, never an error.
#[derive(Clone)]
pub struct KdfCache {
    path: PathBuf,
    aad: Vec<u8>,
    key: std::sync::Arc<DataKey>,
}

impl std::fmt::Debug for KdfCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KdfCache").field("path", &self.path).finish_non_exhaustive()
    }
}

impl KdfCache {
    pub fn new(state_dir: &Path, udid: &str, key: std::sync::Arc<DataKey>) -> Self {
        Self {
            path: state_dir.join("kdf").join(udid),
            aad: format!("lifeboat agent kdf cache v1|{udid}").into_bytes(),
            key,
        }
    }

    fn id(bag: &Keybag, password: &Secret<String>) -> [u8; 32] {
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        let mut field = |b: &[u8]| {
            h.update(&(b.len() as u64).to_be_bytes());
            h.update(b);
        };
        field(b"lifeboat agent kdf cache v1");
        field(password.expose().as_bytes());
        field(&bag.salt);
        field(&bag.iter.to_be_bytes());
        field(bag.dpsl.as_deref().unwrap_or_default());
        field(&bag.dpic.to_be_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(h.finish().as_ref());
        out
    }

    fn load(&self, id: &[u8; 32]) -> Option<PasscodeKey> {
        let bytes = std::fs::read(&self.path).ok()?;
        let (nonce, sealed) = bytes.split_first_chunk::<12>()?;
        let plain = self.key.open(*nonce, &self.aad, sealed)?;
        let (cached, key) = plain.split_first_chunk::<32>()?;
        let key: [u8; 32] = key.try_into().ok()?;
        (cached == id).then_some(PasscodeKey(key))
    }

    /// Keeps the key; a failure only costs the next backup a derivation.
    fn store(&self, id: &[u8; 32], key: &PasscodeKey) {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut nonce = [0u8; 12];
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).is_err() {
            return;
        }
        let mut plain = id.to_vec();
        plain.extend_from_slice(&key.0);
        let mut out = nonce.to_vec();
        self.key.seal_into(nonce, &self.aad, &plain, &mut out);
        let written = (|| {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)?;
            let tmp = self.path.with_extension("tmp");
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&out)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = written {
            tracing::debug!(path = %self.path.display(), error = %e, "could not keep the derived backup key");
        }
    }
}

/// The keys of one encrypted backup in the mirror, by path in the backup directory
/// (`Manifest.db`, `xx/<fileID>`).
pub struct Decryption {
    files: HashMap<String, (IosKey, FileKey)>,
}

impl std::fmt::Debug for Decryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decryption").field("files", &self.files.len()).finish_non_exhaustive()
    }
}

impl Decryption {
    /// Opens the backup in `dir` with `password`; `None` when the phone did not encrypt
    /// it. `scratch` is a private directory of this agent for Manifest.db's plaintext
    /// copy (removed before this returns).
    pub fn open(
        dir: &Path,
        password: &Secret<String>,
        scratch: &Path,
        cache: Option<&KdfCache>,
    ) -> Result<Option<Self>, IosError> {
        let plist_path = dir.join("Manifest.plist");
        let plist = std::fs::read(&plist_path).map_err(io(&plist_path))?;
        let (keybag, manifest_key) = match ios_backup::plist_encryption(&plist).map_err(IosError::Damaged)? {
            PlistEncryption::None => return Ok(None),
            PlistEncryption::Encrypted { keybag, manifest_key } => (keybag, manifest_key),
        };
        let keys = unlock(&keybag, password, cache)?;
        let db_key = keys
            .unwrap(manifest_key.class, &manifest_key.record)
            .map_err(|e| IosError::Damaged(format!("Manifest.plist ManifestKey: {e}")))?;
        let db_path = dir.join("Manifest.db");
        let mut files = HashMap::new();
        files.insert(
            "Manifest.db".to_string(),
            (IosKey { class: manifest_key.class, record: manifest_key.record }, db_key.clone()),
        );
        std::fs::create_dir_all(scratch).map_err(io(scratch))?;
        let copy =
            tempfile::Builder::new().prefix("manifest-").suffix(".db").tempfile_in(scratch).map_err(io(scratch))?;
        // Decrypted as it is copied: a fleet phone's Manifest.db is tens of megabytes, and
        // the backup's peak memory should not grow by twice that.
        let cipher = std::fs::File::open(&db_path).map_err(io(&db_path))?;
        let mut plain = DecryptingReader::new(std::io::BufReader::new(cipher), &db_key);
        let mut out = std::io::BufWriter::new(copy.as_file());
        std::io::copy(&mut plain, &mut out).and_then(|_| std::io::Write::flush(&mut out)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                IosError::Damaged(format!("{} {e}", db_path.display()))
            } else {
                IosError::Io { path: db_path.clone(), cause: e }
            }
        })?;
        drop(out);
        let damaged = |e: rusqlite::Error| IosError::Damaged(format!("Manifest.db: {e}"));
        let db = rusqlite::Connection::open_with_flags(copy.path(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(damaged)?;
        let mut stmt = db.prepare("SELECT fileID, file FROM Files WHERE flags = 1").map_err(damaged)?;
        let mut rows = stmt.query([]).map_err(damaged)?;
        while let Some(row) = rows.next().map_err(damaged)? {
            let file_id: String = row.get(0).map_err(damaged)?;
            let blob: Option<Vec<u8>> = row.get(1).map_err(damaged)?;
            if file_id.len() != 40 || !file_id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(IosError::Damaged(format!("Manifest.db: fileID {file_id:?} is not 40 hex digits")));
            }
            let bad = |e: String| IosError::Damaged(format!("Manifest.db {file_id}: {e}"));
            let record = ios_backup::decode_mbfile(&blob.unwrap_or_default()).map_err(bad)?;
            let Some(enc) = record.encryption else { continue };
            let key = keys.unwrap(enc.class, &enc.record).map_err(|e| bad(e.to_string()))?;
            let rel = format!("{}/{file_id}", &file_id[..2]);
            files.insert(rel, (IosKey { class: enc.class, record: enc.record }, key));
        }
        Ok(Some(Self { files }))
    }

    /// The key record and the key of the file at `rel` in the backup directory, if the
    /// phone encrypted it.
    pub fn get(&self, rel: &str) -> Option<&(IosKey, FileKey)> {
        self.files.get(rel)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// A reader of a file's plaintext, decrypting its ciphertext as it goes; the padding is
/// checked when the ciphertext ends (a damaged file or a wrong key is an error there).
pub struct DecryptingReader<R> {
    inner: R,
    decryptor: Option<Decryptor>,
    cipher: Box<[u8]>,
    plain: Vec<u8>,
    at: usize,
}

impl<R> std::fmt::Debug for DecryptingReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DecryptingReader")
    }
}

impl<R: Read> DecryptingReader<R> {
    pub fn new(inner: R, key: &FileKey) -> Self {
        Self { inner, decryptor: Some(key.decryptor()), cipher: vec![0; 256 * 1024].into(), plain: Vec::new(), at: 0 }
    }
}

impl<R: Read> Read for DecryptingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.at < self.plain.len() {
                let n = buf.len().min(self.plain.len() - self.at);
                buf[..n].copy_from_slice(&self.plain[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            let Some(decryptor) = self.decryptor.as_mut() else { return Ok(0) };
            self.plain.clear();
            self.at = 0;
            let n = self.inner.read(&mut self.cipher)?;
            if n == 0 {
                let d = self.decryptor.take().expect("present above");
                d.finish(&mut self.plain).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("does not decrypt with its key from Manifest.db: {e}"),
                    )
                })?;
            } else {
                decryptor.update(&self.cipher[..n], &mut self.plain);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn the_reader_gives_the_plaintext_and_refuses_bad_padding() {
        let key = FileKey([7; 32]);
        for len in [0usize, 1, 15, 16, 17, 300_000, 524_288] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let cipher = key.encrypt(&plain);
            let mut out = Vec::new();
            DecryptingReader::new(&cipher[..], &key).read_to_end(&mut out).unwrap();
            assert_eq!(out, plain, "{len} bytes");
        }
        let cipher = key.encrypt(b"hello");
        let err = DecryptingReader::new(&cipher[..], &FileKey([8; 32])).read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        let err = DecryptingReader::new(&cipher[..15], &key).read_to_end(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("not a whole number of 16-byte blocks"), "{err}");
    }

    /// The derived password key is reused only for the same password and the same salts
    /// and counts; a damaged or foreign cache file is a miss, never an error.
    #[test]
    fn the_password_key_cache_hits_only_for_the_same_password_and_keybag() {
        let mut n = 0u8;
        let mut random = |b: &mut [u8]| {
            for x in b.iter_mut() {
                n = n.wrapping_add(37);
                *x = n;
            }
        };
        let (bag, classes) = Keybag::generate("right", 10, 10, &mut random);
        let bytes = bag.to_bytes(&[0; 40]);
        let state = tempfile::tempdir().unwrap();
        let data = std::sync::Arc::new(DataKey::from_bytes(&[3; 32]));
        let cache = KdfCache::new(state.path(), "UDID-A", data.clone());
        let right = Secret::new("right".to_string());
        let first = unlock(&bytes, &right, Some(&cache)).unwrap();
        let id = KdfCache::id(&bag, &right);
        assert_eq!(cache.load(&id).map(|k| k.0), Some(bag.derive("right").0), "kept after a derivation");
        let file = state.path().join("kdf/UDID-A");
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        let raw = std::fs::read(&file).unwrap();
        assert!(!raw.windows(32).any(|w| w == bag.derive("right").0), "sealed, not in the clear");
        assert_eq!(unlock(&bytes, &right, Some(&cache)).unwrap().classes().count(), first.classes().count());
        assert_eq!(first.classes().count(), classes.classes().count());

        // Another password, another device, a new salt: misses.
        assert!(matches!(unlock(&bytes, &Secret::new("wrong".into()), Some(&cache)), Err(IosError::WrongPassword)));
        assert!(KdfCache::new(state.path(), "UDID-B", data.clone()).load(&id).is_none());
        let mut salted = bag.clone();
        salted.salt[0] ^= 1;
        assert!(cache.load(&KdfCache::id(&salted, &right)).is_none());
        // Damaged, or sealed with another key: a miss, and the derivation still unlocks.
        std::fs::write(&file, &raw[..20]).unwrap();
        assert!(cache.load(&id).is_none());
        assert!(
            KdfCache::new(state.path(), "UDID-A", std::sync::Arc::new(DataKey::from_bytes(&[4; 32])))
                .load(&id)
                .is_none()
        );
        assert!(unlock(&bytes, &right, Some(&cache)).is_ok());
    }
}
