//! Restore tests: rebuild a snapshot from storage exactly as a restore would — every
//! chunk fetched, decrypted, decompressed and re-hashed, every file reassembled to its
//! size — then check the iPhone backup itself: Manifest.db opens and every regular file it
//! lists is there with the size its record gives, Status.plist says finished, Info.plist
//! is present. It counts messages, contacts and photos to compare with the previous
//! snapshot, and records the result.
//!
//! A snapshot of a backup the phone encrypted is checked as fully, on its plaintext, and
//! then as a restore would need it: the escrowed password unlocks the keybag in its
//! Manifest.plist, and every file's key record (and Manifest.db's `ManifestKey`) unwraps
//! with its class key — what rebuilding the phone's exact bytes takes. Whether the
//! backup carries the keychain (`KeychainDomain/keychain-backup.plist`) is recorded.
//!
//! I/O is bounded: files are checked in batches of at most [`BATCH_BYTES`]; only the few
//! small files the checks read (Manifest.db, the plists, the counted databases) are kept.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use lifeboat_shared::Secret;
use lifeboat_shared::ids::{ChunkId, SnapshotId, TenantId};
use lifeboat_shared::ios_backup::{PlistEncryption, plist_encryption};
use lifeboat_shared::ios_crypto::{Keybag, KeybagError};
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
    /// The phone encrypted the backup.
    pub encrypted: bool,
    /// Manifest.db lists the keychain; `None` when Manifest.db could not be read.
    pub keychain: Option<bool>,
    pub seconds: f64,
}

/// For a snapshot of an encrypted backup: the password that opens it, or why there is none.
enum Password {
    NotEncrypted,
    Escrowed(Secret<String>),
    Missing(String),
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
    matches!(path, "Manifest.db" | "Manifest.plist" | "Status.plist" | "Info.plist")
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
    let encrypted = manifest.ios_encrypted();
    let password = if !encrypted {
        Password::NotEncrypted
    } else {
        // The server's own use, like an agent's: not a person's view, so not audited.
        let udid = manifest.device.udid.as_str();
        match crate::escrow::for_agent(client, keys, udid).await {
            Ok(Some(e)) => Password::Escrowed(e.password),
            Ok(None) => Password::Missing(format!(
                "the server knows no backup password for {udid}: this encrypted snapshot cannot be restored until an \
                 admin enters it"
            )),
            Err(crate::escrow::EscrowError::Db(e)) => return Err(e.into()),
            Err(e) => Password::Missing(format!("the backup password of {udid} cannot be opened: {e}")),
        }
    };

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
    // The keybag's key derivation is seconds of PBKDF2 at a phone's counts: blocking work.
    let checked = tokio::task::spawn_blocking(move || check_backup(&manifest, &kept, &scratch, &password))
        .await
        .map_err(|e| manifest_err(format!("checking the backup: {e}")))?;
    let Checked { problems: backup_problems, counts, keychain } = checked;
    problems.extend(backup_problems);
    Ok(Report {
        snapshot,
        passed: problems.is_empty(),
        files_checked,
        bytes_checked,
        problems,
        counts,
        encrypted,
        keychain,
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

/// What the backup checks found.
struct Checked {
    problems: Vec<String>,
    counts: Counts,
    keychain: Option<bool>,
}

/// The iPhone-backup checks on the reassembled special files.
fn check_backup(
    manifest: &Manifest,
    kept: &HashMap<String, Vec<u8>>,
    scratch: &Scratch,
    password: &Password,
) -> Checked {
    let mut problems = Vec::new();
    // `xx/<fileID>` → `domain/relativePath`, to name files as people know them.
    let mut names: HashMap<String, String> = HashMap::new();
    let mut keychain = None;
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
                keychain = Some(rows.iter().any(|r| r.domain == "KeychainDomain" && r.path == "keychain-backup.plist"));
                for ListedFile { file_id, domain, path, size } in rows {
                    let named = format!("{domain}/{path}");
                    names.insert(backup_path(&file_id), named.clone());
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
    match password {
        Password::NotEncrypted => {}
        Password::Missing(why) => problems.push(format!("Manifest.plist: {why}")),
        Password::Escrowed(password) => {
            check_keys(manifest, kept.get("Manifest.plist"), password, &names, &mut problems)
        }
    }
    Checked { problems, counts, keychain }
}

/// What a restore of an encrypted snapshot needs: the escrowed password unlocks the keybag,
/// and every key record unwraps with its class key (AES key wrap checks its integrity, so
/// a record that unwraps is the key the phone encrypted the file with).
fn check_keys(
    manifest: &Manifest,
    plist: Option<&Vec<u8>>,
    password: &Secret<String>,
    names: &HashMap<String, String>,
    problems: &mut Vec<String>,
) {
    let Some(plist) = plist else {
        problems.push("Manifest.plist: missing".into());
        return;
    };
    let (keybag, manifest_key) = match plist_encryption(plist) {
        Ok(PlistEncryption::Encrypted { keybag, manifest_key }) => (keybag, manifest_key),
        Ok(PlistEncryption::None) => {
            problems.push("Manifest.plist: says the backup is not encrypted, but its files have key records".into());
            return;
        }
        Err(e) => {
            problems.push(format!("Manifest.plist: {e}"));
            return;
        }
    };
    let classes = match Keybag::parse(&keybag).and_then(|bag| bag.open(password.expose())) {
        Ok(c) => c,
        Err(KeybagError::WrongPassword) => {
            problems.push(
                "Manifest.plist: the escrowed backup password does not unlock the backup keybag: a restore would \
                 fail; an admin enters the right one"
                    .into(),
            );
            return;
        }
        Err(e) => {
            problems.push(format!("Manifest.plist: BackupKeyBag: {e}"));
            return;
        }
    };
    for f in manifest.files.iter() {
        let Some(key) = &f.ios_key else { continue };
        if f.path == "Manifest.db" && key.record != manifest_key.record {
            problems.push("Manifest.db: its key record is not Manifest.plist's ManifestKey".into());
        }
        if let Err(e) = classes.unwrap(key.class, &key.record) {
            let named = names.get(&f.path).map_or_else(|| f.path.clone(), |n| format!("{n} ({})", f.path));
            problems.push(format!("{named}: {e}"));
        }
    }
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
            encrypted: report.encrypted,
            keychain: report.keychain,
        },
    )
    .await
}
