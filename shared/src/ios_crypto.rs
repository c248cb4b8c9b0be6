//! iOS encrypted-backup cryptography, both sides: the backup keybag (TLV), the password
//! key derivation, RFC 3394 class and file key wraps, and AES-256-CBC with a zero IV and
//! PKCS7 that every file and Manifest.db is encrypted with.
//!
//! A phone (or the virtual iPhone) builds a keybag from a password and wraps keys; the
//! agent unlocks the keybag with the escrowed password, unwraps each file's key,
//! decrypts what the phone sent and, for a restore or an export, encrypts the plaintext
//! again. CBC with a fixed IV and PKCS7 is a function of (key, plaintext), so the bytes
//! rebuilt are the bytes the phone made. Facts and test vectors:
//! `docs/format.md` ("iOS-encrypted snapshots").
//!
//! No I/O and no randomness here: a keybag's salts and keys come from the caller.

use std::collections::BTreeMap;
use std::fmt;

use aes::cipher::{Block, BlockModeDecrypt as _, BlockModeEncrypt as _, KeyInit as _, KeyIvInit as _};

/// Bytes of a key wrapped with RFC 3394 (a 32-byte key plus the 8-byte check).
pub const WRAPPED_KEY_BYTES: usize = 40;
/// Bytes of a key record (`ManifestKey`, MBFile `EncryptionKey`): `u32 LE class || wrapped`.
pub const KEY_RECORD_BYTES: usize = 4 + WRAPPED_KEY_BYTES;
/// AES block size.
pub const BLOCK_BYTES: usize = 16;
/// Highest PBKDF2 counts a keybag may ask for (what `iphone_backup_decrypt` accepts):
/// more is refused rather than spending minutes of CPU on a hostile keybag.
pub const MAX_DPIC: u32 = 20_000_000;
pub const MAX_ITER: u32 = 1_000_000;
/// The counts iOS 10.2 and later use.
pub const IOS_DPIC: u32 = 10_000_000;
pub const IOS_ITER: u32 = 10_000;

/// The bytes of ciphertext for `plain_len` bytes of plaintext (always padded: 1–16 bytes).
pub fn cipher_len(plain_len: u64) -> u64 {
    (plain_len / BLOCK_BYTES as u64 + 1) * BLOCK_BYTES as u64
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeybagError {
    #[error("the backup keybag is damaged: {0}")]
    Malformed(String),
    #[error("the backup password is wrong: it does not unlock the backup keybag")]
    WrongPassword,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a key record is {0} bytes, not {KEY_RECORD_BYTES}")]
    RecordLength(usize),
    #[error("protection class {0} is not in the backup keybag")]
    NoClass(u32),
    #[error(
        "a file key does not unwrap with protection class {0}'s key: the keybag and the file do not belong together"
    )]
    Unwrap(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CipherError {
    #[error("ciphertext of {0} bytes is not a whole number of 16-byte blocks")]
    NotBlocks(u64),
    #[error("the decrypted data does not end in valid PKCS7 padding: wrong key or damaged ciphertext")]
    Padding,
}

/// One class block of a keybag.
#[derive(Clone, PartialEq, Eq)]
pub struct ClassEntry {
    pub class: u32,
    /// WRAP bits: 1 device key (UID), 2 passcode (the backup password).
    pub wrap: u32,
    pub key_type: u32,
    pub wrapped: [u8; WRAPPED_KEY_BYTES],
    pub uuid: [u8; 16],
}

/// A parsed backup keybag (`BackupKeyBag` of Manifest.plist).
#[derive(Clone, PartialEq, Eq)]
pub struct Keybag {
    pub version: u32,
    pub kind: u32,
    pub uuid: [u8; 16],
    /// PBKDF2-HMAC-SHA1 salt and count (the second round).
    pub salt: Vec<u8>,
    pub iter: u32,
    /// PBKDF2-HMAC-SHA256 salt and count (the first round, iOS 10.2+); absent before.
    pub dpsl: Option<Vec<u8>>,
    pub dpic: u32,
    pub classes: Vec<ClassEntry>,
}

impl fmt::Debug for Keybag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keybag")
            .field("kind", &self.kind)
            .field("iter", &self.iter)
            .field("dpic", &self.dpic)
            .field("classes", &self.classes.iter().map(|c| c.class).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ClassEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassEntry").field("class", &self.class).field("wrap", &self.wrap).finish_non_exhaustive()
    }
}

