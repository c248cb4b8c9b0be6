//! The parts of an iPhone backup folder that both sides read without SQLite: an MBFile
//! record (the NSKeyedArchiver plist in each row of Manifest.db's `Files` table) and
//! what Manifest.plist says about encryption.
//!
//! The agent reads them to decrypt a backup as it stores it and to rebuild the phone's
//! bytes for a restore or an export; the server to check a snapshot; the virtual iPhone
//! to read a backup it is given. Facts: `../shared/reference/ios-encrypted-backups.md`
//! (mirrored in `docs/format.md`, "iOS-encrypted snapshots").

use std::io::Cursor;
use std::time::SystemTime;

use plist::Value;

use crate::ios_crypto::KEY_RECORD_BYTES;

/// A file's encryption in an encrypted backup: its protection class and its key record
/// (`u32 LE class || RFC 3394-wrapped key`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FileEncryption {
    pub class: u32,
    pub record: [u8; KEY_RECORD_BYTES],
}

impl std::fmt::Debug for FileEncryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A wrapped key opens nothing without the password, but it is no one's business in a log.
        f.debug_struct("FileEncryption").field("class", &self.class).finish_non_exhaustive()
    }
}

/// What an MBFile record says about its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MbFile {
    /// The plaintext size.
    pub size: u64,
    /// `LastModified`, seconds since the Unix epoch.
    pub mtime: i64,
    pub mode: u32,
    /// In an encrypted backup: how the file is encrypted.
    pub encryption: Option<FileEncryption>,
}

/// Decodes an NSKeyedArchiver MBFile record, following `$top.root` (normally
/// `$objects[1]`); `EncryptionKey` is a UID of an `NS.data` object.
pub fn decode_mbfile(blob: &[u8]) -> Result<MbFile, String> {
    let value = Value::from_reader(Cursor::new(blob)).map_err(|e| format!("MBFile is not a plist: {e}"))?;
    let archive = value.as_dictionary().ok_or("MBFile archive is not a dictionary")?;
    let objects = archive.get("$objects").and_then(Value::as_array).ok_or("MBFile archive has no $objects array")?;
    let root = match archive.get("$top").and_then(Value::as_dictionary).and_then(|t| t.get("root")) {
        Some(Value::Uid(uid)) => usize::try_from(uid.get()).map_err(|_| "$top.root out of range")?,
        _ => 1,
    };
    let mb = objects.get(root).and_then(Value::as_dictionary).ok_or("MBFile root object is not a dictionary")?;
    let field = |key: &str| -> Result<&Value, String> { mb.get(key).ok_or_else(|| format!("MBFile has no {key}")) };
    let size = field("Size")?.as_unsigned_integer().ok_or("MBFile Size is not a non-negative integer")?;
    let mtime = match field("LastModified")? {
        Value::Integer(i) => i.as_signed().ok_or("MBFile LastModified out of range")?,
        Value::Real(r) if r.is_finite() => *r as i64,
        Value::Date(d) => unix_seconds((*d).into()),
        _ => return Err("MBFile LastModified is not a number".into()),
    };
    let mode = field("Mode")?
        .as_unsigned_integer()
        .and_then(|m| u32::try_from(m).ok())
        .ok_or("MBFile Mode is not a 32-bit unsigned integer")?;
    let encryption = match mb.get("EncryptionKey") {
        None => None,
        Some(Value::Uid(uid)) => {
            let data = usize::try_from(uid.get())
                .ok()
                .and_then(|i| objects.get(i))
                .and_then(Value::as_dictionary)
                .and_then(|d| d.get("NS.data"))
                .and_then(Value::as_data)
                .ok_or("MBFile EncryptionKey does not point at an NS.data object")?;
            let record = data
                .try_into()
                .map_err(|_| format!("MBFile EncryptionKey is {} bytes, not {KEY_RECORD_BYTES}", data.len()))?;
            let class = mb
                .get("ProtectionClass")
                .and_then(Value::as_unsigned_integer)
                .and_then(|c| u32::try_from(c).ok())
                .ok_or("MBFile has an EncryptionKey but no ProtectionClass")?;
            Some(FileEncryption { class, record })
        }
        Some(_) => return Err("MBFile EncryptionKey is not a UID".into()),
    };
    Ok(MbFile { size, mtime, mode, encryption })
}

