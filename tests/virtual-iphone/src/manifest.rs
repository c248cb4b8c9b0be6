//! The backup metadata the device side of MobileBackup2 writes and reads: fileIDs,
//! Manifest.db with its MBFile records, Manifest.plist and Status.plist
//! (docs: the iPhone protocols reference, §3 "Backup format").
//!
//! Everything here turns values into bytes and bytes into values; the only I/O is a private
//! temporary file, because SQLite databases are built and read through the file system.
//! Input that comes back from a host (a previous backup's Manifest.db or Status.plist) is
//! untrusted: anything malformed is a [`ManifestError`], never a panic.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::time::SystemTime;

use plist::{Dictionary, Uid, Value};

/// `Files.flags` of a regular file (its bytes are in the backup as `xx/<fileID>`).
pub const FLAG_FILE: u32 = 1;
/// `Files.flags` of a directory (a Manifest.db row only).
pub const FLAG_DIR: u32 = 2;
/// `Files.flags` of a symbolic link (a Manifest.db row only).
pub const FLAG_SYMLINK: u32 = 4;
/// `Mode` of the directory rows that [`build_manifest_db`] adds.
pub const DIR_MODE: u32 = 0o40755;
/// `Version` of the Status.plist the device writes (incremental backups need ≥ 3.3).
pub const STATUS_VERSION: &str = "3.3";
/// `Version` of Manifest.plist.
pub const MANIFEST_VERSION: &str = "10.0";
/// `SystemDomainsVersion` of Manifest.plist.
pub const SYSTEM_DOMAINS_VERSION: &str = "24.0";

/// The `mobile` user and group that own every file of a real iPhone's data partition.
const MOBILE_UID: u64 = 501;
/// `ProtectionClass` of regular files (C: "complete until first user authentication").
const FILE_PROTECTION_CLASS: u64 = 3;
/// The SQLite file header.
const SQLITE_MAGIC: &[u8] = b"SQLite format 3\0";

/// The schema of Manifest.db as the device writes it.
const MANIFEST_DDL: &str = "\
    CREATE TABLE Files (fileID TEXT PRIMARY KEY, domain TEXT, relativePath TEXT, flags INTEGER, file BLOB);
    CREATE INDEX FilesDomainIdx ON Files(domain);
    CREATE INDEX FilesRelativePathIdx ON Files(relativePath);
    CREATE INDEX FilesFlagsIdx ON Files(flags);
    CREATE TABLE Properties (key TEXT PRIMARY KEY, value BLOB);";

