//! A device's backup encryption: the backup password the phone holds (none, or set), an
//! MDM profile that forces encryption, and the keys an encrypted backup is made with.
//!
//! The phone, not the host, holds the password: `WillEncrypt` in lockdown says whether
//! backups come encrypted, and `ChangePassword` over MobileBackup2 turns encryption on,
//! changes the password or turns it off, with the answers a real phone gives (reference
//! `ios-encrypted-backups.md` §1). Setting a password makes a new backup keybag (class
//! keys wrapped with the password-derived key, at the PBKDF2 counts of `--kdf-rounds`);
//! each file's key is stable for its file id, so an incremental backup's unchanged files
//! keep the key their stored ciphertext was made with. Saved in `<device>/encryption.json`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use lifeboat_shared::ios_crypto::{ClassKeys, FileKey, KEY_RECORD_BYTES, Keybag};
use serde::{Deserialize, Serialize};

/// MobileBackup2's answer for a wrong or missing old password.
pub const INVALID_PASSWORD: u64 = 207;
/// The answer for turning encryption off (or backing up without a password) while a
/// profile forces encryption.
pub const FORCED: u64 = 1;
pub const FORCED_OFF_TEXT: &str = "Error setting WillEncrypt value in lockdown (MBErrorDomain/1). Underlying error: \
     Cannot remove iTunes Backup Encryption - Encrypted Backup MDM setting present on device (MBErrorDomain/22).";
pub const FORCED_BACKUP_TEXT: &str = "Backups of this device must be encrypted: an Encrypted Backup MDM setting is \
     present on device. Set a backup password with ChangePassword first (MBErrorDomain/22).";
pub const INVALID_PASSWORD_TEXT: &str = "Invalid password (MBErrorDomain/207)";
pub const INVALID_RESTORE_PASSWORD_TEXT: &str = "Invalid password when restoring encrypted backup \
     (MBErrorDomain/207). Underlying error: MKBKeyBagUnlock error (-3)";

/// Real iOS counts; `serve --kdf-rounds` lowers them for fast tests.
pub const DEFAULT_KDF_ROUNDS: u32 = lifeboat_shared::ios_crypto::IOS_DPIC;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Saved {
    password: Option<String>,
    mdm_forced: bool,
    /// The keybag of the password (base64 TLV), and the seed of file keys (hex).
    keybag: Option<String>,
    file_key_seed: Option<String>,
}

/// The keys of the current password.
pub struct Keys {
    pub keybag: Keybag,
    /// `BackupKeyBag` as Manifest.plist carries it.
    pub keybag_bytes: Vec<u8>,
    pub class_keys: ClassKeys,
    file_key_seed: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("keybag", &self.keybag).finish_non_exhaustive()
    }
}

impl Keys {
    /// A file's key: HMAC-SHA256(seed, file id), the same in every backup of this password.
    pub fn file_key(&self, file_id: &str) -> FileKey {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.file_key_seed);
        let tag = ring::hmac::sign(&key, file_id.as_bytes());
        let mut k = [0u8; 32];
        k.copy_from_slice(tag.as_ref());
        FileKey(k)
    }

    /// A file's protection class: mostly 3 (until first unlock), some 1, 2 and 4, so
    /// every class key of the keybag is used.
    pub fn protection_class(file_id: &str) -> u32 {
        match u8::from_str_radix(file_id.get(..2).unwrap_or("00"), 16).unwrap_or(0) % 8 {
            0 => 1,
            1 => 2,
            2 => 4,
            _ => 3,
        }
    }

    /// MBFile `EncryptionKey` of a file: its class and its key wrapped with that class.
    pub fn record(&self, file_id: &str) -> (u32, [u8; KEY_RECORD_BYTES]) {
        let class = Self::protection_class(file_id);
        // Invariant: the keybag made by `Keybag::generate` has every class 1–4.
        let record = self.class_keys.wrap(class, &self.file_key(file_id)).expect("classes 1-4 are in the keybag");
        (class, record)
    }
}

/// One device's encryption state.
#[derive(Debug)]
pub struct Encryption {
    path: PathBuf,
    rounds: u32,
    inner: Mutex<(Saved, Option<Arc<Keys>>)>,
}