fn tlv(out: &mut Vec<u8>, tag: &[u8; 4], value: &[u8]) {
    out.extend_from_slice(tag);
    // Keybag values are at most 40 bytes.
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

fn be32(tag: &[u8; 4], v: &[u8]) -> Result<u32, KeybagError> {
    <[u8; 4]>::try_from(v)
        .map(u32::from_be_bytes)
        .map_err(|_| KeybagError::Malformed(format!("{} is {} bytes, not 4", String::from_utf8_lossy(tag), v.len())))
}

/// A class block being parsed: CLAS, WRAP, KTYP, WPKY as far as seen, and its UUID.
type PartialClass = (Option<u32>, Option<u32>, Option<u32>, Option<[u8; WRAPPED_KEY_BYTES]>, [u8; 16]);

impl Keybag {
    /// Parses the TLV bytes: a global section, then one block per class opened by its
    /// `UUID`. Counts beyond [`MAX_DPIC`]/[`MAX_ITER`] are refused.
    pub fn parse(bytes: &[u8]) -> Result<Self, KeybagError> {
        let bad = |m: String| KeybagError::Malformed(m);
        let (mut version, mut kind, mut uuid) = (None, None, None);
        let (mut salt, mut iter, mut dpsl, mut dpic) = (None, None, None, 0u32);
        let mut classes: Vec<ClassEntry> = Vec::new();
        let mut current: Option<PartialClass> = None;
        let finish = |c: Option<PartialClass>, classes: &mut Vec<ClassEntry>| -> Result<(), KeybagError> {
            if let Some((class, wrap, key_type, wrapped, uuid)) = c {
                let (Some(class), Some(wrapped)) = (class, wrapped) else {
                    return Err(KeybagError::Malformed("a class block without CLAS or WPKY".into()));
                };
                classes.push(ClassEntry {
                    class,
                    wrap: wrap.unwrap_or(0),
                    key_type: key_type.unwrap_or(0),
                    wrapped,
                    uuid,
                });
            }
            Ok(())
        };
        let mut rest = bytes;
        while !rest.is_empty() {
            if rest.len() < 8 {
                return Err(bad(format!("{} stray bytes at the end", rest.len())));
            }
            let tag: [u8; 4] = [rest[0], rest[1], rest[2], rest[3]];
            let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
            let Some(value) = rest.get(8..8 + len) else {
                return Err(bad(format!(
                    "{} claims {len} bytes, {} are left",
                    String::from_utf8_lossy(&tag),
                    rest.len() - 8
                )));
            };
            rest = &rest[8 + len..];
            match &tag {
                b"UUID" => {
                    let u: [u8; 16] = value.try_into().map_err(|_| bad(format!("UUID is {len} bytes")))?;
                    if uuid.is_none() {
                        uuid = Some(u);
                    } else {
                        finish(current.take(), &mut classes)?;
                        current = Some((None, None, None, None, u));
                    }
                }
                b"CLAS" | b"WRAP" | b"KTYP" | b"WPKY" if current.is_some() => {
                    let Some(c) = current.as_mut() else { unreachable!("checked by the guard") };
                    match &tag {
                        b"CLAS" => c.0 = Some(be32(&tag, value)?),
                        b"WRAP" => c.1 = Some(be32(&tag, value)?),
                        b"KTYP" => c.2 = Some(be32(&tag, value)?),
                        _ => c.3 = Some(value.try_into().map_err(|_| bad(format!("WPKY is {len} bytes, not 40")))?),
                    }
                }
                b"CLAS" | b"KTYP" | b"WPKY" => return Err(bad("a class tag before any class UUID".into())),
                b"VERS" => version = Some(be32(&tag, value)?),
                b"TYPE" => kind = Some(be32(&tag, value)?),
                b"SALT" => salt = Some(value.to_vec()),
                b"ITER" => iter = Some(be32(&tag, value)?),
                b"DPSL" => dpsl = Some(value.to_vec()),
                b"DPIC" => dpic = be32(&tag, value)?,
                // HMCK, global WRAP, DPWT, SIGN, PBKY…: not needed to unlock.
                _ => {}
            }
        }
        finish(current.take(), &mut classes)?;
        let kind = kind.ok_or_else(|| bad("no TYPE".into()))?;
        if kind & 0x3fff_ffff > 3 {
            return Err(bad(format!("TYPE {kind} is not a keybag type")));
        }
        let iter = iter.ok_or_else(|| bad("no ITER".into()))?;
        if !(1..=MAX_ITER).contains(&iter) {
            return Err(bad(format!("ITER {iter} is outside 1…{MAX_ITER}")));
        }
        if dpsl.is_some() && !(1..=MAX_DPIC).contains(&dpic) {
            return Err(bad(format!("DPIC {dpic} is outside 1…{MAX_DPIC}")));
        }
        if classes.is_empty() {
            return Err(bad("no class keys".into()));
        }
        Ok(Self {
            version: version.unwrap_or(0),
            kind,
            uuid: uuid.ok_or_else(|| bad("no UUID".into()))?,
            salt: salt.ok_or_else(|| bad("no SALT".into()))?,
            iter,
            dpsl,
            dpic,
            classes,
        })
    }

    /// The TLV bytes, in the order a phone writes them.
    pub fn to_bytes(&self, hmck: &[u8; 40]) -> Vec<u8> {
        let mut out = Vec::new();
        tlv(&mut out, b"VERS", &self.version.to_be_bytes());
        tlv(&mut out, b"TYPE", &self.kind.to_be_bytes());
        tlv(&mut out, b"UUID", &self.uuid);
        tlv(&mut out, b"HMCK", hmck);
        tlv(&mut out, b"WRAP", &0u32.to_be_bytes());
        tlv(&mut out, b"SALT", &self.salt);
        tlv(&mut out, b"ITER", &self.iter.to_be_bytes());
        if let Some(dpsl) = &self.dpsl {
            tlv(&mut out, b"DPWT", &1u32.to_be_bytes());
            tlv(&mut out, b"DPIC", &self.dpic.to_be_bytes());
            tlv(&mut out, b"DPSL", dpsl);
        }
        for c in &self.classes {
            tlv(&mut out, b"UUID", &c.uuid);
            tlv(&mut out, b"CLAS", &c.class.to_be_bytes());
            tlv(&mut out, b"WRAP", &c.wrap.to_be_bytes());
            tlv(&mut out, b"KTYP", &c.key_type.to_be_bytes());
            tlv(&mut out, b"WPKY", &c.wrapped);
        }
        out
    }

    /// The password key: `PBKDF2-SHA1(PBKDF2-SHA256(password, DPSL, DPIC), SALT, ITER)`
    /// (the SHA-256 round only when the keybag has a DPSL). Seconds of CPU at iOS's counts.
    pub fn derive(&self, password: &str) -> PasscodeKey {
        let mut round1 = [0u8; 32];
        let input: &[u8] = match &self.dpsl {
            Some(dpsl) => {
                let n = std::num::NonZeroU32::new(self.dpic).unwrap_or(std::num::NonZeroU32::MIN);
                ring::pbkdf2::derive(ring::pbkdf2::PBKDF2_HMAC_SHA256, n, dpsl, password.as_bytes(), &mut round1);
                &round1
            }
            None => password.as_bytes(),
        };
        let mut key = [0u8; 32];
        let n = std::num::NonZeroU32::new(self.iter).unwrap_or(std::num::NonZeroU32::MIN);
        ring::pbkdf2::derive(ring::pbkdf2::PBKDF2_HMAC_SHA1, n, &self.salt, input, &mut key);
        PasscodeKey(key)
    }

    /// The class keys: every class wrapped with the passcode (WRAP bit 2) must unwrap, or
    /// the password is wrong. Classes also wrapped with the device's UID key stay opaque
    /// off the phone and are left out.
    pub fn unlock(&self, key: &PasscodeKey) -> Result<ClassKeys, KeybagError> {
        let kw = aes_kw::KwAes256::new(&key.0.into());
        let mut keys = BTreeMap::new();
        for c in &self.classes {
            if c.wrap & 2 == 0 {
                continue;
            }
            let mut out = [0u8; 32];
            kw.unwrap_key(&c.wrapped, &mut out).map_err(|_| KeybagError::WrongPassword)?;
            if c.wrap & 1 == 0 {
                keys.insert(c.class, out);
            }
        }
        if keys.is_empty() {
            return Err(KeybagError::Malformed("no class key is wrapped with the password alone".into()));
        }
        Ok(ClassKeys(keys))
    }

    /// Derive and unlock in one.
    pub fn open(&self, password: &str) -> Result<ClassKeys, KeybagError> {
        self.unlock(&self.derive(password))
    }

    /// A new backup keybag for `password`, as a phone makes one: classes 11 down to 1,
    /// 5, 9, 10 and 11 also bound to the device (WRAP 3). `random` supplies every salt,
    /// UUID and class key (the caller's randomness; this crate has none).
    pub fn generate(password: &str, iter: u32, dpic: u32, random: &mut dyn FnMut(&mut [u8])) -> (Self, ClassKeys) {
        let mut take = |n: usize| {
            let mut v = vec![0u8; n];
            random(&mut v);
            v
        };
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&take(16));
        let mut bag =
            Self { version: 5, kind: 1, uuid, salt: take(20), iter, dpsl: Some(take(20)), dpic, classes: Vec::new() };
        let kw = aes_kw::KwAes256::new(&bag.derive(password).0.into());
        let mut keys = BTreeMap::new();
        for class in (1..=11u32).rev() {
            let mut key = [0u8; 32];
            key.copy_from_slice(&take(32));
            let mut c_uuid = [0u8; 16];
            c_uuid.copy_from_slice(&take(16));
            let mut wrapped = [0u8; WRAPPED_KEY_BYTES];
            // Invariant: a 32-byte key always wraps into 40 bytes.
            kw.wrap_key(&key, &mut wrapped).expect("a 32-byte key wraps into 40 bytes");
            let wrap = if matches!(class, 5 | 9 | 10 | 11) { 3 } else { 2 };
            if wrap == 2 {
                keys.insert(class, key);
            }
            bag.classes.push(ClassEntry { class, wrap, key_type: 0, wrapped, uuid: c_uuid });
        }
        (bag, ClassKeys(keys))
    }
}

