//! Exports streamed as ZIP archives: chosen files of a snapshot under the names people
//! know them by (photos as they were taken), or the whole snapshot as a Finder backup
//! folder. Entries are stored (photos and backups do not compress), each file read a
//! group of chunks at a time and every chunk verified, so a 20 GB snapshot is never held
//! in memory or on disk: only the group being written. ZIP64 where a file or the
//! archive needs it.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;

use lifeboat_shared::ids::{ChunkId, SnapshotId, TenantId};
use lifeboat_shared::manifest::FileEntry;
use tokio::sync::mpsc;

use super::preview::{self, PreviewError};
use crate::app::App;
use crate::ios::{self, preview::Photo};
use crate::keys::TenantKeys;

/// Plaintext read per request to storage while a file is written.
const GROUP_BYTES: u64 = 32 << 20;
/// Bytes handed to the HTTP body at a time.
const OUT_BYTES: usize = 1 << 20;

/// One file of the archive.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its name in the archive (`/`-separated).
    pub name: String,
    pub file: FileEntry,
    /// Unix seconds, the entry's modification time.
    pub mtime: i64,
    /// Bytes written instead of the file's (a rewritten Manifest.plist).
    pub replace: Option<Vec<u8>>,
}

/// The archive's bytes as they are made, `OUT_BYTES` at a time; an error ends the stream
/// (the client sees a truncated download, never a well-formed wrong one).
pub type Stream = mpsc::Receiver<Result<Bytes, std::io::Error>>;

struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= OUT_BYTES {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(OUT_BYTES)));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| std::io::Error::other("the download was closed"))
    }
}

/// Unix seconds as a civil UTC time: year, month, day, hour, minute, second (Howard
/// Hinnant's days-from-civil, inverted).
pub fn civil(unix: i64) -> [i64; 6] {
    let days = unix.div_euclid(86_400);
    let rem = unix.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    [y, m, d, rem / 3600, rem % 3600 / 60, rem % 60]
}

/// A civil UTC time for a ZIP entry (1980 to 2107, else the nearest end).
fn zip_time(unix: i64) -> zip::DateTime {
    let [y, m, d, h, mi, sec] = civil(unix);
    let clamp = |v: i64, lo: i64, hi: i64| v.clamp(lo, hi) as u8;
    zip::DateTime::from_date_and_time(
        y.clamp(1980, 2107) as u16,
        clamp(m, 1, 12),
        clamp(d, 1, 31),
        clamp(h, 0, 23),
        clamp(mi, 0, 59),
        clamp(sec, 0, 59),
    )
    .unwrap_or_default()
}

/// A name from the phone made safe to extract: its last component, without control
/// characters or a leading dot, never empty.
fn plain_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let clean: String = base.chars().filter(|c| !c.is_control()).collect();
    let clean = clean.trim_start_matches('.').trim();
    if clean.is_empty() { "photo".to_owned() } else { clean.to_owned() }
}

/// `name` made safe, or `name (2).ext`, … when an earlier entry took it (case-insensitively,
/// as Finder and Windows compare), every name given out remembered.
fn unique(taken: &mut std::collections::HashSet<String>, name: &str) -> String {
    let name = plain_name(name);
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem.to_owned(), format!(".{ext}")),
        _ => (name.clone(), String::new()),
    };
    let mut candidate = name.clone();
    let mut n = 1;
    while !taken.insert(candidate.to_lowercase()) {
        n += 1;
        candidate = format!("{stem} ({n}){ext}");
    }
    candidate
}

/// The originals of `photos` in the snapshot, named (made unique) and dated as taken; a
/// photo whose file the snapshot lacks is left out.
pub async fn photo_entries(
    app: &App,
    tenant: TenantId,
    snapshot: SnapshotId,
    photos: &[&Photo],
) -> Result<Vec<Entry>, PreviewError> {
    let manifest = preview::manifest(app, tenant, snapshot).await?;
    let by_path: HashMap<&str, &FileEntry> = manifest.files.iter().map(|f| (f.path.as_str(), f)).collect();
    let mut taken = std::collections::HashSet::new();
    let mut entries = Vec::new();
    for p in photos {
        let stored = ios::backup_path(&ios::file_id(&p.domain, &p.path));
        let Some(f) = by_path.get(stored.as_str()) else { continue };
        entries.push(Entry {
            name: unique(&mut taken, &p.name),
            file: (*f).clone(),
            mtime: p.taken as i64,
            replace: None,
        });
    }
    Ok(entries)
}