/// Why backup metadata could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The bytes do not start with the SQLite header (an encrypted Manifest.db, or another file).
    #[error("Manifest.db is not an SQLite database (encrypted, truncated or another file)")]
    NotSqlite,
    /// SQLite refused the database or a query (for example no `Files` table).
    #[error("Manifest.db: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The private temporary file that SQLite works on.
    #[error("temporary file for Manifest.db: {0}")]
    Io(#[from] std::io::Error),
    /// A plist could not be parsed.
    #[error("plist: {0}")]
    Plist(#[from] plist::Error),
    /// A Manifest.db row whose values or MBFile record cannot be decoded.
    #[error("Manifest.db row {file_id}: {reason}")]
    BadRecord {
        /// The row's `fileID`.
        file_id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A plist parsed but lacks a key or has the wrong shape.
    #[error("{what}: {reason}")]
    BadPlist {
        /// Which plist ("Status.plist", "Manifest.plist").
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// The backup fileID of a file: lowercase hex SHA-1 of `"<domain>-<relativePath>"`.
pub fn file_id(domain: &str, path: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(domain.as_bytes());
    ctx.update(b"-");
    ctx.update(path.as_bytes());
    hex(ctx.finish().as_ref())
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// One row of Manifest.db as the device writes or reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestFile {
    /// SHA-1 of `domain-path` ([`file_id`]), 40 lowercase hex characters.
    pub file_id: String,
    /// The backup domain, e.g. `HomeDomain` or `AppDomain-com.example.app`.
    pub domain: String,
    /// relativePath inside the domain, without a leading `/`.
    pub path: String,
    /// [`FLAG_FILE`], [`FLAG_DIR`] or [`FLAG_SYMLINK`].
    pub flags: u32,
    /// MBFile `Size` in bytes (0 for directories).
    pub size: u64,
    /// MBFile `LastModified`, unix seconds.
    pub mtime: i64,
    /// MBFile `Mode`, e.g. `0o100644` or `0o40755`.
    pub mode: u32,
    /// In an encrypted backup: the file's `ProtectionClass` and `EncryptionKey` (the key
    /// record: u32 LE class, then the file key wrapped with that class's key).
    pub encryption: Option<Encrypted>,
}

/// The key of one file of an encrypted backup, as its MBFile record holds it.
pub use lifeboat_shared::ios_backup::FileEncryption as Encrypted;

impl ManifestFile {
    /// A regular-file row with its fileID computed from domain and path.
    pub fn file(domain: &str, path: &str, size: u64, mtime: i64, mode: u32) -> ManifestFile {
        ManifestFile {
            file_id: file_id(domain, path),
            domain: domain.to_owned(),
            path: path.to_owned(),
            flags: FLAG_FILE,
            size,
            mtime,
            mode,
            encryption: None,
        }
    }

    /// A directory row (flags 2, mode 0o40755, size 0).
    pub fn dir(domain: &str, path: &str, mtime: i64) -> ManifestFile {
        ManifestFile {
            file_id: file_id(domain, path),
            domain: domain.to_owned(),
            path: path.to_owned(),
            flags: FLAG_DIR,
            size: 0,
            mtime,
            mode: DIR_MODE,
            encryption: None,
        }
    }
}

/// Builds a Manifest.db (SQLite bytes) for `files` plus the directory rows implied by their
/// parents: every ancestor directory of a path inside its domain (not the empty root), with
/// flags 2, mode 0o40755, size 0 and the newest mtime below it. Rows given by the caller win
/// over implied ones. The `file` column is a binary NSKeyedArchiver plist whose `$objects[1]`
/// is the MBFile dictionary.
pub fn build_manifest_db(files: &[ManifestFile]) -> Result<Vec<u8>, ManifestError> {
    let mut rows: BTreeMap<(&str, &str), ManifestFile> = BTreeMap::new();
    for f in files {
        rows.insert((&f.domain, &f.path), f.clone());
    }
    let mut dirs: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for f in files {
        let mut p = f.path.as_str();
        while let Some(i) = p.rfind('/') {
            p = &p[..i];
            if p.is_empty() {
                break;
            }
            let mtime = dirs.entry((&f.domain, p)).or_insert(f.mtime);
            *mtime = (*mtime).max(f.mtime);
        }
    }
    for ((domain, path), mtime) in dirs {
        rows.entry((domain, path)).or_insert_with(|| ManifestFile::dir(domain, path, mtime));
    }

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("Manifest.db");
    let mut db = rusqlite::Connection::open(&path)?;
    db.execute_batch("PRAGMA journal_mode=DELETE; PRAGMA synchronous=OFF;")?;
    db.execute_batch(MANIFEST_DDL)?;
    let tx = db.transaction()?;
    {
        let mut insert =
            tx.prepare("INSERT INTO Files (fileID, domain, relativePath, flags, file) VALUES (?1, ?2, ?3, ?4, ?5)")?;
        for f in rows.values() {
            insert.execute(rusqlite::params![f.file_id, f.domain, f.path, f.flags, mbfile_blob(f)])?;
        }
    }
    tx.commit()?;
    db.close().map_err(|(_, e)| e)?;
    Ok(std::fs::read(&path)?)
}

/// The MBFile record of a row: a binary NSKeyedArchiver plist with the MBFile dictionary at
/// `$objects[1]` (`$top.root`), its RelativePath at `$objects[2]` and its class at
/// `$objects[3]`; in an encrypted backup the `EncryptionKey` data at `$objects[3]`, its
/// class (`NSMutableData`) at 4 and MBFile's at 5, as a phone writes them.
fn mbfile_blob(f: &ManifestFile) -> Vec<u8> {
    let is_dir = f.flags == FLAG_DIR;
    // A stable inode number per path: the first 32 bits of the fileID (SHA-1).
    let inode =
        ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, format!("{}-{}", f.domain, f.path).as_bytes())
            .as_ref()
            .iter()
            .take(4)
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    let mut mb = Dictionary::new();
    mb.insert("LastModified".into(), Value::Integer(f.mtime.into()));
    mb.insert("Flags".into(), Value::Integer(0u64.into()));
    mb.insert("GroupID".into(), Value::Integer(MOBILE_UID.into()));
    mb.insert("LastStatusChange".into(), Value::Integer(f.mtime.into()));
    mb.insert("Birth".into(), Value::Integer(f.mtime.into()));
    mb.insert("$class".into(), Value::Uid(Uid::new(if f.encryption.is_some() { 5 } else { 3 })));
    mb.insert("InodeNumber".into(), Value::Integer(inode.into()));
    mb.insert("Mode".into(), Value::Integer(f.mode.into()));
    let protection = match &f.encryption {
        Some(e) => u64::from(e.class),
        None if is_dir => 0,
        None => FILE_PROTECTION_CLASS,
    };
    mb.insert("ProtectionClass".into(), Value::Integer(protection.into()));
    if f.encryption.is_some() {
        mb.insert("EncryptionKey".into(), Value::Uid(Uid::new(3)));
    }
    mb.insert("RelativePath".into(), Value::Uid(Uid::new(2)));
    mb.insert("Size".into(), Value::Integer(f.size.into()));
    mb.insert("UserID".into(), Value::Integer(MOBILE_UID.into()));
    let mut class = Dictionary::new();
    class.insert("$classname".into(), Value::String("MBFile".into()));
    class.insert(
        "$classes".into(),
        Value::Array(vec![Value::String("MBFile".into()), Value::String("NSObject".into())]),
    );
    let mut top = Dictionary::new();
    top.insert("root".into(), Value::Uid(Uid::new(1)));
    let mut root = Dictionary::new();
    root.insert("$version".into(), Value::Integer(100_000u64.into()));
    let mut objects = vec![Value::String("$null".into()), Value::Dictionary(mb), Value::String(f.path.clone())];
    if let Some(e) = &f.encryption {
        let mut data = Dictionary::new();
        data.insert("NS.data".into(), Value::Data(e.record.to_vec()));
        data.insert("$class".into(), Value::Uid(Uid::new(4)));
        let mut data_class = Dictionary::new();
        data_class.insert("$classname".into(), Value::String("NSMutableData".into()));
        data_class.insert(
            "$classes".into(),
            Value::Array(["NSMutableData", "NSData", "NSObject"].map(|c| Value::String(c.into())).to_vec()),
        );
        objects.push(Value::Dictionary(data));
        objects.push(Value::Dictionary(data_class));
    }
    objects.push(Value::Dictionary(class));
    root.insert("$objects".into(), Value::Array(objects));
    root.insert("$archiver".into(), Value::String("NSKeyedArchiver".into()));
    root.insert("$top".into(), Value::Dictionary(top));
    binary_plist(&Value::Dictionary(root))
}

/// Serialises a plist value to binary plist bytes.
fn binary_plist(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Invariant: writing into a Vec cannot fail with I/O errors, and the values built in this
    // module are all representable in a binary plist.
    value.to_writer_binary(&mut out).expect("a binary plist can always be written into a Vec");
    out
}

/// Reads a Manifest.db (as a host sends back the previous backup's) into rows, ordered by
/// (domain, relativePath), decoding `Size`, `LastModified` and `Mode` from each MBFile record.
pub fn read_manifest_db(bytes: &[u8]) -> Result<Vec<ManifestFile>, ManifestError> {
    if !bytes.starts_with(SQLITE_MAGIC) {
        return Err(ManifestError::NotSqlite);
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("Manifest.db");
    std::fs::write(&path, bytes)?;
    // Read-write on our private copy, so a database left in WAL mode opens too.
    let db = rusqlite::Connection::open(&path)?;
    let mut stmt =
        db.prepare("SELECT fileID, domain, relativePath, flags, file FROM Files ORDER BY domain, relativePath")?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let file_id: String = row.get(0)?;
        let domain: String = row.get(1)?;
        let path: String = row.get(2)?;
        let flags: i64 = row.get(3)?;
        let blob: Option<Vec<u8>> = row.get(4)?;
        let bad = |reason: String| ManifestError::BadRecord { file_id: file_id.clone(), reason };
        if file_id.len() != 40 || !file_id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(bad("fileID is not 40 lowercase hex digits".into()));
        }
        let flags = u32::try_from(flags).map_err(|_| bad(format!("flags {flags} out of range")))?;
        let blob = blob.ok_or_else(|| bad("no MBFile record (file is NULL)".into()))?;
        let record = lifeboat_shared::ios_backup::decode_mbfile(&blob).map_err(bad)?;
        out.push(ManifestFile {
            file_id,
            domain,
            path,
            flags,
            size: record.size,
            mtime: record.mtime,
            mode: record.mode,
            encryption: record.encryption,
        });
    }
    Ok(out)
}

/// What Manifest.plist says about the device (its `Lockdown` dictionary).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFacts {
    /// UniqueDeviceID, e.g. `00008030-001A0C3A1E38802E`.
    pub udid: String,
    /// ProductType, e.g. `iPhone15,2`.
    pub product_type: String,
    /// ProductVersion, e.g. `17.5` (pyiosbackup needs > 10.2).
    pub product_version: String,
    /// BuildVersion, e.g. `21F79`.
    pub build_version: String,
    /// SerialNumber.
    pub serial_number: String,
    /// DeviceName, e.g. `Test iPhone`.
    pub device_name: String,
}

/// What Manifest.plist of an encrypted backup carries: the keybag of the password and
/// `ManifestKey` (Manifest.db's key record).
#[derive(Clone, Copy, Debug)]
pub struct PlistEncryption<'a> {
    pub keybag: &'a [u8],
    pub manifest_key: &'a [u8],
}