/// The key derived from the backup password: as good as the password. Never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct PasscodeKey(pub [u8; 32]);

impl fmt::Debug for PasscodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasscodeKey(***)")
    }
}

/// The unwrapped class keys of a keybag, by protection class. Never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct ClassKeys(BTreeMap<u32, [u8; 32]>);

impl fmt::Debug for ClassKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClassKeys({:?}: ***)", self.0.keys().collect::<Vec<_>>())
    }
}

/// A key record: `u32 LE protection class || RFC 3394 wrap of a 32-byte key`.
pub fn parse_record(record: &[u8]) -> Result<(u32, [u8; WRAPPED_KEY_BYTES]), KeyError> {
    if record.len() != KEY_RECORD_BYTES {
        return Err(KeyError::RecordLength(record.len()));
    }
    let class = u32::from_le_bytes([record[0], record[1], record[2], record[3]]);
    let mut wrapped = [0u8; WRAPPED_KEY_BYTES];
    wrapped.copy_from_slice(&record[4..]);
    Ok((class, wrapped))
}

impl ClassKeys {
    /// Unwraps a file's key with protection class `class` (readers take MBFile's
    /// `ProtectionClass`, not the record's prefix; for `ManifestKey` they are the same).
    pub fn unwrap(&self, class: u32, record: &[u8]) -> Result<FileKey, KeyError> {
        let (_, wrapped) = parse_record(record)?;
        let kek = self.0.get(&class).ok_or(KeyError::NoClass(class))?;
        let mut key = [0u8; 32];
        aes_kw::KwAes256::new(&(*kek).into()).unwrap_key(&wrapped, &mut key).map_err(|_| KeyError::Unwrap(class))?;
        Ok(FileKey(key))
    }

