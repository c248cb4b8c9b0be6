//! Reading an iPhone backup's own files: where MobileBackup2 keeps a file
//! (`xx/<fileID>`), the well-known fileIDs, and Manifest.db with its MBFile records.
//! Used by the help-desk API (file listings) and restore tests.

/// Well-known fileIDs (SHA-1 of `domain-relativePath`).
pub const SMS_DB: &str = "3d0d7e5fb2ce288813306e4d4636395e047a3d28";
pub const ADDRESS_BOOK_DB: &str = "31bb7ba8914766d4ba40d6dfb6113c8b614be442";
pub const PHOTOS_DB: &str = "12b144c0bd44f2b3dffd9186d3f9c05b917cee25";

/// Where a backup directory keeps the file with this fileID.
pub fn backup_path(file_id: &str) -> String {
    format!("{}/{file_id}", file_id.get(..2).unwrap_or(""))
}

/// Opens SQLite database bytes read-only (through a private temp file) and runs `f`.
pub fn with_sqlite<T>(bytes: &[u8], f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>) -> Result<T, String> {
    let tmp = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    std::fs::write(tmp.path(), bytes).map_err(|e| e.to_string())?;
    let db = rusqlite::Connection::open_with_flags(tmp.path(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| e.to_string())?;
    f(&db).map_err(|e| e.to_string())
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
            size: blob.and_then(|b| mbfile_size(&b)),
        })
    })?;
    rows.collect()
}

pub fn mbfile_size(blob: &[u8]) -> Option<u64> {
    let v = plist::Value::from_reader(std::io::Cursor::new(blob)).ok()?;
    let objects = v.as_dictionary()?.get("$objects")?.as_array()?;
    let root = match v.as_dictionary()?.get("$top")?.as_dictionary()?.get("root")? {
        plist::Value::Uid(u) => u.get() as usize,
        _ => 1,
    };
    objects.get(root)?.as_dictionary()?.get("Size")?.as_unsigned_integer()
}