/// Seconds since the Unix epoch (negative before it).
fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map(|s| -s).unwrap_or(i64::MIN),
    }
}

/// What Manifest.plist says about a backup's encryption.
#[derive(Clone, PartialEq, Eq)]
pub enum PlistEncryption {
    None,
    /// `IsEncrypted`: the keybag (`BackupKeyBag`) and Manifest.db's key record (`ManifestKey`).
    Encrypted {
        keybag: Vec<u8>,
        manifest_key: FileEncryption,
    },
}

impl std::fmt::Debug for PlistEncryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "None",
            Self::Encrypted { .. } => "Encrypted",
        })
    }
}

/// Reads `IsEncrypted`, `BackupKeyBag` and `ManifestKey` from Manifest.plist (XML or binary).
pub fn plist_encryption(manifest_plist: &[u8]) -> Result<PlistEncryption, String> {
    let value =
        Value::from_reader(Cursor::new(manifest_plist)).map_err(|e| format!("Manifest.plist is not a plist: {e}"))?;
    let dict = value.as_dictionary().ok_or("Manifest.plist is not a dictionary")?;
    if !dict.get("IsEncrypted").and_then(Value::as_boolean).unwrap_or(false) {
        return Ok(PlistEncryption::None);
    }
    let keybag = dict
        .get("BackupKeyBag")
        .and_then(Value::as_data)
        .ok_or("Manifest.plist of an encrypted backup has no BackupKeyBag")?
        .to_vec();
    let key = dict
        .get("ManifestKey")
        .and_then(Value::as_data)
        .ok_or("Manifest.plist of an encrypted backup has no ManifestKey")?;
    let record: [u8; KEY_RECORD_BYTES] = key
        .try_into()
        .map_err(|_| format!("Manifest.plist ManifestKey is {} bytes, not {KEY_RECORD_BYTES}", key.len()))?;
    let class = u32::from_le_bytes([record[0], record[1], record[2], record[3]]);
    Ok(PlistEncryption::Encrypted { keybag, manifest_key: FileEncryption { class, record } })
}

