//! Restore tests: rebuild a snapshot from storage exactly as a restore would — every
//! chunk fetched, decrypted, decompressed and re-hashed, every file reassembled to its
//! size — then check the iPhone backup itself: Manifest.db opens and every regular file it
//! lists is there with the size its record gives, Status.plist says finished, Info.plist
//! is present. It counts messages, contacts and photos to compare with the previous
//! snapshot, and records the result.
//!
//! I/O is bounded: files are checked in batches of at most [`BATCH_BYTES`]; only the few
//! small files the checks read (Manifest.db, the plists, the counted databases) are kept.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use lifeboat_shared::ids::{ChunkId, SnapshotId, TenantId};
use lifeboat_shared::manifest::{FileEntry, Manifest};
use lifeboat_shared::restore::{self, RebuildError};
use lifeboat_shared::wire::MAX_IDS_PER_REQUEST;
use serde::Serialize;

use crate::ios::{ADDRESS_BOOK_DB, ListedFile, PHOTOS_DB, SMS_DB, Scratch, backup_path, manifest_db_files};
use crate::keys::TenantKeys;
use crate::objects::packs;
use crate::store::{self, chunks::IndexError};

/// Plaintext checked per batch.
pub use lifeboat_shared::restore::BATCH_BYTES;

/// What a backup holds; `None` where the database is absent or unreadable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub messages: Option<i64>,
    pub contacts: Option<i64>,
    pub photos: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub snapshot: SnapshotId,
    pub passed: bool,
    pub files_checked: u64,
    pub bytes_checked: u64,
    /// Each names the file and what is wrong with it.
    pub problems: Vec<String>,
    pub counts: Counts,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no snapshot {0}")]
    NotFound(SnapshotId),
    #[error("reading the manifest of snapshot {snapshot}: {cause}")]
    Manifest { snapshot: SnapshotId, cause: String },
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    #[error("verifying chunks: {0}")]
    Task(String),
}

/// Files whose bytes the checks read.
fn wanted(path: &str) -> bool {
    matches!(path, "Manifest.db" | "Status.plist" | "Info.plist")
        || [SMS_DB, ADDRESS_BOOK_DB, PHOTOS_DB].iter().any(|id| path == backup_path(id))
}