/// The whole snapshot as a Finder backup folder `<UDID>/…` — the stored files in their
/// plaintext, with a Manifest.plist that says the backup is not encrypted when the phone
/// had encrypted it (what `lifeboat-agent export --decrypted` writes): plaintext under a
/// Manifest.plist that says encrypted opens nowhere.
pub async fn finder_backup(
    app: &App,
    tenant: TenantId,
    snapshot: SnapshotId,
    encrypted: bool,
) -> Result<Vec<Entry>, PreviewError> {
    let manifest = preview::manifest(app, tenant, snapshot).await?;
    let plist = if encrypted {
        let bytes = preview::file_of(app, tenant, &manifest, "Manifest.plist").await?;
        Some(lifeboat_shared::ios_backup::plist_without_encryption(&bytes).map_err(PreviewError::Read)?)
    } else {
        None
    };
    let udid = manifest.device.udid.as_str();
    Ok(manifest
        .files
        .iter()
        .map(|f| Entry {
            name: format!("{udid}/{}", f.path),
            mtime: f.mtime_unix_seconds,
            replace: (f.path == "Manifest.plist").then(|| plist.clone()).flatten(),
            file: f.clone(),
        })
        .collect())
}

/// Writes `entries` as a ZIP archive into the returned stream, on the blocking pool.
pub fn zip(app: Arc<App>, tenant: TenantId, entries: Vec<Entry>) -> Stream {
    let (tx, rx) = mpsc::channel(4);
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let err_tx = tx.clone();
        if let Err(e) =
            write_zip(&app, &handle, tenant, entries, ChannelWriter { tx, buf: Vec::with_capacity(OUT_BYTES) })
        {
            tracing::warn!(error = %e, "a ZIP export stopped");
            let _ = err_tx.blocking_send(Err(std::io::Error::other(e)));
        }
    });
    rx
}

/// Chunks fetched from storage at once for a run of small files.
const GROUP_CHUNKS: usize = 4096;

/// What the writer does with one fetched group of chunks.
enum Step {
    /// A new entry begins.
    Start(String, u64, i64),
    /// Bytes of their own (a rewritten Manifest.plist).
    Bytes(Vec<u8>),
    /// These chunks of the group, in order.
    Chunks(Vec<ChunkId>),
}

/// One fetch from storage — a run of small files, or a part of a large one — and the
/// writing it feeds.
struct Unit {
    ids: Vec<ChunkId>,
    what: String,
    steps: Vec<Step>,
}

/// Cuts the entries into fetches of about `GROUP_BYTES` (or `GROUP_CHUNKS` chunks): runs
/// of small files share one pass over the index and storage (a backup is tens of
/// thousands of them); a large file takes as many as it needs.
fn plan(entries: Vec<Entry>) -> Vec<Unit> {
    let mut units = Vec::new();
    let mut run = Unit { ids: Vec::new(), what: String::new(), steps: Vec::new() };
    let mut run_bytes = 0u64;
    let close = |run: &mut Unit, units: &mut Vec<Unit>| {
        if !run.steps.is_empty() {
            units.push(std::mem::replace(run, Unit { ids: Vec::new(), what: String::new(), steps: Vec::new() }));
        }
    };
    for e in entries {
        let size = e.replace.as_ref().map_or(e.file.size, |r| r.len() as u64);
        let start = Step::Start(e.name.clone(), size, e.mtime);
        if let Some(bytes) = e.replace {
            run.steps.extend([start, Step::Bytes(bytes)]);
            continue;
        }
        let ids: Vec<ChunkId> = e.file.chunks.iter().map(|c| c.id).collect();
        if e.file.size < GROUP_BYTES {
            if run.what.is_empty() {
                run.what.clone_from(&e.file.path);
            }
            run.ids.extend_from_slice(&ids);
            run.steps.extend([start, Step::Chunks(ids)]);
            run_bytes += e.file.size;
            if run_bytes >= GROUP_BYTES || run.ids.len() >= GROUP_CHUNKS {
                close(&mut run, &mut units);
                run_bytes = 0;
            }
            continue;
        }
        close(&mut run, &mut units);
        run_bytes = 0;
        let mut first = Some(start);
        let (mut group, mut group_bytes) = (Vec::new(), 0u64);
        for (i, c) in e.file.chunks.iter().enumerate() {
            group.push(c.id);
            group_bytes += u64::from(c.length);
            if group_bytes >= GROUP_BYTES || i + 1 == e.file.chunks.len() {
                let mut steps: Vec<Step> = first.take().into_iter().collect();
                steps.push(Step::Chunks(group.clone()));
                units.push(Unit { ids: std::mem::take(&mut group), what: e.file.path.clone(), steps });
                group_bytes = 0;
            }
        }
    }
    close(&mut run, &mut units);
    units
}

type Fetched = tokio::task::JoinHandle<Result<HashMap<ChunkId, Vec<u8>>, String>>;

/// Starts reading a unit's chunks (index, storage, verification) on the runtime.
fn fetch(app: &Arc<App>, keys: &Arc<TenantKeys>, handle: &tokio::runtime::Handle, u: &Unit) -> Fetched {
    let (app, keys, ids, what) = (app.clone(), keys.clone(), u.ids.clone(), u.what.clone());
    handle.spawn(async move {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        let client = app.db.get().await.map_err(|e| e.to_string())?;
        super::read::plain(&client, &app.storage, &keys, &ids).await.map_err(|e| format!("{what}: {e}"))
    })
}