    /// Wraps `key` with class `class` into a key record (what a phone puts in MBFile).
    pub fn wrap(&self, class: u32, key: &FileKey) -> Result<[u8; KEY_RECORD_BYTES], KeyError> {
        let kek = self.0.get(&class).ok_or(KeyError::NoClass(class))?;
        let mut record = [0u8; KEY_RECORD_BYTES];
        record[..4].copy_from_slice(&class.to_le_bytes());
        // Invariant: a 32-byte key always wraps into 40 bytes.
        aes_kw::KwAes256::new(&(*kek).into())
            .wrap_key(&key.0, &mut record[4..])
            .expect("a 32-byte key wraps into 40 bytes");
        Ok(record)
    }

    pub fn classes(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.keys().copied()
    }
}

/// One file's (or Manifest.db's) AES-256 key. Never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct FileKey(pub [u8; 32]);

impl fmt::Debug for FileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FileKey(***)")
    }
}

type CbcEnc = cbc::Encryptor<aes::Aes256>;
type CbcDec = cbc::Decryptor<aes::Aes256>;

impl FileKey {
    /// `AES-256-CBC(key, IV 0, PKCS7(plain))`, the whole of a small file.
    pub fn encrypt(&self, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(cipher_len(plain.len() as u64) as usize);
        let mut e = self.encryptor();
        e.update(plain, &mut out);
        e.finish(&mut out);
        out
    }

