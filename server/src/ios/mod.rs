//! Reading an iPhone backup's own files: where MobileBackup2 keeps a file
//! (`xx/<fileID>`), the well-known fileIDs, and Manifest.db with its MBFile records.
//! Used by the help-desk API (file listings) and restore tests.
//! Never here: SQL on the server's database, storage, or keys — only the bytes of a
//! backup's own files.

pub mod preview;
pub mod vcard;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// Well-known fileIDs (SHA-1 of `domain-relativePath`).
pub const SMS_DB: &str = "3d0d7e5fb2ce288813306e4d4636395e047a3d28";
pub const ADDRESS_BOOK_DB: &str = "31bb7ba8914766d4ba40d6dfb6113c8b614be442";
pub const PHOTOS_DB: &str = "12b144c0bd44f2b3dffd9186d3f9c05b917cee25";
pub const CALL_HISTORY_DB: &str = "5a4935c78a5255723f707230a451d79c540d2741";

/// Seconds between the Unix epoch and 2001-01-01T00:00:00Z, the epoch of Apple's dates.
pub const APPLE_EPOCH: i64 = 978_307_200;

/// A file's ID in a backup: SHA-1 of `domain-relativePath`, hex.
pub fn file_id(domain: &str, path: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, format!("{domain}-{path}").as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a backup directory keeps the file with this fileID.
pub fn backup_path(file_id: &str) -> String {
    format!("{}/{file_id}", file_id.get(..2).unwrap_or(""))
}

/// Where the server puts the SQLite databases it reads out of snapshots (SQLite opens
/// files, not bytes): `<data-dir>/scratch`, mode 0700, each copy a 0600 file removed when
/// its reader is done — on success, error or panic alike (a crash's leftovers are removed
/// when the directory is opened at the next start). The system temp directory would
/// leave employees' messages readable by whoever shares it, and on a crash, for good.
#[derive(Debug, Clone)]
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    /// Opens (creating) the directory and makes it private. What a crashed server or
    /// operator command left there is removed: `sqlite-*` copies, and the directories of
    /// commands whose process is gone; what cannot be removed is logged, not fatal.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(dir)?.flatten() {
            let (path, name) = (entry.path(), entry.file_name().to_string_lossy().into_owned());
            let removed = if name.starts_with("sqlite-") {
                std::fs::remove_file(&path)
            } else if let Some(pid) = name.rsplit_once('-').and_then(|(_, pid)| pid.parse::<u32>().ok())
                && path.is_dir()
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                std::fs::remove_dir_all(&path)
            } else {
                continue;
            };
            if let Err(e) = removed {
                tracing::warn!(path = %path.display(), error = %e, "a scratch file left by a crash stays");
            }
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// The scratch directory of a data directory.
    pub fn in_data_dir(data_dir: &Path) -> std::io::Result<Self> {
        Self::open(&data_dir.join("scratch"))
    }

    /// A scratch directory of its own for one operator command
    /// (`<data-dir>/scratch/<name>-<pid>`), beside a running server's, removed when the
    /// guard drops (or, after a crash, by the next start once the process is gone).
    pub fn for_command(data_dir: &Path, name: &str) -> std::io::Result<CommandScratch> {
        let root = data_dir.join("scratch");
        std::fs::create_dir_all(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
        Ok(CommandScratch(Self::open(&root.join(format!("{name}-{}", std::process::id())))?))
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Opens SQLite database bytes read-only through a private copy and runs `f`.
    pub fn with_sqlite<T>(
        &self,
        bytes: &[u8],
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Result<T, String> {
        // tempfile creates the file 0600 and removes it when `tmp` drops, unwinding included.
        let mut tmp = tempfile::Builder::new()
            .prefix("sqlite-")
            .permissions(std::fs::Permissions::from_mode(0o600))
            .tempfile_in(&self.dir)
            .map_err(|e| format!("creating a scratch file in {}: {e}", self.dir.display()))?;
        std::io::Write::write_all(&mut tmp, bytes).map_err(|e| e.to_string())?;
        let db = rusqlite::Connection::open_with_flags(tmp.path(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| e.to_string())?;
        let out = f(&db).map_err(|e| e.to_string());
        drop(db);
        out
    }
}

/// A command's own [`Scratch`], removed with it.
#[derive(Debug)]
pub struct CommandScratch(Scratch);

impl std::ops::Deref for CommandScratch {
    type Target = Scratch;
    fn deref(&self) -> &Scratch {
        &self.0
    }
}

impl Drop for CommandScratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0.dir);
    }
}