fn write_zip(
    app: &Arc<App>,
    handle: &tokio::runtime::Handle,
    tenant: TenantId,
    entries: Vec<Entry>,
    out: ChannelWriter,
) -> Result<(), String> {
    let keys: Arc<TenantKeys> = handle.block_on(app.tenant_keys(tenant)).map_err(|e| e.to_string())?;
    let mut z = zip::ZipWriter::new_stream(out);
    // The next unit is read while this one is written: storage and decryption on one
    // core, the archive on the other.
    let mut units = plan(entries).into_iter();
    let mut ahead = units.next().map(|u| (fetch(app, &keys, handle, &u), u));
    while let Some((fetched, unit)) = ahead.take() {
        ahead = units.next().map(|u| (fetch(app, &keys, handle, &u), u));
        let plain = handle.block_on(fetched).map_err(|e| e.to_string())??;
        for step in unit.steps {
            match step {
                Step::Start(name, size, mtime) => {
                    let options = zip::write::SimpleFileOptions::default()
                        .compression_method(zip::CompressionMethod::Stored)
                        .last_modified_time(zip_time(mtime))
                        .large_file(size >= u64::from(u32::MAX));
                    z.start_file(name.as_str(), options).map_err(|err| format!("{name}: {err}"))?;
                }
                Step::Bytes(bytes) => z.write_all(&bytes).map_err(|err| err.to_string())?,
                Step::Chunks(ids) => {
                    for id in &ids {
                        let bytes = plain.get(id).ok_or_else(|| format!("{}: chunk {id} missing", unit.what))?;
                        z.write_all(bytes).map_err(|err| err.to_string())?;
                    }
                }
            }
        }
    }
    let mut out = z.finish().map_err(|e| e.to_string())?.into_inner();
    out.flush().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use lifeboat_shared::ids::ChunkId;
    use lifeboat_shared::manifest::{ChunkRef, FileEntry};

    use super::{Entry, GROUP_BYTES, Step, plan};

    #[test]
    fn names_in_an_archive_are_unique_and_stay_in_their_folder() {
        let mut taken = std::collections::HashSet::new();
        let mut unique = |n: &str| super::unique(&mut taken, n);
        assert_eq!(unique("IMG_0001.JPG"), "IMG_0001.JPG");
        assert_eq!(unique("img_0001.jpg"), "img_0001 (2).jpg");
        assert_eq!(unique("IMG_0001 (3).JPG"), "IMG_0001 (3).JPG");
        assert_eq!(unique("IMG_0001.JPG"), "IMG_0001 (4).JPG", "a name given out stays taken");
        assert_eq!(unique("README"), "README");
        assert_eq!(unique("../../etc/passwd"), "passwd");
        assert_eq!(unique("C:\\x\\..\\a\nb.jpg"), "ab.jpg");
        assert_eq!(unique(".."), "photo");
    }

    fn entry(name: &str, chunks: &[(u8, u32)]) -> Entry {
        let file = FileEntry {
            path: name.into(),
            size: chunks.iter().map(|(_, l)| u64::from(*l)).sum(),
            mode: 0o644,
            mtime_unix_seconds: 0,
            chunks: chunks.iter().map(|(b, l)| ChunkRef { id: ChunkId([*b; 32]), length: *l }).collect(),
            ios_key: None,
        };
        Entry { name: name.into(), file, mtime: 0, replace: None }
    }

    #[test]
    fn small_files_share_a_fetch_and_a_large_one_takes_several() {
        let big = (GROUP_BYTES / 2) as u32;
        let entries = vec![
            entry("a", &[(1, 10)]),
            Entry { replace: Some(b"plist".to_vec()), ..entry("Manifest.plist", &[(2, 5)]) },
            entry("b", &[(3, 10), (4, 10)]),
            entry("big", &[(5, big), (6, big), (7, big)]),
            entry("c", &[(8, 1)]),
        ];
        let units = plan(entries);
        let ids: Vec<Vec<u8>> = units.iter().map(|u| u.ids.iter().map(|i| i.0[0]).collect()).collect();
        assert_eq!(ids, [vec![1, 3, 4], vec![5, 6], vec![7], vec![8]]);
        let starts: Vec<Vec<&str>> = units
            .iter()
            .map(|u| {
                u.steps
                    .iter()
                    .filter_map(|s| if let Step::Start(n, ..) = s { Some(n.as_str()) } else { None })
                    .collect()
            })
            .collect();
        assert_eq!(starts, [vec!["a", "Manifest.plist", "b"], vec!["big"], vec![], vec!["c"]]);
    }
    #[test]
    fn zip_times_are_civil_utc() {
        let t = super::zip_time(1_735_689_600 + 59 * 86_400 + 3_722);
        assert_eq!(
            (t.year(), t.month(), t.day(), t.hour(), t.minute(), t.second()),
            (2025, 3, 1, 1, 2, 2),
            "DOS times count seconds in twos"
        );
        assert_eq!(super::zip_time(0).year(), 1980, "before ZIP's epoch: its first day");
    }
}