/// Manifest.plist (binary plist): IsEncrypted, Version, Date, SystemDomainsVersion,
/// WasPasscodeSet, BackupKeyBag, Lockdown and Applications, and for an encrypted backup
/// its keybag and `ManifestKey`.
pub fn manifest_plist(
    facts: &DeviceFacts,
    app_bundles: &[String],
    date: SystemTime,
    encryption: Option<PlistEncryption<'_>>,
) -> Vec<u8> {
    let s = |v: &str| Value::String(v.to_owned());
    let mut lockdown = Dictionary::new();
    lockdown.insert("ProductVersion".into(), s(&facts.product_version));
    lockdown.insert("ProductType".into(), s(&facts.product_type));
    lockdown.insert("BuildVersion".into(), s(&facts.build_version));
    lockdown.insert("UniqueDeviceID".into(), s(&facts.udid));
    lockdown.insert("SerialNumber".into(), s(&facts.serial_number));
    lockdown.insert("DeviceName".into(), s(&facts.device_name));
    let mut apps = Dictionary::new();
    for bundle in app_bundles {
        let h = ring::digest::digest(&ring::digest::SHA256, format!("{}/{bundle}", facts.udid).as_bytes());
        let h = h.as_ref();
        let container =
            uuid::Builder::from_random_bytes(array16(h)).into_uuid().hyphenated().to_string().to_uppercase();
        let name = bundle.rsplit('.').next().unwrap_or(bundle);
        let version = format!("{}.{}.{}", 1 + h[16] % 9, h[17] % 40, h[18] % 10);
        let mut app = Dictionary::new();
        app.insert("CFBundleIdentifier".into(), s(bundle));
        app.insert("CFBundleVersion".into(), Value::String(version));
        app.insert("ContainerContentClass".into(), s("Data/Application"));
        app.insert(
            "Path".into(),
            Value::String(format!("/private/var/containers/Bundle/Application/{container}/{name}.app")),
        );
        apps.insert(bundle.clone(), Value::Dictionary(app));
    }
    let mut root = Dictionary::new();
    match encryption {
        Some(e) => {
            root.insert("BackupKeyBag".into(), Value::Data(e.keybag.to_vec()));
            root.insert("ManifestKey".into(), Value::Data(e.manifest_key.to_vec()));
        }
        None => {
            root.insert("BackupKeyBag".into(), Value::Data(backup_keybag(&facts.udid)));
        }
    }
    root.insert("Lockdown".into(), Value::Dictionary(lockdown));
    root.insert("SystemDomainsVersion".into(), s(SYSTEM_DOMAINS_VERSION));
    root.insert("Version".into(), s(MANIFEST_VERSION));
    root.insert("Date".into(), Value::Date(date.into()));
    root.insert("IsEncrypted".into(), Value::Boolean(encryption.is_some()));
    root.insert("WasPasscodeSet".into(), Value::Boolean(true));
    root.insert("Applications".into(), Value::Dictionary(apps));
    binary_plist(&Value::Dictionary(root))
}