/// A regular file as Manifest.db lists it: fileID, domain, relativePath, MBFile `Size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedFile {
    pub file_id: String,
    pub domain: String,
    pub path: String,
    pub size: Option<u64>,
}

/// Regular files of Manifest.db (`flags = 1`) with the `Size` of each MBFile record (an
/// NSKeyedArchiver plist whose root object is the MBFile dictionary).
pub fn manifest_db_files(db: &rusqlite::Connection) -> rusqlite::Result<Vec<ListedFile>> {
    let mut stmt = db.prepare("SELECT fileID, domain, relativePath, file FROM Files WHERE flags = 1")?;
    let rows = stmt.query_map([], |r| {
        let blob: Option<Vec<u8>> = r.get(3)?;
        Ok(ListedFile {
            file_id: r.get(0)?,
            domain: r.get(1)?,
            path: r.get(2)?,
            size: blob.and_then(|b| lifeboat_shared::ios_backup::decode_mbfile(&b).ok()).map(|m| m.size),
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn well_known_file_ids_are_sha1_of_domain_and_path() {
        assert_eq!(super::file_id("HomeDomain", "Library/SMS/sms.db"), super::SMS_DB);
        assert_eq!(super::file_id("HomeDomain", "Library/AddressBook/AddressBook.sqlitedb"), super::ADDRESS_BOOK_DB);
        assert_eq!(super::file_id("HomeDomain", "Library/CallHistoryDB/CallHistory.storedata"), super::CALL_HISTORY_DB);
        assert_eq!(super::file_id("CameraRollDomain", "Media/PhotoData/Photos.sqlite"), super::PHOTOS_DB);
    }

    use super::Scratch;

    fn sqlite_bytes() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch("CREATE TABLE t (v INTEGER); INSERT INTO t VALUES (7);").unwrap();
        drop(db);
        std::fs::read(path).unwrap()
    }

    fn entries(s: &Scratch) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(s.path()).unwrap().map(|e| e.unwrap().path()).collect()
    }

    /// Regression (server layout issue): decrypted sms.db / Manifest.db copies went to the
    /// system temp directory. They now live in the data directory, private, and go away
    /// however the reader ends.
    #[test]
    fn sqlite_copies_are_private_files_in_the_data_dir_removed_however_reading_ends() {
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir(data.path().join("scratch")).unwrap();
        std::fs::write(data.path().join("scratch/sqlite-left-by-a-crash"), b"old").unwrap();
        // A command whose process is gone, and one still running (this one).
        std::fs::create_dir(data.path().join("scratch/verify-4294967295")).unwrap();
        let live = data.path().join(format!("scratch/verify-{}", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        let s = Scratch::in_data_dir(data.path()).unwrap();
        assert!(s.path().starts_with(data.path()));
        assert_eq!(std::fs::metadata(s.path()).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(entries(&s), vec![live.clone()], "a crash's leftovers are removed at open, a live command's kept");
        std::fs::remove_dir(&live).unwrap();
        let bytes = sqlite_bytes();

        let v = s
            .with_sqlite(&bytes, |db| {
                let files = entries(&s);
                assert_eq!(files.len(), 1);
                assert_eq!(std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777, 0o600);
                db.query_row("SELECT v FROM t", [], |r| r.get::<_, i64>(0))
            })
            .unwrap();
        assert_eq!(v, 7);
        assert!(entries(&s).is_empty(), "removed after success");

        let e = s.with_sqlite(&bytes, |db| db.query_row("SELECT nope FROM t", [], |r| r.get::<_, i64>(0)));
        assert!(e.unwrap_err().contains("no such column"));
        assert!(entries(&s).is_empty(), "removed after an error");

        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = s.with_sqlite(&bytes, |_| -> rusqlite::Result<()> { panic!("a reader that panics") });
        }));
        assert!(panicked.is_err());
        assert!(entries(&s).is_empty(), "removed after a panic");
    }
}