fn random(buf: &mut [u8]) {
    // Invariant: the system RNG does not fail on Linux once the kernel is up.
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), buf).expect("the system random generator works");
}

impl Encryption {
    /// Loads `<dir>/encryption.json` (none: no password, not forced).
    pub fn load(dir: &Path, rounds: u32) -> std::io::Result<Self> {
        let path = dir.join("encryption.json");
        let saved = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(e) => return Err(e),
        };
        Ok(Self { path, rounds: rounds.max(1), inner: Mutex::new((saved, None)) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Saved, Option<Arc<Keys>>)> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn save(&self, saved: &Saved) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, &self.path)
    }

    /// `WillEncrypt`: a password is set.
    pub fn will_encrypt(&self) -> bool {
        self.lock().0.password.is_some()
    }

    /// An MDM profile forces encrypted backups.
    pub fn mdm_forced(&self) -> bool {
        self.lock().0.mdm_forced
    }

    /// Sets (or clears) the password as the phone's user or another host did: no old
    /// password asked for, a new keybag made.
    pub fn set(&self, password: Option<String>) -> std::io::Result<()> {
        let mut g = self.lock();
        let mut saved = g.0.clone();
        match password {
            Some(p) => {
                let (keys, bag_b64, seed_hex) = self.generate(&p);
                saved.password = Some(p);
                saved.keybag = Some(bag_b64);
                saved.file_key_seed = Some(seed_hex);
                self.save(&saved)?;
                *g = (saved, Some(Arc::new(keys)));
            }
            None => {
                saved.password = None;
                saved.keybag = None;
                saved.file_key_seed = None;
                self.save(&saved)?;
                *g = (saved, None);
            }
        }
        Ok(())
    }

    pub fn set_mdm_forced(&self, forced: bool) -> std::io::Result<()> {
        let mut g = self.lock();
        g.0.mdm_forced = forced;
        let saved = g.0.clone();
        self.save(&saved)
    }

    /// `ChangePassword`, with the phone's rules: set when none is set, change or clear
    /// with the right old password, and nothing else (207); never off while forced.
    pub fn change(&self, old: Option<&str>, new: Option<&str>) -> Result<(), (u64, &'static str)> {
        let (current, forced) = {
            let g = self.lock();
            (g.0.password.clone(), g.0.mdm_forced)
        };
        if new.is_some_and(str::is_empty) {
            return Err((INVALID_PASSWORD, INVALID_PASSWORD_TEXT));
        }
        let outcome = match (current.as_deref(), old, new) {
            (None, None, Some(_)) => Ok(()),
            (Some(c), Some(o), _) if c == o => Ok(()),
            _ => Err((INVALID_PASSWORD, INVALID_PASSWORD_TEXT)),
        };
        outcome?;
        match new {
            Some(n) => self.set(Some(n.to_string())).map_err(|_| (FORCED, "could not keep the new password")),
            None if forced => Err((FORCED, FORCED_OFF_TEXT)),
            None => self.set(None).map_err(|_| (FORCED, "could not clear the password")),
        }
    }

    /// The keys of the current password (derived once per process: seconds at iOS's counts).
    pub fn keys(&self) -> Option<Arc<Keys>> {
        let (saved, cached) = {
            let g = self.lock();
            (g.0.clone(), g.1.clone())
        };
        if cached.is_some() {
            return cached;
        }
        let (password, bag, seed) = (saved.password?, saved.keybag?, saved.file_key_seed?);
        let bytes = base64::engine::general_purpose::STANDARD.decode(bag).ok()?;
        let keybag = Keybag::parse(&bytes).ok()?;
        let class_keys = keybag.open(&password).ok()?;
        let mut file_key_seed = [0u8; 32];
        let seed = (0..64)
            .step_by(2)
            .map(|i| u8::from_str_radix(seed.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        file_key_seed.copy_from_slice(seed.get(..32)?);
        let keys = Arc::new(Keys { keybag, keybag_bytes: bytes, class_keys, file_key_seed });
        self.lock().1 = Some(keys.clone());
        Some(keys)
    }

    fn generate(&self, password: &str) -> (Keys, String, String) {
        let iter = self.rounds.min(lifeboat_shared::ios_crypto::IOS_ITER);
        let (keybag, class_keys) = Keybag::generate(password, iter, self.rounds, &mut random);
        let mut hmck = [0u8; 40];
        random(&mut hmck);
        let bytes = keybag.to_bytes(&hmck);
        let mut file_key_seed = [0u8; 32];
        random(&mut file_key_seed);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let seed_hex = crate::manifest::hex(&file_key_seed);
        (Keys { keybag, keybag_bytes: bytes, class_keys, file_key_seed }, b64, seed_hex)
    }
}

/// A fresh random Manifest.db key.
pub fn manifest_key() -> FileKey {
    let mut k = [0u8; 32];
    random(&mut k);
    FileKey(k)
}

/// Encrypts a reader's bytes as the phone sends a file: AES-256-CBC, IV 0, PKCS7.
pub struct EncryptingReader {
    inner: Box<dyn std::io::Read + Send>,
    enc: Option<lifeboat_shared::ios_crypto::Encryptor>,
    out: Vec<u8>,
    pos: usize,
    buf: Vec<u8>,
}

impl std::fmt::Debug for EncryptingReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EncryptingReader")
    }
}