/// Manifest.plist as an unencrypted backup's: `IsEncrypted` false, no keybag and no
/// `ManifestKey` (a decrypted export), written as a binary plist.
pub fn plist_without_encryption(manifest_plist: &[u8]) -> Result<Vec<u8>, String> {
    let value =
        Value::from_reader(Cursor::new(manifest_plist)).map_err(|e| format!("Manifest.plist is not a plist: {e}"))?;
    let Value::Dictionary(mut dict) = value else { return Err("Manifest.plist is not a dictionary".into()) };
    dict.insert("IsEncrypted".into(), Value::Boolean(false));
    dict.remove("BackupKeyBag");
    dict.remove("ManifestKey");
    let mut out = Vec::new();
    Value::Dictionary(dict).to_writer_binary(&mut out).map_err(|e| format!("Manifest.plist: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use plist::{Dictionary, Uid};

    use super::*;

    fn archive(mb: Dictionary, extra: Vec<Value>) -> Vec<u8> {
        let mut objects = vec![Value::String("$null".into()), Value::Dictionary(mb)];
        objects.extend(extra);
        let mut top = Dictionary::new();
        top.insert("root".into(), Value::Uid(Uid::new(1)));
        let mut a = Dictionary::new();
        a.insert("$archiver".into(), Value::String("NSKeyedArchiver".into()));
        a.insert("$objects".into(), Value::Array(objects));
        a.insert("$top".into(), Value::Dictionary(top));
        let mut out = Vec::new();
        Value::Dictionary(a).to_writer_binary(&mut out).unwrap();
        out
    }

    fn mb(size: u64) -> Dictionary {
        let mut mb = Dictionary::new();
        mb.insert("Size".into(), Value::Integer(size.into()));
        mb.insert("LastModified".into(), Value::Integer(1_700_000_000.into()));
        mb.insert("Mode".into(), Value::Integer(0o100644.into()));
        mb
    }

    #[test]
    fn an_encrypted_files_record_gives_its_class_and_key() {
        let mut m = mb(1234);
        m.insert("ProtectionClass".into(), Value::Integer(3.into()));
        m.insert("EncryptionKey".into(), Value::Uid(Uid::new(2)));
        let mut data = Dictionary::new();
        let record: Vec<u8> = [3u8, 0, 0, 0].into_iter().chain([7u8; 40]).collect();
        data.insert("NS.data".into(), Value::Data(record.clone()));
        let decoded = decode_mbfile(&archive(m, vec![Value::Dictionary(data)])).unwrap();
        assert_eq!(decoded.size, 1234);
        assert_eq!(decoded.mode, 0o100644);
        assert_eq!(decoded.mtime, 1_700_000_000);
        assert_eq!(decoded.encryption, Some(FileEncryption { class: 3, record: record.try_into().unwrap() }));
        assert_eq!(decode_mbfile(&archive(mb(5), vec![])).unwrap().encryption, None);
    }

    #[test]
    fn damaged_records_and_plists_are_clear_errors() {
        let mut m = mb(1);
        m.insert("EncryptionKey".into(), Value::Uid(Uid::new(2)));
        m.insert("ProtectionClass".into(), Value::Integer(3.into()));
        let mut data = Dictionary::new();
        data.insert("NS.data".into(), Value::Data(vec![1; 43]));
        assert_eq!(
            decode_mbfile(&archive(m.clone(), vec![Value::Dictionary(data)])),
            Err("MBFile EncryptionKey is 43 bytes, not 44".into())
        );
        assert_eq!(
            decode_mbfile(&archive(m, vec![])),
            Err("MBFile EncryptionKey does not point at an NS.data object".into())
        );
        assert!(decode_mbfile(b"junk").unwrap_err().starts_with("MBFile is not a plist"));
        let mut no_size = mb(1);
        no_size.remove("Size");
        assert_eq!(decode_mbfile(&archive(no_size, vec![])), Err("MBFile has no Size".into()));

        let mut plist = Dictionary::new();
        plist.insert("IsEncrypted".into(), Value::Boolean(true));
        let bytes = |d: &Dictionary| {
            let mut out = Vec::new();
            Value::Dictionary(d.clone()).to_writer_xml(&mut out).unwrap();
            out
        };
        assert_eq!(
            plist_encryption(&bytes(&plist)),
            Err("Manifest.plist of an encrypted backup has no BackupKeyBag".into())
        );
        plist.insert("BackupKeyBag".into(), Value::Data(vec![1, 2, 3]));
        plist.insert("ManifestKey".into(), Value::Data(vec![4; 44]));
        let Ok(PlistEncryption::Encrypted { keybag, manifest_key }) = plist_encryption(&bytes(&plist)) else {
            panic!("encrypted")
        };
        assert_eq!((keybag, manifest_key.class), (vec![1, 2, 3], 0x0404_0404));
        let plain = plist_without_encryption(&bytes(&plist)).unwrap();
        assert_eq!(plist_encryption(&plain), Ok(PlistEncryption::None));
        let back = Value::from_reader(Cursor::new(&plain)).unwrap();
        assert!(back.as_dictionary().unwrap().get("BackupKeyBag").is_none());
        plist.insert("IsEncrypted".into(), Value::Boolean(false));
        assert_eq!(plist_encryption(&bytes(&plist)), Ok(PlistEncryption::None));
    }
}