/// The first 16 bytes of a SHA-256 digest.
fn array16(h: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(h) {
        *o = *b;
    }
    out
}

/// A backup keybag in the TLV layout of §3.7 (global section, then one block of exactly
/// UUID, CLAS, WRAP, KTYP, WPKY per class), with bytes derived from the UDID. An unencrypted
/// backup carries one too; nothing unwraps it.
fn backup_keybag(udid: &str) -> Vec<u8> {
    let mut counter = 0u32;
    let mut random = |n: usize| -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            counter += 1;
            let d = ring::digest::digest(&ring::digest::SHA256, format!("keybag/{udid}/{counter}").as_bytes());
            out.extend_from_slice(d.as_ref());
        }
        out.truncate(n);
        out
    };
    let mut bag = Vec::new();
    let mut tlv = |tag: &[u8; 4], value: &[u8]| {
        bag.extend_from_slice(tag);
        bag.extend_from_slice(&u32::try_from(value.len()).unwrap_or(0).to_be_bytes());
        bag.extend_from_slice(value);
    };
    tlv(b"VERS", &4u32.to_be_bytes());
    tlv(b"TYPE", &1u32.to_be_bytes());
    tlv(b"UUID", &random(16));
    tlv(b"HMCK", &random(40));
    tlv(b"WRAP", &0u32.to_be_bytes());
    tlv(b"SALT", &random(20));
    tlv(b"ITER", &10_000u32.to_be_bytes());
    tlv(b"DPWT", &1u32.to_be_bytes());
    tlv(b"DPIC", &10_000_000u32.to_be_bytes());
    tlv(b"DPSL", &random(20));
    for class in 1u32..=11 {
        if class == 6 {
            continue;
        }
        tlv(b"UUID", &random(16));
        tlv(b"CLAS", &class.to_be_bytes());
        tlv(b"WRAP", &2u32.to_be_bytes());
        tlv(b"KTYP", &0u32.to_be_bytes());
        tlv(b"WPKY", &random(40));
    }
    bag
}