    /// The plaintext of a whole small file; the padding must be valid.
    pub fn decrypt(&self, cipher: &[u8]) -> Result<Vec<u8>, CipherError> {
        if cipher.is_empty() || !cipher.len().is_multiple_of(BLOCK_BYTES) {
            return Err(CipherError::NotBlocks(cipher.len() as u64));
        }
        let mut out = Vec::with_capacity(cipher.len());
        let mut d = self.decryptor();
        d.update(cipher, &mut out);
        d.finish(&mut out)?;
        Ok(out)
    }

    pub fn encryptor(&self) -> Encryptor {
        Encryptor { cbc: CbcEnc::new(&self.0.into(), &[0u8; 16].into()), partial: Vec::with_capacity(BLOCK_BYTES) }
    }

    pub fn decryptor(&self) -> Decryptor {
        Decryptor {
            cbc: CbcDec::new(&self.0.into(), &[0u8; 16].into()),
            held: None,
            partial: Vec::with_capacity(BLOCK_BYTES),
            seen: 0,
        }
    }
}

fn blocks(buf: &mut [u8]) -> &mut [Block<aes::Aes256>] {
    let (blocks, rest) = Block::<aes::Aes256>::slice_as_chunks_mut(buf);
    debug_assert!(rest.is_empty());
    blocks
}

/// Streaming encryption: plaintext in any pieces, ciphertext out in whole blocks, the
/// padding at [`Encryptor::finish`].
pub struct Encryptor {
    cbc: CbcEnc,
    partial: Vec<u8>,
}

impl fmt::Debug for Encryptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Encryptor")
    }
}

impl Encryptor {
    /// Encrypts what whole blocks `plain` completes, appending the ciphertext to `out`.
    pub fn update(&mut self, mut plain: &[u8], out: &mut Vec<u8>) {
        if !self.partial.is_empty() {
            let take = (BLOCK_BYTES - self.partial.len()).min(plain.len());
            self.partial.extend_from_slice(&plain[..take]);
            plain = &plain[take..];
            if self.partial.len() < BLOCK_BYTES {
                return;
            }
            let start = out.len();
            out.extend_from_slice(&self.partial);
            self.cbc.encrypt_blocks(blocks(&mut out[start..]));
            self.partial.clear();
        }
        let whole = plain.len() - plain.len() % BLOCK_BYTES;
        let start = out.len();
        out.extend_from_slice(&plain[..whole]);
        self.cbc.encrypt_blocks(blocks(&mut out[start..]));
        self.partial.extend_from_slice(&plain[whole..]);
    }

    /// The last block, with 1–16 bytes of PKCS7 padding.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        let pad = (BLOCK_BYTES - self.partial.len()) as u8;
        self.partial.resize(BLOCK_BYTES, pad);
        let start = out.len();
        out.extend_from_slice(&self.partial);
        self.cbc.encrypt_blocks(blocks(&mut out[start..]));
    }
}

/// Streaming decryption: ciphertext in any pieces, plaintext out; the last block is held
/// back until [`Decryptor::finish`] checks and strips its padding.
pub struct Decryptor {
    cbc: CbcDec,
    /// The last whole block decrypted (it may be the padding).
    held: Option<[u8; BLOCK_BYTES]>,
    /// Ciphertext short of a whole block.
    partial: Vec<u8>,
    seen: u64,
}

impl fmt::Debug for Decryptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Decryptor")
    }
}