/// Rebuilds and checks one snapshot. `progress` is told the plaintext bytes checked.
pub async fn verify_snapshot(
    client: &tokio_postgres::Client,
    op: &opendal::Operator,
    keys: &Arc<TenantKeys>,
    scratch: &Scratch,
    snapshot: SnapshotId,
    mut progress: impl FnMut(u64),
) -> Result<Report, VerifyError> {
    let started = Instant::now();
    let key =
        store::snapshots::manifest_key(client, keys.tenant, snapshot).await?.ok_or(VerifyError::NotFound(snapshot))?;
    let manifest_err = |cause: String| VerifyError::Manifest { snapshot, cause };
    let manifest = crate::restore::read::manifest(op, keys, snapshot, &key).await.map_err(manifest_err)?;

    let mut problems = Vec::new();
    let mut kept: HashMap<String, Vec<u8>> = HashMap::new();
    let (mut files_checked, mut bytes_checked) = (0u64, 0u64);
    // The agent's restore plans, verifies and reassembles with the same code.
    for batch in restore::plan(&manifest.files, BATCH_BYTES, MAX_IDS_PER_REQUEST) {
        let files = &manifest.files[batch.files.clone()];
        let plain = fetch_batch(client, op, keys, files, batch, &mut problems).await?;
        let mut bytes = 0;
        for f in files {
            match restore::parts(f, &plain) {
                Ok(parts) if wanted(&f.path) => {
                    kept.insert(f.path.clone(), parts.concat());
                }
                Ok(_) => {}
                // Already reported against the file by `fetch_batch`.
                Err(RebuildError::Missing(_)) => {}
                Err(e) => problems.push(format!("{}: {e}", f.path)),
            }
            files_checked += 1;
            bytes_checked += f.size;
            bytes += f.size;
        }
        progress(bytes);
    }

    let scratch = scratch.clone();
    let counts = tokio::task::spawn_blocking(move || check_backup(&manifest, &kept, &scratch))
        .await
        .map_err(|e| manifest_err(format!("checking the backup: {e}")))?;
    let (backup_problems, counts) = counts;
    problems.extend(backup_problems);
    Ok(Report {
        snapshot,
        passed: problems.is_empty(),
        files_checked,
        bytes_checked,
        problems,
        counts,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Fetches and verifies the chunks of a batch of files. Chunks that cannot be read or
/// verified are left out, and each is reported against the files that need it.
async fn fetch_batch(
    client: &tokio_postgres::Client,
    op: &opendal::Operator,
    keys: &Arc<TenantKeys>,
    files: &[FileEntry],
    batch: restore::Batch,
    problems: &mut Vec<String>,
) -> Result<HashMap<ChunkId, Vec<u8>>, VerifyError> {
    let mut users: HashMap<ChunkId, Vec<&str>> = HashMap::new();
    for f in files {
        for c in &f.chunks {
            users.entry(c.id).or_default().push(&f.path);
        }
    }
    let mut report = |ids: &mut dyn Iterator<Item = ChunkId>, what: &str| {
        let mut named: HashSet<&str> = HashSet::new();
        for id in ids {
            for path in users.get(&id).into_iter().flatten() {
                if named.insert(path) {
                    problems.push(format!("{path}: chunk {id} {what}"));
                }
            }
        }
    };
    let mut located = Vec::new();
    for part in batch.chunks.chunks(MAX_IDS_PER_REQUEST) {
        match store::chunks::locate(client, keys.tenant, part).await {
            Ok(l) => located.extend(l),
            Err(IndexError::Missing { .. }) => {
                // Find which ones, one query per id is fine: this is the failure path.
                for id in part {
                    match store::chunks::locate(client, keys.tenant, std::slice::from_ref(id)).await {
                        Ok(l) => located.extend(l),
                        Err(_) => report(&mut std::iter::once(*id), "is not in the chunk index"),
                    }
                }
            }
            Err(IndexError::Db(e)) => return Err(e.into()),
            Err(e) => report(&mut part.iter().copied(), &format!("cannot be located: {e}")),
        }
    }
    located.sort_by_key(|l| (l.pack.0, l.offset));
    let mut blobs = Vec::with_capacity(located.len());
    for group in packs::read_groups(&located) {
        match packs::read_group(op, keys.tenant, group).await {
            Ok(b) => blobs.extend(b),
            Err(e) => report(&mut group.iter().map(|l| l.id), &format!("cannot be read: {e}")),
        }
    }
    // Opening and re-hashing a batch (up to 64 MiB) is tens of milliseconds of work: on the
    // blocking pool, as ingest does.
    let k = keys.clone();
    let opened = tokio::task::spawn_blocking(move || restore::open(&k.data, &k.id, &batch, blobs))
        .await
        .map_err(|e| VerifyError::Task(e.to_string()))?;
    for (id, e) in &opened.failed {
        report(&mut std::iter::once(*id), &format!("does not verify: {e}"));
    }
    Ok(opened.plain)
}

/// The iPhone-backup checks on the reassembled special files.
fn check_backup(manifest: &Manifest, kept: &HashMap<String, Vec<u8>>, scratch: &Scratch) -> (Vec<String>, Counts) {
    let mut problems = Vec::new();
    let sizes: HashMap<&str, u64> = manifest.files.iter().map(|f| (f.path.as_str(), f.size)).collect();
    match kept.get("Status.plist").map(|b| plist::Value::from_reader(std::io::Cursor::new(b))) {
        None => problems.push("Status.plist: missing".into()),
        Some(Err(e)) => problems.push(format!("Status.plist: does not parse: {e}")),
        Some(Ok(v)) => {
            let state = v.as_dictionary().and_then(|d| d.get("SnapshotState")).and_then(|s| s.as_string());
            if state != Some("finished") {
                problems.push(format!("Status.plist: SnapshotState is {state:?}, not \"finished\""));
            }
        }
    }
    match kept.get("Info.plist").map(|b| plist::Value::from_reader(std::io::Cursor::new(b))) {
        None => problems.push("Info.plist: missing".into()),
        Some(Err(e)) => problems.push(format!("Info.plist: does not parse: {e}")),
        Some(Ok(_)) => {}
    }
    match kept.get("Manifest.db") {
        None => problems.push("Manifest.db: missing".into()),
        Some(bytes) => match scratch.with_sqlite(bytes, manifest_db_files) {
            Err(e) => problems.push(format!("Manifest.db: does not open: {e}")),
            Ok(rows) => {
                if rows.is_empty() {
                    problems.push("Manifest.db: lists no files".into());
                }
                for ListedFile { file_id, domain, path, size } in rows {
                    let named = format!("{domain}/{path}");
                    match sizes.get(backup_path(&file_id).as_str()) {
                        None => problems.push(format!("{named}: listed in Manifest.db but not in the backup")),
                        Some(actual) if size.is_some_and(|s| s != *actual) => problems.push(format!(
                            "{named}: Manifest.db says {} bytes, the backup holds {actual}",
                            size.unwrap_or_default()
                        )),
                        Some(_) => {}
                    }
                }
            }
        },
    }
    let count = |id: &str, sql: &[&str]| -> Option<i64> {
        let bytes = kept.get(&backup_path(id))?;
        scratch
            .with_sqlite(bytes, |db| {
                sql.iter()
                    .find_map(|q| db.query_row(q, [], |r| r.get::<_, i64>(0)).ok())
                    .ok_or_else(|| rusqlite::Error::QueryReturnedNoRows)
            })
            .ok()
    };
    let counts = Counts {
        messages: count(SMS_DB, &["SELECT count(*) FROM message"]),
        contacts: count(ADDRESS_BOOK_DB, &["SELECT count(*) FROM ABPerson"]),
        photos: count(PHOTOS_DB, &["SELECT count(*) FROM ZASSET", "SELECT count(*) FROM ZGENERICASSET"]),
    };
    (problems, counts)
}

/// Records a report; returns the restore test's id.
pub async fn record(
    client: &tokio_postgres::Client,
    tenant: TenantId,
    report: &Report,
    started: std::time::SystemTime,
) -> Result<uuid::Uuid, tokio_postgres::Error> {
    store::restore_tests::record(
        client,
        tenant,
        &store::restore_tests::NewResult {
            snapshot: report.snapshot,
            started,
            passed: report.passed,
            files_checked: report.files_checked,
            bytes_checked: report.bytes_checked,
            problems: &report.problems,
            messages: report.counts.messages,
            contacts: report.counts.contacts,
            photos: report.counts.photos,
        },
    )
    .await
}