/// Parses a plist (binary or XML) whose top level must be a dictionary.
fn plist_dictionary(bytes: &[u8], what: &'static str) -> Result<Dictionary, ManifestError> {
    Value::from_reader(Cursor::new(bytes))?
        .into_dictionary()
        .ok_or_else(|| ManifestError::BadPlist { what, reason: "the top level is not a dictionary".into() })
}

/// Reads Manifest.plist (binary or XML) for restore pre-checks; see [`product_version`].
pub fn read_manifest_plist(bytes: &[u8]) -> Result<Dictionary, ManifestError> {
    let dict = plist_dictionary(bytes, "Manifest.plist")?;
    if let Some(lockdown) = dict.get("Lockdown")
        && lockdown.as_dictionary().is_none()
    {
        return Err(ManifestError::BadPlist { what: "Manifest.plist", reason: "Lockdown is not a dictionary".into() });
    }
    Ok(dict)
}

/// `Lockdown.ProductVersion` of a Manifest.plist read by [`read_manifest_plist`].
pub fn product_version(manifest: &Dictionary) -> Option<&str> {
    manifest.get("Lockdown")?.as_dictionary()?.get("ProductVersion")?.as_string()
}

/// Status.plist (binary): BackupState "new", Date, IsFullBackup, SnapshotState (uploading,
/// moving, removing or finished), UUID (upper case) and Version "3.3".
pub fn status_plist(snapshot_state: &str, is_full: bool, uuid: &str, date: SystemTime) -> Vec<u8> {
    let mut root = Dictionary::new();
    root.insert("BackupState".into(), Value::String("new".into()));
    root.insert("Date".into(), Value::Date(date.into()));
    root.insert("IsFullBackup".into(), Value::Boolean(is_full));
    root.insert("SnapshotState".into(), Value::String(snapshot_state.into()));
    root.insert("UUID".into(), Value::String(uuid.to_uppercase()));
    root.insert("Version".into(), Value::String(STATUS_VERSION.into()));
    binary_plist(&Value::Dictionary(root))
}