impl Decryptor {
    /// Decrypts what whole blocks `cipher` completes, appending the plaintext to `out`
    /// (all but the last block, which may be padding).
    pub fn update(&mut self, mut cipher: &[u8], out: &mut Vec<u8>) {
        self.seen += cipher.len() as u64;
        if self.partial.len() + cipher.len() < BLOCK_BYTES {
            self.partial.extend_from_slice(cipher);
            return;
        }
        // At least one whole block: the held one is not the last any more.
        if let Some(held) = self.held.take() {
            out.extend_from_slice(&held);
        }
        let start = out.len();
        if !self.partial.is_empty() {
            let take = BLOCK_BYTES - self.partial.len();
            out.extend_from_slice(&self.partial);
            out.extend_from_slice(&cipher[..take]);
            cipher = &cipher[take..];
            self.partial.clear();
        }
        let whole = cipher.len() - cipher.len() % BLOCK_BYTES;
        out.extend_from_slice(&cipher[..whole]);
        self.partial.extend_from_slice(&cipher[whole..]);
        self.cbc.decrypt_blocks(blocks(&mut out[start..]));
        let mut last = [0u8; BLOCK_BYTES];
        last.copy_from_slice(&out[out.len() - BLOCK_BYTES..]);
        out.truncate(out.len() - BLOCK_BYTES);
        self.held = Some(last);
    }