impl EncryptingReader {
    pub fn new(inner: Box<dyn std::io::Read + Send>, key: &FileKey) -> Self {
        Self { inner, enc: Some(key.encryptor()), out: Vec::new(), pos: 0, buf: vec![0u8; 64 * 1024] }
    }
}

impl std::io::Read for EncryptingReader {
    fn read(&mut self, dst: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.out.len() {
            let Some(enc) = self.enc.as_mut() else { return Ok(0) };
            self.out.clear();
            self.pos = 0;
            let n = self.inner.read(&mut self.buf)?;
            if n == 0 {
                if let Some(enc) = self.enc.take() {
                    enc.finish(&mut self.out);
                }
            } else {
                enc.update(&self.buf[..n], &mut self.out);
            }
        }
        let n = dst.len().min(self.out.len() - self.pos);
        dst[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn change_password_follows_the_phone_rules() {
        let dir = tempfile::tempdir().unwrap();
        let e = Encryption::load(dir.path(), 10).unwrap();
        assert!(!e.will_encrypt());
        assert_eq!(e.change(Some("x"), None), Err((207, INVALID_PASSWORD_TEXT)), "nothing to turn off");
        assert_eq!(e.change(None, Some("one")), Ok(()));
        assert!(e.will_encrypt());
        assert_eq!(e.change(None, Some("two")), Err((207, INVALID_PASSWORD_TEXT)), "already on");
        assert_eq!(e.change(Some("bad"), Some("two")), Err((207, INVALID_PASSWORD_TEXT)));
        assert_eq!(e.change(Some("one"), Some("two")), Ok(()));
        e.set_mdm_forced(true).unwrap();
        assert_eq!(e.change(Some("two"), None), Err((1, FORCED_OFF_TEXT)));
        // Kept across a restart, and the keys open with the password.
        let again = Encryption::load(dir.path(), 10).unwrap();
        assert!(again.will_encrypt() && again.mdm_forced());
        let keys = again.keys().unwrap();
        assert_eq!(keys.keybag.open("two").unwrap(), keys.class_keys);
        let (class, record) = keys.record("ab12");
        assert_eq!(keys.class_keys.unwrap(class, &record).unwrap(), keys.file_key("ab12"));
        again.set_mdm_forced(false).unwrap();
        assert_eq!(again.change(Some("two"), None), Ok(()));
        assert!(!again.will_encrypt() && again.keys().is_none());
    }

    #[test]
    fn the_encrypting_reader_matches_whole_file_encryption() {
        let key = FileKey([3; 32]);
        let plain: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let mut out = Vec::new();
        EncryptingReader::new(Box::new(std::io::Cursor::new(plain.clone())), &key).read_to_end(&mut out).unwrap();
        assert_eq!(out, key.encrypt(&plain));
    }
}