/// A Status.plist as read back from a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// `SnapshotState`: uploading, moving, removing or finished.
    pub snapshot_state: String,
    /// `Version`, e.g. "3.3".
    pub version: String,
    /// `BackupState`, "new" for a usable backup.
    pub backup_state: String,
    /// `IsFullBackup` (false when absent).
    pub is_full: bool,
    /// `UUID`, when present.
    pub uuid: Option<String>,
    /// `Date`, when present.
    pub date: Option<SystemTime>,
}

/// Reads a Status.plist (binary or XML). SnapshotState, Version and BackupState are required.
pub fn read_status_plist(bytes: &[u8]) -> Result<Status, ManifestError> {
    let dict = plist_dictionary(bytes, "Status.plist")?;
    let string = |key: &str| -> Result<String, ManifestError> {
        dict.get(key)
            .and_then(Value::as_string)
            .map(str::to_owned)
            .ok_or_else(|| ManifestError::BadPlist { what: "Status.plist", reason: format!("no {key} string") })
    };
    Ok(Status {
        snapshot_state: string("SnapshotState")?,
        version: string("Version")?,
        backup_state: string("BackupState")?,
        is_full: dict.get("IsFullBackup").and_then(Value::as_boolean).unwrap_or(false),
        uuid: dict.get("UUID").and_then(Value::as_string).map(str::to_owned),
        date: dict.get("Date").and_then(Value::as_date).map(SystemTime::from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_files() -> Vec<ManifestFile> {
        vec![
            ManifestFile::file("HomeDomain", "Library/SMS/sms.db", 4096, 1_750_000_000, 0o100644),
            ManifestFile::file("HomeDomain", "Library/SMS/Drafts/x.plist", 10, 1_750_000_500, 0o100644),
            ManifestFile::file(
                "CameraRollDomain",
                "Media/DCIM/100APPLE/IMG_0001.JPG",
                3_000_000,
                1_740_000_000,
                0o100644,
            ),
            ManifestFile::file("AppDomain-com.example.app", "top.txt", 0, 1_700_000_000, 0o100600),
        ]
    }

    #[test]
    fn well_known_file_ids() {
        assert_eq!(file_id("HomeDomain", "Library/SMS/sms.db"), "3d0d7e5fb2ce288813306e4d4636395e047a3d28");
        assert_eq!(
            file_id("CameraRollDomain", "Media/DCIM/100APPLE/IMG_0001.JPG"),
            "343e26971dfe9c395c425c0ccf799df63ae6261e"
        );
    }

    #[test]
    fn manifest_db_round_trips_with_directory_rows() {
        let files = sample_files();
        let bytes = build_manifest_db(&files).unwrap();
        let read = read_manifest_db(&bytes).unwrap();
        let mut expected = files.clone();
        expected.extend([
            ManifestFile::dir("HomeDomain", "Library", 1_750_000_500),
            ManifestFile::dir("HomeDomain", "Library/SMS", 1_750_000_500),
            ManifestFile::dir("HomeDomain", "Library/SMS/Drafts", 1_750_000_500),
            ManifestFile::dir("CameraRollDomain", "Media", 1_740_000_000),
            ManifestFile::dir("CameraRollDomain", "Media/DCIM", 1_740_000_000),
            ManifestFile::dir("CameraRollDomain", "Media/DCIM/100APPLE", 1_740_000_000),
        ]);
        expected.sort_by(|a, b| (&a.domain, &a.path).cmp(&(&b.domain, &b.path)));
        assert_eq!(read, expected);
        // Deterministic bytes.
        assert_eq!(build_manifest_db(&files).unwrap(), bytes);
    }

    #[test]
    fn manifest_db_schema_and_mbfile_layout() {
        let bytes = build_manifest_db(&sample_files()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        std::fs::write(&path, &bytes).unwrap();
        let db = rusqlite::Connection::open(&path).unwrap();
        let mut indexes: Vec<String> = db
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'Files' AND sql IS NOT NULL")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        indexes.sort();
        assert_eq!(indexes, ["FilesDomainIdx", "FilesFlagsIdx", "FilesRelativePathIdx"]);
        let n: i64 = db.query_row("SELECT count(*) FROM Properties", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0);
        let blob: Vec<u8> = db
            .query_row("SELECT file FROM Files WHERE fileID = '3d0d7e5fb2ce288813306e4d4636395e047a3d28'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert!(blob.starts_with(b"bplist00"));
        let v = Value::from_reader(Cursor::new(&blob)).unwrap();
        let d = v.as_dictionary().unwrap();
        assert_eq!(d.get("$archiver").and_then(Value::as_string), Some("NSKeyedArchiver"));
        assert_eq!(
            d.get("$top").and_then(Value::as_dictionary).and_then(|t| t.get("root")),
            Some(&Value::Uid(Uid::new(1)))
        );
        let objects = d.get("$objects").and_then(Value::as_array).unwrap();
        let mb = objects[1].as_dictionary().unwrap();
        assert_eq!(mb.get("Size").and_then(Value::as_unsigned_integer), Some(4096));
        assert_eq!(mb.get("Mode").and_then(Value::as_unsigned_integer), Some(0o100644));
        assert_eq!(mb.get("LastModified").and_then(Value::as_signed_integer), Some(1_750_000_000));
        for key in ["Birth", "LastStatusChange", "UserID", "GroupID", "ProtectionClass", "InodeNumber", "Flags"] {
            assert!(mb.contains_key(key), "{key}");
        }
        assert_eq!(mb.get("RelativePath"), Some(&Value::Uid(Uid::new(2))));
        assert_eq!(objects[2].as_string(), Some("Library/SMS/sms.db"));
        let class = objects[3].as_dictionary().unwrap();
        assert_eq!(class.get("$classname").and_then(Value::as_string), Some("MBFile"));
        // The server's reader: Size of `$objects[$top.root]` for flags = 1.
        let mut stmt = db.prepare("SELECT fileID, file FROM Files WHERE flags = 1").unwrap();
        let n = stmt.query_map([], |r| r.get::<_, Vec<u8>>(1)).unwrap().filter(|b| b.is_ok()).count();
        assert_eq!(n, 4);
    }

    #[test]
    fn read_manifest_db_rejects_garbage() {
        assert!(matches!(read_manifest_db(b""), Err(ManifestError::NotSqlite)));
        assert!(matches!(read_manifest_db(b"not a database at all"), Err(ManifestError::NotSqlite)));
        let mut fake = SQLITE_MAGIC.to_vec();
        fake.extend_from_slice(&[0xAB; 5000]);
        assert!(read_manifest_db(&fake).is_err());

        // A valid SQLite database without the Files table.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);").unwrap();
        drop(db);
        assert!(matches!(read_manifest_db(&std::fs::read(&path).unwrap()), Err(ManifestError::Sqlite(_))));

        // A Files row whose MBFile blob is not a plist, or lacks Size; or whose fileID is not
        // one (a host's manifest names blob paths with it).
        let good_id = file_id("HomeDomain", "x");
        let good_blob = mbfile_blob(&ManifestFile::file("HomeDomain", "x", 1, 0, 0o100644));
        let no_size = {
            let mut d = Dictionary::new();
            d.insert(
                "$objects".into(),
                Value::Array(vec![Value::String("$null".into()), Value::Dictionary(Dictionary::new())]),
            );
            binary_plist(&Value::Dictionary(d))
        };
        for (id, blob, why) in [
            (good_id.as_str(), b"garbage".to_vec(), "not a plist"),
            (good_id.as_str(), no_size, "no Size"),
            ("ab", good_blob.clone(), "40 lowercase hex"),
            ("../../../../etc/passwd/000000000000000000", good_blob, "40 lowercase hex"),
        ] {
            let path = dir.path().join("bad.db");
            let _ = std::fs::remove_file(&path);
            let db = rusqlite::Connection::open(&path).unwrap();
            db.execute_batch(MANIFEST_DDL).unwrap();
            db.execute("INSERT INTO Files VALUES (?1, 'HomeDomain', 'x', 1, ?2)", rusqlite::params![id, blob]).unwrap();
            drop(db);
            let err = read_manifest_db(&std::fs::read(&path).unwrap()).unwrap_err();
            assert!(matches!(err, ManifestError::BadRecord { .. }), "{err}");
            let text = err.to_string();
            assert!(text.contains(why), "{why}: {text}");
        }
    }

    #[test]
    fn status_plist_round_trips() {
        let date = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_760_000_000);
        let bytes = status_plist("finished", true, "1b4e28ba-2fa1-11d2-883f-0016d3cca427", date);
        assert!(bytes.starts_with(b"bplist00"));
        let s = read_status_plist(&bytes).unwrap();
        assert_eq!(
            s,
            Status {
                snapshot_state: "finished".into(),
                version: "3.3".into(),
                backup_state: "new".into(),
                is_full: true,
                uuid: Some("1B4E28BA-2FA1-11D2-883F-0016D3CCA427".into()),
                date: Some(date),
            }
        );
        // The XML one the e2e harness writes.
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\"><dict>\
            <key>BackupState</key><string>new</string><key>IsFullBackup</key><true/>\
            <key>SnapshotState</key><string>uploading</string><key>Version</key><string>3.3</string></dict></plist>\n";
        let s = read_status_plist(xml.as_bytes()).unwrap();
        assert_eq!(s.snapshot_state, "uploading");
        assert!(s.date.is_none());
        assert!(read_status_plist(b"garbage").is_err());
        let no_state = status_plist("x", false, "u", date);
        let mut d = plist_dictionary(&no_state, "t").unwrap();
        d.remove("SnapshotState");
        assert!(matches!(read_status_plist(&binary_plist(&Value::Dictionary(d))), Err(ManifestError::BadPlist { .. })));
    }

    #[test]
    fn manifest_plist_round_trips() {
        let facts = DeviceFacts {
            udid: "00008030-001A0C3A1E38802E".into(),
            product_type: "iPhone15,2".into(),
            product_version: "17.5".into(),
            build_version: "21F79".into(),
            serial_number: "F2LXK0XXHG7F".into(),
            device_name: "Test iPhone".into(),
        };
        let apps = vec!["net.whatsapp.WhatsApp".to_string(), "com.spotify.client".to_string()];
        let date = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_760_000_000);
        let bytes = manifest_plist(&facts, &apps, date, None);
        assert!(bytes.starts_with(b"bplist00"));
        let d = read_manifest_plist(&bytes).unwrap();
        assert_eq!(product_version(&d), Some("17.5"));
        assert_eq!(d.get("IsEncrypted").and_then(Value::as_boolean), Some(false));
        assert_eq!(d.get("Version").and_then(Value::as_string), Some("10.0"));
        assert_eq!(d.get("SystemDomainsVersion").and_then(Value::as_string), Some("24.0"));
        assert_eq!(d.get("Date").and_then(Value::as_date).map(SystemTime::from), Some(date));
        assert!(d.get("BackupKeyBag").and_then(Value::as_data).is_some_and(|b| b.starts_with(b"VERS")));
        let lockdown = d.get("Lockdown").and_then(Value::as_dictionary).unwrap();
        assert_eq!(lockdown.get("UniqueDeviceID").and_then(Value::as_string), Some(facts.udid.as_str()));
        assert_eq!(lockdown.get("DeviceName").and_then(Value::as_string), Some("Test iPhone"));
        let a = d.get("Applications").and_then(Value::as_dictionary).unwrap();
        assert_eq!(a.len(), 2);
        let w = a.get("net.whatsapp.WhatsApp").and_then(Value::as_dictionary).unwrap();
        assert_eq!(w.get("ContainerContentClass").and_then(Value::as_string), Some("Data/Application"));
        assert_eq!(w.get("CFBundleIdentifier").and_then(Value::as_string), Some("net.whatsapp.WhatsApp"));
        assert!(w.get("Path").and_then(Value::as_string).is_some_and(|p| p.ends_with("/WhatsApp.app")));
        assert_eq!(manifest_plist(&facts, &apps, date, None), bytes);
        assert!(read_manifest_plist(b"\x00\x01").is_err());
    }
}