    /// Checks the padding of the last block and appends what it holds of the plaintext.
    pub fn finish(self, out: &mut Vec<u8>) -> Result<(), CipherError> {
        if !self.partial.is_empty() {
            return Err(CipherError::NotBlocks(self.seen));
        }
        let Some(last) = self.held else { return Err(CipherError::NotBlocks(self.seen)) };
        let pad = last[BLOCK_BYTES - 1];
        if pad == 0
            || usize::from(pad) > BLOCK_BYTES
            || last[BLOCK_BYTES - usize::from(pad)..].iter().any(|&b| b != pad)
        {
            return Err(CipherError::Padding);
        }
        out.extend_from_slice(&last[..BLOCK_BYTES - usize::from(pad)]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// The fast vector of the reference (§9.2), computed with Python's hashlib,
    /// `cryptography` and PyCryptodome.
    fn fast_keybag(wpky: &str, class: u32) -> Keybag {
        Keybag {
            version: 5,
            kind: 1,
            uuid: [7; 16],
            salt: (0x14..0x28).collect(),
            iter: 1000,
            dpsl: Some((0..0x14).collect()),
            dpic: 1000,
            classes: vec![ClassEntry {
                class,
                wrap: 2,
                key_type: 0,
                wrapped: unhex(wpky).try_into().unwrap(),
                uuid: [8; 16],
            }],
        }
    }

    #[test]
    fn the_reference_vectors_derive_unwrap_and_encrypt() {
        let bag = fast_keybag("70f61d2dd67a295a3a57b3fec708fd1ea7b6fe9d165341b621673e1eab8d71c229441325ab1b686f", 3);
        let pk = bag.derive("password");
        assert_eq!(pk.0.to_vec(), unhex("528d96395325f0cd39d0c52ffd6227ddfda044d96bec3879c86abae7ae6b74de"));
        let keys = bag.unlock(&pk).unwrap();
        assert_eq!(keys.0[&3], [0x11u8; 32]);
        // The vector's file key 0x22×32, wrapped with class key 0x11×32 (class 3 here).
        let record = unhex("0300000087ca1088b05590d44c4f867da9ccf5f78ee09ffa6b0b193be942fcdeead5ec3558b9a2f43e1a683e");
        let fk = keys.unwrap(3, &record).unwrap();
        assert_eq!(fk.0, [0x22u8; 32]);
        assert_eq!(keys.wrap(3, &fk).unwrap().to_vec(), record, "re-wrapping gives the same record");
        assert_eq!(fk.encrypt(b"hello world"), unhex("6a4f595342c4a0a177ccf28a311a0ea8"));
        assert_eq!(
            fk.encrypt(&[0u8; 16]),
            unhex("3969e398998a5fe038e3a0eec3a53fe752ddb98f15b1f4215f2012cdd293c82f"),
            "an aligned plaintext gets a whole block of padding"
        );
        assert_eq!(fk.decrypt(&unhex("6a4f595342c4a0a177ccf28a311a0ea8")).unwrap(), b"hello world");
        assert_eq!(bag.open("Password"), Err(KeybagError::WrongPassword));
    }

    #[test]
    fn the_published_pyiosbackup_vector_unlocks_with_ios_counts() {
        // Password "0000", both salts 20 zero bytes, ITER 10,000, DPIC 10,000,000.
        let mut bag =
            fast_keybag("528c9c5171bf8bef1ea397cf29d2a838c90529df02a6ad2f823a1c6f3a5b2040e2a309c520c6a2ab", 2);
        bag.salt = vec![0; 20];
        bag.dpsl = Some(vec![0; 20]);
        bag.iter = IOS_ITER;
        bag.dpic = IOS_DPIC;
        let pk = bag.derive("0000");
        assert_eq!(pk.0.to_vec(), unhex("ec8edc160b5745ccae000bfb4787630f322821191fba7eea38feab2c6307cd9b"));
        let keys = bag.unlock(&pk).unwrap();
        let mkey = unhex("0200000097317494343807e690fd1e431413963dc0e3deb4907fb89fa36ce65126d0ea1301381fb3a2941e2f");
        assert_eq!(keys.unwrap(2, &mkey).unwrap().0, [0u8; 32]);
    }

    #[test]
    fn a_generated_keybag_round_trips_and_only_its_password_opens_it() {
        let mut n = 0u8;
        let mut random = |b: &mut [u8]| {
            for x in b {
                n = n.wrapping_add(37);
                *x = n;
            }
        };
        let (bag, keys) = Keybag::generate("correct horse", 10, 10, &mut random);
        let bytes = bag.to_bytes(&[9; 40]);
        let parsed = Keybag::parse(&bytes).unwrap();
        assert_eq!(parsed, bag);
        assert_eq!(parsed.open("correct horse").unwrap(), keys);
        assert_eq!(keys.classes().collect::<Vec<_>>(), vec![1, 2, 3, 4, 6, 7, 8]);
        assert_eq!(parsed.open("wrong"), Err(KeybagError::WrongPassword));
    }

    #[test]
    fn damaged_keybags_are_refused_with_a_reason() {
        let (bag, _) = Keybag::generate("p", 10, 10, &mut |b: &mut [u8]| b.fill(3));
        let bytes = bag.to_bytes(&[0; 40]);
        let err = |b: &[u8]| Keybag::parse(b).unwrap_err().to_string();
        assert_eq!(err(&bytes[..bytes.len() - 3]), "the backup keybag is damaged: WPKY claims 40 bytes, 37 are left");
        assert_eq!(err(&bytes[..5]), "the backup keybag is damaged: 5 stray bytes at the end");
        let mut huge = bag.clone();
        huge.dpic = MAX_DPIC + 1;
        assert_eq!(err(&huge.to_bytes(&[0; 40])), "the backup keybag is damaged: DPIC 20000001 is outside 1…20000000");
        assert_eq!(err(b""), "the backup keybag is damaged: no TYPE");
    }

    #[test]
    fn streaming_matches_whole_buffers_at_every_split() {
        let key = FileKey([5; 32]);
        for len in [0usize, 1, 15, 16, 17, 31, 32, 33, 100] {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let whole = key.encrypt(&plain);
            assert_eq!(whole.len() as u64, cipher_len(len as u64));
            for split in [1usize, 3, 16, 50] {
                let mut e = key.encryptor();
                let mut out = Vec::new();
                for piece in plain.chunks(split) {
                    e.update(piece, &mut out);
                }
                e.finish(&mut out);
                assert_eq!(out, whole, "len {len} split {split}");
            }
            for split in [1usize, 7, 16, 40] {
                let mut d = key.decryptor();
                let mut back = Vec::new();
                for piece in whole.chunks(split) {
                    d.update(piece, &mut back);
                }
                d.finish(&mut back).unwrap();
                assert_eq!(back, plain, "len {len} split {split}");
            }
        }
        // Wrong key: the padding check fails (or, rarely, passes with garbage: no MAC).
        assert_eq!(FileKey([6; 32]).decrypt(&key.encrypt(b"hello world")), Err(CipherError::Padding));
        assert_eq!(key.decrypt(&[0; 15]), Err(CipherError::NotBlocks(15)));
        assert_eq!(key.decryptor().finish(&mut Vec::new()), Err(CipherError::NotBlocks(0)));
    }
}
