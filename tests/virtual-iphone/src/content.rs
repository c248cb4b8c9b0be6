//! What a virtual iPhone holds: a catalog of files in the domains and paths of a real phone,
//! generated deterministically from a seed, whose bytes are produced when they are read.
//!
//! A device's content is a [`Content`]: a map from [`FileKey`] (domain, relativePath) to a
//! [`FileEntry`] (size, mtime, mode and a [`Body`], the recipe of its bytes). Photos and
//! videos are real JPEG/HEIC/MOV headers followed by bytes streamed from a BLAKE3 XOF, so a
//! 100 GB device never exists in memory or on disk. SQLite databases, plists and text are
//! rebuilt from their recipe when read (and once when created, to know their exact size).
//! Only restored files are stored, by SHA-256, in a blob directory ([`Body::Stored`]).
//!
//! Invariants: a file's bytes are a pure function of its [`Body`], its size and the rest of
//! the catalog (`Photos.sqlite` lists the DCIM files, `sms.db` the SMS attachments; both are
//! rebuilt whenever those change), so [`Content::open`] always yields `size` bytes; and every
//! change made by [`Content::simulate_use`] gives the file a strictly later mtime.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, Cursor, Read, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use plist::{Dictionary, Value};
use serde::{Deserialize, Serialize};

use crate::manifest::{ManifestFile, hex};

/// Seconds between the Unix epoch and Apple's reference date (2001-01-01T00:00:00Z), the
/// epoch of Core Data timestamps and of `sms.db` dates.
pub const APPLE_EPOCH: i64 = 978_307_200;
/// Generated content spans 2025: 2025-01-01T00:00:00Z …
const YEAR_START: i64 = 1_735_689_600;
/// … to 2026-01-01T00:00:00Z, the device's clock when generated.
const YEAR_END: i64 = 1_767_225_600;
const DAY: i64 = 86_400;
/// Mode of every generated file.
const FILE_MODE: u32 = 0o100644;
/// Largest generated text file.
const MAX_TEXT_BYTES: u64 = 2 << 20;
/// Read size when streaming and hashing.
const CHUNK: usize = 256 << 10;

const DCIM_PREFIX: &str = "Media/DCIM/";
const ATTACHMENTS_PREFIX: &str = "Library/SMS/Attachments/";
const CAMERA_ROLL: &str = "CameraRollDomain";
const HOME: &str = "HomeDomain";
const MEDIA: &str = "MediaDomain";

/// Why content could not be generated, changed, loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// Reading or writing the content file, a blob or a temporary database.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The content file is not the JSON this module writes.
    #[error("content file: {0}")]
    Json(#[from] serde_json::Error),
    /// Building a synthetic SQLite database.
    #[error("building an SQLite database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Writing a synthetic plist.
    #[error("building a plist: {0}")]
    Plist(#[from] plist::Error),
    /// A loaded content file breaks an invariant (e.g. a stored body that is not a SHA-256).
    #[error("invalid content: {0}")]
    Invalid(String),
}

// ---------------------------------------------------------------------------------------
// Profiles

/// How much a generated device holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Profile {
    /// A few MB and a few hundred files, for unit tests.
    Tiny,
    /// About 200 MB and 5,000 files.
    Small,
    /// About 2 GB and 50,000 files.
    Medium,
    /// About `bytes` bytes, with one file per 40 kB.
    Large {
        /// Target total size in bytes (at least 1 MB).
        bytes: u64,
    },
}

/// A profile name that [`Profile::from_str`] does not accept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// Not `tiny`, `small`, `medium` or `large:<size>`.
    #[error("unknown profile {0:?}: expected tiny, small, medium or large:<size> (e.g. large:5G)")]
    Unknown(String),
    /// The size of `large:<size>` is not a number with a known unit.
    #[error(
        "bad size {0:?} in large:<size>: expected a number with an optional unit, K M G T \
         (powers of 1000) or KiB MiB GiB TiB (powers of 1024), e.g. 5G, 500M, 2GiB or 123456"
    )]
    BadSize(String),
    /// `large:<size>` below 1 MB.
    #[error("large:{0} is too small: a large profile holds at least 1M (1000000 bytes)")]
    TooSmall(String),
}

/// Size units, largest first (the order [`fmt::Display`] prefers them in).
const UNITS: &[(&str, u64)] = &[
    ("TiB", 1 << 40),
    ("T", 1_000_000_000_000),
    ("GiB", 1 << 30),
    ("G", 1_000_000_000),
    ("MiB", 1 << 20),
    ("M", 1_000_000),
    ("KiB", 1 << 10),
    ("K", 1_000),
];

/// Parses a byte size: digits with an optional fraction and an optional unit (K/KB, M/MB,
/// G/GB, T/TB in powers of 1000; KiB, MiB, GiB, TiB in powers of 1024; case-insensitive).
pub fn parse_size(text: &str) -> Result<u64, ProfileError> {
    let bad = || ProfileError::BadSize(text.to_owned());
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let multiplier = if unit.is_empty() || unit == "b" {
        1
    } else {
        let unit = unit.strip_suffix('b').filter(|u| !u.is_empty() && !u.ends_with('i')).unwrap_or(&unit);
        UNITS.iter().find(|(name, _)| name.to_ascii_lowercase() == unit).map(|(_, m)| *m).ok_or_else(bad)?
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(bad());
    }
    let digits = |d: &str| -> Result<u128, ProfileError> {
        if d.is_empty() { Ok(0) } else { d.parse::<u128>().map_err(|_| bad()) }
    };
    let mut bytes = digits(whole)?.checked_mul(u128::from(multiplier)).ok_or_else(bad)?;
    if !fraction.is_empty() {
        let scale = 10u128.checked_pow(u32::try_from(fraction.len()).map_err(|_| bad())?).ok_or_else(bad)?;
        bytes += digits(fraction)?.checked_mul(u128::from(multiplier)).ok_or_else(bad)? / scale;
    }
    u64::try_from(bytes).map_err(|_| bad())
}

/// Formats a byte size in the largest unit that divides it exactly (parses back with
/// [`parse_size`] to the same value).
pub fn format_size(bytes: u64) -> String {
    match UNITS.iter().find(|(_, m)| bytes >= *m && bytes.is_multiple_of(*m)) {
        Some((name, m)) => format!("{}{name}", bytes / m),
        None => bytes.to_string(),
    }
}

impl FromStr for Profile {
    type Err = ProfileError;

    fn from_str(s: &str) -> Result<Profile, ProfileError> {
        let s = s.trim();
        match s.to_ascii_lowercase().as_str() {
            "tiny" => Ok(Profile::Tiny),
            "small" => Ok(Profile::Small),
            "medium" => Ok(Profile::Medium),
            lower => match lower.strip_prefix("large:") {
                Some(_) => {
                    let size = &s["large:".len()..];
                    let bytes = parse_size(size)?;
                    if bytes < 1_000_000 {
                        return Err(ProfileError::TooSmall(size.to_owned()));
                    }
                    Ok(Profile::Large { bytes })
                }
                None => Err(ProfileError::Unknown(s.to_owned())),
            },
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Profile::Tiny => f.write_str("tiny"),
            Profile::Small => f.write_str("small"),
            Profile::Medium => f.write_str("medium"),
            Profile::Large { bytes } => write!(f, "large:{}", format_size(*bytes)),
        }
    }
}

impl From<Profile> for String {
    fn from(p: Profile) -> String {
        p.to_string()
    }
}

impl TryFrom<String> for Profile {
    type Error = ProfileError;

    fn try_from(s: String) -> Result<Profile, ProfileError> {
        s.parse()
    }
}

impl Profile {
    /// The total size the profile aims at.
    pub fn target_bytes(self) -> u64 {
        Scale::of(self).bytes
    }

    /// The number of files the profile aims at.
    pub fn target_files(self) -> u64 {
        Scale::of(self).files
    }
}

/// The sizes and counts a profile generates.
#[derive(Clone, Copy, Debug)]
struct Scale {
    bytes: u64,
    files: u64,
    /// A typical photo's size; the other media sizes follow from it.
    photo: u64,
}

impl Scale {
    fn of(profile: Profile) -> Scale {
        let (bytes, files) = match profile {
            Profile::Tiny => (4_000_000, 300),
            Profile::Small => (200_000_000, 5_000),
            Profile::Medium => (2_000_000_000, 50_000),
            Profile::Large { bytes } => (bytes, (bytes / 40_000).max(300)),
        };
        Scale { bytes, files, photo: (bytes / 80).clamp(100_000, 2_500_000) }
    }

    fn photo_sizes(self) -> (u64, u64) {
        (self.photo * 2 / 5, self.photo * 8 / 5)
    }

    fn video_sizes(self) -> (u64, u64) {
        (self.photo * 4, self.photo * 24)
    }

    fn attachment_sizes(self) -> (u64, u64) {
        (self.photo / 10, self.photo * 4 / 5)
    }

    fn thumbnail_sizes(self) -> (u64, u64) {
        ((self.photo / 100).max(2_000), (self.photo / 40).max(4_000))
    }

    /// One per `per` files, within [lo, hi].
    fn count(self, per: u64, lo: u32, hi: u32) -> u32 {
        u32::try_from(self.files / per).unwrap_or(u32::MAX).clamp(lo, hi)
    }
}

// ---------------------------------------------------------------------------------------
// The catalog

/// Where a file lives in a backup: its domain and its path inside the domain.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FileKey {
    /// Backup domain, e.g. `HomeDomain`, `CameraRollDomain`, `AppDomain-<bundle>`.
    pub domain: String,
    /// relativePath inside the domain, without a leading `/`.
    pub path: String,
}

impl FileKey {
    /// A key from a domain and a relative path.
    pub fn new(domain: impl Into<String>, path: impl Into<String>) -> FileKey {
        FileKey { domain: domain.into(), path: path.into() }
    }
}

impl fmt::Display for FileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)
    }
}

/// A file of the catalog: its metadata and the recipe of its bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Exact size in bytes.
    pub size: u64,
    /// Last modification, unix seconds.
    pub mtime: i64,
    /// Mode, e.g. `0o100644`.
    pub mode: u32,
    /// How its bytes are produced.
    pub body: Body,
}

impl FileEntry {
    /// A restored file whose bytes are in `<blobs>/<sha256>`.
    pub fn stored(size: u64, mtime: i64, mode: u32, sha256: impl Into<String>) -> FileEntry {
        FileEntry { size, mtime, mode, body: Body::Stored { sha256: sha256.into() } }
    }
}

/// The recipe of a file's bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Body {
    /// A media header (JPEG, HEIC, MOV or none) and incompressible bytes from a BLAKE3 XOF
    /// keyed by `seed`, to the file's size.
    Media {
        /// Which header.
        format: MediaFormat,
        /// Seed of the bytes (derived from the device seed, the file's key and its revision).
        seed: u64,
    },
    /// Compressible text to the file's size.
    Text {
        /// What the text looks like.
        kind: TextKind,
        /// Seed of the text.
        seed: u64,
    },
    /// A plist with `entries` entries (its size is whatever that serialises to).
    Plist {
        /// What the plist holds.
        kind: PlistKind,
        /// Seed of the values.
        seed: u64,
        /// Number of top-level entries (items for a keychain).
        entries: u32,
        /// XML instead of binary.
        xml: bool,
    },
    /// An SQLite database. System databases derive their rows from the device seed and the
    /// row number (they only grow), `Photos` lists the DCIM files of the catalog and `Sms`
    /// links the SMS attachments of the catalog; `App` databases derive rows from `seed`.
    Sqlite {
        /// Which schema.
        db: DbKind,
        /// `App`: seed of the rows. System databases: the use (revision) that last rebuilt
        /// them, for the record; their bytes do not depend on it.
        seed: u64,
        /// Number of rows: messages, contacts, images, calls, visits, assets or items.
        rows: u32,
    },
    /// A restored file, stored in the blob directory under its SHA-256 (lowercase hex).
    Stored {
        /// SHA-256 of the bytes, lowercase hex.
        sha256: String,
    },
}

/// The header of a [`Body::Media`] file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MediaFormat {
    /// `FF D8 FF E1` and an Exif APP1 segment, then a complete small baseline picture
    /// (160×120, one of [`PICTURES`] by seed) ending in `FF D9`; then the body's bytes and
    /// a final `FF D9`. Decoders stop at the first EOI, as they do for a real photo's
    /// trailing data, so every JPEG decodes.
    Jpeg,
    /// An ISO-BMFF `ftyp` box of brand `heic`, a `meta` box and an `mdat` box.
    Heic,
    /// QuickTime: `ftyp` of brand `qt  `, `wide`, `mdat`, and a `moov` box at the end.
    Mov,
    /// No header: an opaque binary file.
    Bin,
}

/// What a [`Body::Text`] file looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TextKind {
    /// A pretty-printed JSON array of objects.
    Json,
    /// Timestamped log lines.
    Log,
    /// Sentences.
    Prose,
}

/// What a [`Body::Plist`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlistKind {
    /// Preferences: settings of all plist types.
    Prefs,
    /// A keychain backup: `genp`, `inet`, `keys` and `cert` items with data blobs.
    Keychain,
}

/// Where Health keeps its samples (only encrypted backups carry it).
pub const HEALTH_DB: (&str, &str) = ("HealthDomain", "Health/healthdb_secure.sqlite");

/// What only an encrypted backup carries (Apple: saved passwords, Health, call history):
/// the keychain, the Health store and the call history.
pub fn only_in_encrypted_backups(key: &FileKey) -> bool {
    key.domain == "KeychainDomain"
        || key.domain == HEALTH_DB.0
        || (key.domain == HOME && key.path.starts_with("Library/CallHistoryDB/"))
}

/// The schema of a [`Body::Sqlite`] file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DbKind {
    /// HomeDomain Library/SMS/sms.db: `message`, `handle`, `chat`, `attachment` and joins.
    Sms,
    /// HomeDomain Library/AddressBook/AddressBook.sqlitedb: `ABPerson`, `ABMultiValue`.
    AddressBook,
    /// HomeDomain Library/AddressBook/AddressBookImages.sqlitedb: `ABThumbnailImage`, `ABFullSizeImage`.
    AddressBookImages,
    /// HomeDomain Library/CallHistoryDB/CallHistory.storedata: `ZCALLRECORD`.
    CallHistory,
    /// CameraRollDomain Media/PhotoData/Photos.sqlite: `ZASSET`, `ZADDITIONALASSETATTRIBUTES`.
    Photos,
    /// HomeDomain Library/Safari/History.db: `history_items`, `history_visits`.
    SafariHistory,
    /// An app's Core Data store: `ZITEM`.
    App,
}

impl DbKind {
    /// Where a system database lives (`None` for app databases, which live anywhere).
    pub fn key(self) -> Option<FileKey> {
        let (domain, path) = match self {
            DbKind::Sms => (HOME, "Library/SMS/sms.db"),
            DbKind::AddressBook => (HOME, "Library/AddressBook/AddressBook.sqlitedb"),
            DbKind::AddressBookImages => (HOME, "Library/AddressBook/AddressBookImages.sqlitedb"),
            DbKind::CallHistory => (HOME, "Library/CallHistoryDB/CallHistory.storedata"),
            DbKind::Photos => (CAMERA_ROLL, "Media/PhotoData/Photos.sqlite"),
            DbKind::SafariHistory => (HOME, "Library/Safari/History.db"),
            DbKind::App => return None,
        };
        Some(FileKey::new(domain, path))
    }
}

/// Rows added over time, in batches spread evenly over a time span (so a row's time is a
/// function of its number, and existing rows keep their times as the series grows).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Series {
    /// The batches, oldest first; row numbers start at 1 and continue across batches.
    pub batches: Vec<Batch>,
}

/// `count` rows between `start` and `end` (unix seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Number of rows.
    pub count: u32,
    /// Time of the first row.
    pub start: i64,
    /// Rows are before this time.
    pub end: i64,
}

impl Series {
    /// Number of rows.
    pub fn len(&self) -> u32 {
        self.batches.iter().map(|b| b.count).sum()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, count: u32, start: i64, end: i64) {
        if count > 0 {
            self.batches.push(Batch { count, start, end: end.max(start + 1) });
        }
    }

    /// The time of every row (index = row number − 1), non-decreasing, jittered by `seed`.
    fn times(&self, seed: u64) -> Vec<i64> {
        let mut out = Vec::with_capacity(self.len() as usize);
        for b in &self.batches {
            let step = ((b.end - b.start) / i64::from(b.count)).max(1);
            for i in 0..b.count {
                let row = out.len() as u64 + 1;
                let jitter = (mix(seed, row) % step.unsigned_abs()) as i64;
                out.push(b.start + i64::from(i) * step + jitter);
            }
        }
        out
    }
}

/// Counters that let the content grow consistently.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The device's clock (unix seconds): the latest simulated instant.
    pub clock: i64,
    /// Number of [`Content::simulate_use`] calls so far (the revision of changed files).
    pub uses: u64,
    /// Number of the next camera item (IMG_nnnn).
    pub next_photo: u32,
    /// Messages of sms.db.
    pub messages: Series,
    /// Contacts of AddressBook.sqlitedb.
    pub contacts: Series,
    /// Calls of CallHistory.storedata.
    pub calls: Series,
    /// Visits of Safari's History.db.
    pub visits: Series,
}

/// What one [`Content::simulate_use`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UseSummary {
    /// Files that did not exist before.
    pub added: u64,
    /// Files that existed and got new bytes.
    pub changed: u64,
    /// Files removed.
    pub deleted: u64,
    /// Size of the added files.
    pub added_bytes: u64,
    /// New size of the changed files.
    pub changed_bytes: u64,
    /// Former size of the deleted files.
    pub deleted_bytes: u64,
}

/// What a virtual iPhone holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Content {
    /// The device's seed: the same seed and history give the same bytes.
    pub seed: u64,
    /// The profile it was generated with.
    pub profile: Profile,
    /// The files, by (domain, path). Directories are implied by the paths.
    #[serde(with = "catalog")]
    pub files: BTreeMap<FileKey, FileEntry>,
    /// Counters for growth.
    pub state: State,
}

/// Serialises the catalog as a list of `[key, entry]` pairs (JSON maps need string keys).
mod catalog {
    use super::{BTreeMap, FileEntry, FileKey};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(files: &BTreeMap<FileKey, FileEntry>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(files.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<FileKey, FileEntry>, D::Error> {
        Ok(Vec::<(FileKey, FileEntry)>::deserialize(d)?.into_iter().collect())
    }
}

/// Keys touched by one change set, with their size before it (`None`: did not exist).
type Touched = BTreeMap<FileKey, Option<u64>>;

impl Content {
    /// Generates a device's content from a seed. Builds each SQLite database and plist once
    /// (to know its exact size) but never reads a media body.
    pub fn generate(seed: u64, profile: Profile) -> Result<Content, ContentError> {
        let scale = Scale::of(profile);
        let mut c = Content {
            seed,
            profile,
            files: BTreeMap::new(),
            state: State { clock: YEAR_END, uses: 0, next_photo: 1, ..State::default() },
        };
        let mut rng = Rng::new(mix(seed, tag::GENERATE));
        let mut t = Touched::new();
        let media = scale.bytes / 100 * 85;

        // Camera roll: photos and videos interleaved, numbered and dated in order.
        let (plo, phi) = scale.photo_sizes();
        let (vlo, vhi) = scale.video_sizes();
        let mut items: Vec<(bool, u64)> =
            split_budget(&mut rng, media / 100 * 25, vlo, vhi).into_iter().map(|s| (true, s)).collect();
        items.extend(split_budget(&mut rng, media / 100 * 58, plo, phi).into_iter().map(|s| (false, s)));
        shuffle(&mut rng, &mut items);
        let times = spread(&mut rng, items.len(), YEAR_START, YEAR_END - 7 * DAY);
        for ((video, size), mtime) in items.into_iter().zip(times) {
            c.add_camera_item(&mut t, &mut rng, video, size, mtime, scale);
        }

        // Messages, contacts, calls, Safari visits over the year.
        c.state.messages.push(scale.count(2, 40, 100_000), YEAR_START, YEAR_END - DAY);
        c.state.contacts.push(scale.count(25, 12, 5_000), YEAR_START - 400 * DAY, YEAR_END - DAY);
        c.state.calls.push(scale.count(8, 20, 50_000), YEAR_START, YEAR_END - DAY);
        c.state.visits.push(scale.count(5, 30, 100_000), YEAR_START, YEAR_END - DAY);
        let messages = c.state.messages.len();
        let (alo, ahi) = scale.attachment_sizes();
        for size in split_budget(&mut rng, media / 100 * 12, alo, ahi) {
            let m = 1 + rng.below(u64::from(messages)) as u32;
            c.add_attachment(&mut t, &mut rng, m, size);
        }
        c.rebuild_system_dbs(&mut t, &mut rng, YEAR_END)?;
        c.rebuild_photos_db(&mut t, YEAR_END - rng.range(60, 7_200) as i64)?;

        c.add_system_files(&mut t, &mut rng, scale)?;
        c.add_apps(&mut t, &mut rng, scale)?;

        // Many small files, to the profile's file count and size.
        let have_files = c.files.len() as u64;
        let remaining_files = scale.files.saturating_sub(have_files);
        let remaining_bytes = scale.bytes.saturating_sub(c.total_bytes());
        let mean = (remaining_bytes / remaining_files.max(1)).clamp(256, 256 << 10);
        let apps = c.app_domains();
        for n in 0..remaining_files {
            let mtime = YEAR_START + rng.below((YEAR_END - YEAR_START) as u64) as i64;
            c.add_small_file(&mut t, &mut rng, &apps, mean, n, mtime, 0)?;
        }

        // Health, last and from its own stream, so the content an unencrypted backup
        // carries is what it was before Health existed here.
        let mut health = Rng::new(mix(seed, tag::GENERATE ^ 0x4ea1_7400));
        let rows = scale.count(20, 30, 20_000);
        let mtime = YEAR_END - health.range(60, 7_200) as i64;
        c.put_db(&mut t, FileKey::new(HEALTH_DB.0, HEALTH_DB.1), DbKind::App, health.next(), rows, mtime)?;
        Ok(c)
    }

    /// Simulated days of use touching about `fraction` (0.0..=1.0) of the device's bytes:
    /// deletes some old photos and cache files; adds messages (sms.db grows, some with new
    /// attachments), contacts, calls and Safari visits; adds photos (and sometimes a video);
    /// rewrites some app files and app databases; adds a few app files. Deterministic from
    /// the current content and `use_seed`. Changed files get a strictly later mtime and new bytes.
    /// The summary counts every file touched.
    pub fn simulate_use(&mut self, fraction: f64, use_seed: u64) -> Result<UseSummary, ContentError> {
        self.simulate_use_seen(fraction, use_seed, true)
    }

    /// [`Self::simulate_use`], its summary counting only the files a backup carries (those
    /// only encrypted backups carry when `encrypted`).
    pub fn simulate_use_seen(
        &mut self,
        fraction: f64,
        use_seed: u64,
        encrypted: bool,
    ) -> Result<UseSummary, ContentError> {
        let fraction = if fraction.is_finite() { fraction.clamp(0.0, 1.0) } else { 0.0 };
        if fraction == 0.0 {
            return Ok(UseSummary::default());
        }
        let scale = Scale::of(self.profile);
        self.state.uses += 1;
        let rev = self.state.uses;
        let mut rng = Rng::new(mix(mix(self.seed, tag::USE), mix(use_seed, rev)));
        let mut t = Touched::new();
        let budget = (self.total_bytes() as f64 * fraction) as u64;
        let days = ((fraction * 100.0).ceil() as i64).clamp(1, 365);
        let t0 = self.state.clock;
        let t1 = t0 + days * DAY;
        self.state.clock = t1;

        // Deletions: some old photos (with their thumbnails) and some cache files.
        let camera: Vec<FileKey> = self.camera_keys().into_iter().map(|(k, _)| k).collect();
        let photo_deletes = rng.expected(fraction * camera.len() as f64 * 0.5);
        let old_half = camera.len().div_ceil(2);
        for _ in 0..photo_deletes {
            if old_half == 0 {
                break;
            }
            let key = &camera[rng.below(old_half as u64) as usize];
            self.remove(&mut t, key);
            self.remove(&mut t, &thumbnail_key(key));
        }
        let caches: Vec<FileKey> = self.files.keys().filter(|k| is_cache(k)).cloned().collect();
        let cache_deletes = rng.expected(fraction * caches.len() as f64 * 2.0).max(u64::from(!caches.is_empty()));
        for _ in 0..cache_deletes {
            let key = &caches[rng.below(caches.len() as u64) as usize];
            self.remove(&mut t, key);
        }

        // Messages (some with attachments), contacts, calls, visits; their databases.
        let grow = |rng: &mut Rng, series: &Series, rate: f64, min: u64| {
            rng.expected(fraction * f64::from(series.len()) * rate).max(min).min(u64::from(u32::MAX / 4)) as u32
        };
        let new_messages = grow(&mut rng, &self.state.messages, 1.0, 1);
        let first_new = self.state.messages.len() + 1;
        self.state.messages.push(new_messages, t0 + 60, t1);
        let (alo, ahi) = scale.attachment_sizes();
        let mut sizes = split_budget(&mut rng, budget / 12, alo, ahi);
        if sizes.is_empty() && budget / 12 >= alo / 4 {
            sizes.push(budget / 12);
        }
        for size in sizes {
            let m = first_new + rng.below(u64::from(new_messages)) as u32;
            self.add_attachment(&mut t, &mut rng, m, size);
        }
        let new_contacts = grow(&mut rng, &self.state.contacts, 0.5, 0);
        self.state.contacts.push(new_contacts, t0 + 60, t1);
        let new_calls = grow(&mut rng, &self.state.calls, 2.0, 1);
        self.state.calls.push(new_calls, t0 + 60, t1);
        let new_visits = grow(&mut rng, &self.state.visits, 2.0, 1);
        self.state.visits.push(new_visits, t0 + 60, t1);
        self.rebuild_system_dbs(&mut t, &mut rng, t1)?;

        // New photos and sometimes a video: half of the budget.
        let mut media_budget = budget / 2;
        let (plo, phi) = scale.photo_sizes();
        let (vlo, vhi) = scale.video_sizes();
        let mut items = Vec::new();
        if media_budget >= vlo * 2 && rng.chance(0.25) {
            let size = rng.range(vlo, vhi).min(media_budget / 2);
            media_budget -= size;
            items.push((true, size));
        }
        items.extend(split_budget(&mut rng, media_budget, plo, phi).into_iter().map(|s| (false, s)));
        if items.is_empty() && media_budget >= plo / 4 {
            items.push((false, media_budget));
        }
        shuffle(&mut rng, &mut items);
        let times = spread(&mut rng, items.len(), t0 + 60, t1);
        let camera_changed = !items.is_empty() || photo_deletes > 0;
        for ((video, size), mtime) in items.into_iter().zip(times) {
            self.add_camera_item(&mut t, &mut rng, video, size, mtime, scale);
        }
        if camera_changed {
            self.rebuild_photos_db(&mut t, t1 - rng.below(3_600) as i64)?;
        }

        // App data: rewrite files and databases with what is left of the budget (at least
        // a couple of files: apps change every day).
        let change_budget = budget.saturating_sub(touched_bytes(&self.files, &t));
        let mut candidates: Vec<FileKey> =
            self.files.keys().filter(|k| is_app_data(k) && !t.contains_key(*k)).cloned().collect();
        let mut changed = 0u64;
        let mut i = 0;
        while (changed < change_budget || i < 2) && i < candidates.len() {
            let j = i + rng.below((candidates.len() - i) as u64) as usize;
            candidates.swap(i, j);
            let mtime = t0 + 1 + rng.below((t1 - t0) as u64) as i64;
            changed += self.rewrite(&mut t, &mut rng, &candidates[i], mtime, rev)?;
            i += 1;
        }

        // A few new app files.
        let apps = self.app_domains();
        let mean = self.small_file_mean();
        let new_files = rng.expected(fraction * self.files.len() as f64 * 0.05).max(1);
        let base = self.files.len() as u64 + rev * 1_000_000;
        for n in 0..new_files {
            let mtime = t0 + 1 + rng.below((t1 - t0) as u64) as i64;
            self.add_small_file(&mut t, &mut rng, &apps, mean, base + n, mtime, rev)?;
        }

        let mut summary = UseSummary::default();
        for (key, before) in t.iter().filter(|(k, _)| encrypted || !only_in_encrypted_backups(k)) {
            match (before, self.files.get(key)) {
                (Some(_), Some(e)) => {
                    summary.changed += 1;
                    summary.changed_bytes += e.size;
                }
                (None, Some(e)) => {
                    summary.added += 1;
                    summary.added_bytes += e.size;
                }
                (Some(size), None) => {
                    summary.deleted += 1;
                    summary.deleted_bytes += size;
                }
                (None, None) => {}
            }
        }
        Ok(summary)
    }

    /// Streams one file's bytes. `blobs` is the directory holding stored bodies
    /// (`<blobs>/<sha256>`).
    pub fn open(&self, blobs: &Path, key: &FileKey) -> io::Result<Box<dyn Read + Send>> {
        let entry = self
            .files
            .get(key)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no file {key} on the device")))?;
        let built = |bytes: Vec<u8>| -> io::Result<Box<dyn Read + Send>> {
            if bytes.len() as u64 != entry.size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{key}: rebuilt {} bytes but the catalog says {}", bytes.len(), entry.size),
                ));
            }
            Ok(Box::new(Cursor::new(bytes)))
        };
        match &entry.body {
            Body::Media { format, seed } => Ok(Box::new(MediaReader::new(*format, *seed, entry.size))),
            Body::Text { kind, seed } => built(text_bytes(*kind, *seed, entry.size)),
            Body::Plist { kind, seed, entries, xml } => {
                built(plist_bytes(*kind, *seed, *entries, *xml).map_err(io::Error::other)?)
            }
            Body::Sqlite { db, seed, rows } => built(self.db_bytes(*db, *seed, *rows).map_err(io::Error::other)?),
            Body::Stored { sha256 } => {
                let file = std::fs::File::open(blob_path(blobs, sha256)?)?;
                let len = file.metadata()?.len();
                if len != entry.size {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{key}: blob {sha256} has {len} bytes but the catalog says {}", entry.size),
                    ));
                }
                Ok(Box::new(file))
            }
        }
    }

    /// The size and SHA-256 (lowercase hex) of one file's bytes, as [`Content::open`] yields them.
    pub fn sha256(&self, blobs: &Path, key: &FileKey) -> io::Result<(u64, String)> {
        let mut buf = vec![0u8; CHUNK];
        self.sha256_with(blobs, key, &mut buf)
    }

    fn sha256_with(&self, blobs: &Path, key: &FileKey, buf: &mut [u8]) -> io::Result<(u64, String)> {
        let mut reader = self.open(blobs, key)?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut total = 0u64;
        loop {
            let n = match reader.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            ctx.update(&buf[..n]);
            total += n as u64;
        }
        Ok((total, hex(ctx.finish().as_ref())))
    }

    /// Ground truth: one line per file, `"domain\trelativePath\tsize\tsha256hex"`, sorted
    /// by (domain, path). Hashes files on all cores; a file whose bytes do not have the
    /// catalog's size is an error.
    pub fn expect(&self, blobs: &Path, encrypted: bool) -> io::Result<Vec<String>> {
        let entries: Vec<(&FileKey, &FileEntry)> =
            self.files.iter().filter(|(k, _)| encrypted || !only_in_encrypted_backups(k)).collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8).min(entries.len().max(1));
        let next = AtomicUsize::new(0);
        let work = || -> io::Result<Vec<(usize, String)>> {
            let mut out = Vec::new();
            let mut buf = vec![0u8; CHUNK];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((key, entry)) = entries.get(i) else { break };
                let (size, sha) = self.sha256_with(blobs, key, &mut buf)?;
                if size != entry.size {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{key}: read {size} bytes but the catalog says {}", entry.size),
                    ));
                }
                out.push((i, format!("{}\t{}\t{size}\t{sha}", key.domain, key.path)));
            }
            Ok(out)
        };
        let results: Vec<io::Result<Vec<(usize, String)>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(work)).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(io::Error::other("a hashing thread panicked"))))
                .collect()
        });
        let mut lines = vec![String::new(); entries.len()];
        for result in results {
            for (i, line) in result? {
                lines[i] = line;
            }
        }
        Ok(lines)
    }

    /// Total size of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|e| e.size).sum()
    }

    /// Replaces the whole content with restored files (bodies normally [`Body::Stored`],
    /// whose bytes are already in `<blobs>/<sha256>`, e.g. written by [`write_blob`]).
    /// The seed and counters stay, so later use continues the same device; the clock moves
    /// to the newest restored mtime if that is later.
    pub fn replace_with_stored(&mut self, files: Vec<(FileKey, FileEntry)>) {
        self.files = files.into_iter().collect();
        let newest = self.files.values().map(|e| e.mtime).max().unwrap_or(self.state.clock);
        self.state.clock = self.state.clock.max(newest);
    }

    /// Loads content saved by [`Content::save`] (JSON), checking stored bodies' hashes.
    pub fn load(path: &Path) -> Result<Content, ContentError> {
        let file = std::fs::File::open(path)?;
        let content: Content = serde_json::from_reader(io::BufReader::new(file))?;
        for (key, entry) in &content.files {
            if key.path.is_empty() || key.path.starts_with('/') || key.domain.is_empty() {
                return Err(ContentError::Invalid(format!("bad file key {key:?}")));
            }
            if let Body::Stored { sha256 } = &entry.body
                && !is_sha256_hex(sha256)
            {
                return Err(ContentError::Invalid(format!("{key}: stored body {sha256:?} is not a SHA-256")));
            }
        }
        Ok(content)
    }

    /// Saves the content as JSON, atomically: a temporary file in the same directory,
    /// fsync, rename, fsync of the directory.
    pub fn save(&self, path: &Path) -> Result<(), ContentError> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        {
            let mut w = io::BufWriter::new(tmp.as_file_mut());
            serde_json::to_writer(&mut w, self)?;
            w.flush()?;
        }
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    /// Manifest.db rows of the files a backup carries (regular files only;
    /// [`crate::manifest::build_manifest_db`] adds the directories): an unencrypted one
    /// leaves out the keychain, Health and the call history.
    pub fn manifest_files(&self, encrypted: bool) -> Vec<ManifestFile> {
        self.files
            .iter()
            .filter(|(k, _)| encrypted || !only_in_encrypted_backups(k))
            .map(|(k, e)| ManifestFile::file(&k.domain, &k.path, e.size, e.mtime, e.mode))
            .collect()
    }

    /// Bundle ids of the apps with a container (`AppDomain-<bundle>`), sorted.
    pub fn app_bundles(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for key in self.files.keys() {
            if let Some(bundle) = key.domain.strip_prefix("AppDomain-")
                && out.last().map(String::as_str) != Some(bundle)
            {
                out.push(bundle.to_owned());
            }
        }
        out
    }

    fn app_domains(&self) -> Vec<String> {
        self.app_bundles().into_iter().map(|b| format!("AppDomain-{b}")).collect()
    }

    // -------------------------------------------------------------------------------
    // Changing the catalog

    /// Seed of a file's bytes at a revision: from the device seed and the file's identity.
    fn body_seed(&self, key: &FileKey, rev: u64) -> u64 {
        let mut h = blake3::Hasher::new_derive_key("lifeboat virtual-iphone 2025 body seed");
        h.update(&self.seed.to_le_bytes());
        h.update(&rev.to_le_bytes());
        h.update(key.domain.as_bytes());
        h.update(&[0]);
        h.update(key.path.as_bytes());
        first_u64(h.finalize().as_bytes())
    }

    /// Inserts or replaces a file; a replaced file's mtime moves past its old one.
    fn put(&mut self, t: &mut Touched, key: FileKey, mut entry: FileEntry) {
        let old = self.files.get(&key).map(|o| (o.mtime, o.size));
        if let Some((mtime, _)) = old {
            entry.mtime = entry.mtime.max(mtime + 1);
        }
        t.entry(key.clone()).or_insert(old.map(|(_, size)| size));
        self.files.insert(key, entry);
    }

    fn remove(&mut self, t: &mut Touched, key: &FileKey) {
        if let Some(old) = self.files.remove(key) {
            t.entry(key.clone()).or_insert(Some(old.size));
        }
    }

    fn put_media(&mut self, t: &mut Touched, key: FileKey, format: MediaFormat, size: u64, mtime: i64, rev: u64) {
        let seed = self.body_seed(&key, rev);
        self.put(t, key, FileEntry { size, mtime, mode: FILE_MODE, body: Body::Media { format, seed } });
    }

    fn put_text(&mut self, t: &mut Touched, key: FileKey, kind: TextKind, size: u64, mtime: i64, rev: u64) {
        let seed = self.body_seed(&key, rev);
        let size = size.min(MAX_TEXT_BYTES);
        self.put(t, key, FileEntry { size, mtime, mode: FILE_MODE, body: Body::Text { kind, seed } });
    }

    #[allow(clippy::too_many_arguments)]
    fn put_plist(
        &mut self,
        t: &mut Touched,
        key: FileKey,
        kind: PlistKind,
        entries: u32,
        xml: bool,
        mtime: i64,
        rev: u64,
    ) -> Result<u64, ContentError> {
        let seed = self.body_seed(&key, rev);
        let size = plist_bytes(kind, seed, entries, xml)?.len() as u64;
        self.put(t, key, FileEntry { size, mtime, mode: FILE_MODE, body: Body::Plist { kind, seed, entries, xml } });
        Ok(size)
    }

    #[allow(clippy::too_many_arguments)]
    fn put_db(
        &mut self,
        t: &mut Touched,
        key: FileKey,
        db: DbKind,
        seed: u64,
        rows: u32,
        mtime: i64,
    ) -> Result<u64, ContentError> {
        let size = self.db_bytes(db, seed, rows)?.len() as u64;
        self.put(t, key, FileEntry { size, mtime, mode: FILE_MODE, body: Body::Sqlite { db, seed, rows } });
        Ok(size)
    }

    /// Adds the next IMG_nnnn (HEIC or JPG photo, or MOV video) to the camera roll, with
    /// its thumbnail.
    fn add_camera_item(&mut self, t: &mut Touched, rng: &mut Rng, video: bool, size: u64, mtime: i64, scale: Scale) {
        let (format, ext) = match (video, rng.chance(0.75)) {
            (true, _) => (MediaFormat::Mov, "MOV"),
            (false, true) => (MediaFormat::Heic, "HEIC"),
            (false, false) => (MediaFormat::Jpeg, "JPG"),
        };
        let key = loop {
            let n = self.state.next_photo.max(1);
            self.state.next_photo = n + 1;
            let key = FileKey::new(
                CAMERA_ROLL,
                format!("{DCIM_PREFIX}{}APPLE/IMG_{:04}.{ext}", 100 + (n - 1) / 1000, (n - 1) % 9999 + 1),
            );
            if !self.files.contains_key(&key) {
                break key;
            }
        };
        let rev = self.state.uses;
        let (tlo, thi) = scale.thumbnail_sizes();
        let thumb = thumbnail_key(&key);
        self.put_media(t, thumb, MediaFormat::Jpeg, rng.range(tlo, thi), mtime, rev);
        self.put_media(t, key, format, size, mtime, rev);
    }

    /// Adds an SMS attachment of message `m`; its directory GUID encodes `m` (see
    /// [`attachment_message`]).
    fn add_attachment(&mut self, t: &mut Touched, rng: &mut Rng, m: u32, size: u64) {
        let (format, ext) = match rng.below(10) {
            0..=5 => (MediaFormat::Heic, "HEIC"),
            6..=8 => (MediaFormat::Jpeg, "JPG"),
            _ => (MediaFormat::Mov, "MOV"),
        };
        let key = loop {
            let k = rng.below(1 << 16);
            let guid = attachment_guid(self.seed, m, k);
            let h = mix(self.seed, mix(tag::ATTACHMENT, first_u64(guid.as_bytes())));
            let path = format!(
                "{ATTACHMENTS_PREFIX}{:02x}/{:02}/{guid}/IMG_{:04}.{ext}",
                h & 0xff,
                (h >> 8) % 16,
                1 + (h >> 16) % 9999
            );
            let key = FileKey::new(MEDIA, path);
            if !self.files.contains_key(&key) {
                break key;
            }
        };
        let times = self.state.messages.times(mix(self.seed, tag::SMS));
        let mtime = times.get(m as usize - 1).copied().unwrap_or(self.state.clock);
        let rev = self.state.uses;
        self.put_media(t, key, format, size, mtime, rev);
    }

    /// Rebuilds sms.db, the address book, its images, the call history and Safari history
    /// from the series in `state` (only those whose row count changed, or that are missing).
    fn rebuild_system_dbs(&mut self, t: &mut Touched, rng: &mut Rng, now: i64) -> Result<(), ContentError> {
        let contacts = self.state.contacts.len();
        let wanted = [
            (DbKind::Sms, self.state.messages.len()),
            (DbKind::AddressBook, contacts),
            (DbKind::AddressBookImages, contacts.div_ceil(4)),
            (DbKind::CallHistory, self.state.calls.len()),
            (DbKind::SafariHistory, self.state.visits.len()),
        ];
        for (db, rows) in wanted {
            let Some(key) = db.key() else { continue };
            let current = match self.files.get(&key).map(|e| &e.body) {
                Some(Body::Sqlite { db: d, rows: r, .. }) if *d == db => Some(*r),
                _ => None,
            };
            // sms.db also lists attachments, which only arrive with new messages.
            if current != Some(rows) {
                let mtime = now - rng.range(60, 7_200) as i64;
                let rev = self.state.uses;
                self.put_db(t, key, db, rev, rows, mtime)?;
            }
        }
        Ok(())
    }

    fn rebuild_photos_db(&mut self, t: &mut Touched, mtime: i64) -> Result<(), ContentError> {
        let rows = u32::try_from(self.camera_keys().len()).unwrap_or(u32::MAX);
        let Some(key) = DbKind::Photos.key() else { return Ok(()) };
        let rev = self.state.uses;
        self.put_db(t, key, DbKind::Photos, rev, rows, mtime)?;
        Ok(())
    }

    /// DCIM photos and videos of the catalog, oldest first.
    fn camera_keys(&self) -> Vec<(FileKey, i64)> {
        let start = FileKey::new(CAMERA_ROLL, DCIM_PREFIX);
        let mut out: Vec<(FileKey, i64)> = self
            .files
            .range(start..)
            .take_while(|(k, _)| k.domain == CAMERA_ROLL && k.path.starts_with(DCIM_PREFIX))
            .filter(|(k, _)| camera_kind(&k.path).is_some())
            .map(|(k, e)| (k.clone(), e.mtime))
            .collect();
        out.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        out
    }

    /// Preferences and the other system files a phone has.
    fn add_system_files(&mut self, t: &mut Touched, rng: &mut Rng, scale: Scale) -> Result<(), ContentError> {
        let prefs = (scale.files / 40 + 8).min(HOME_PREFS.len() as u64) as usize;
        let when = |rng: &mut Rng| YEAR_START + rng.below((YEAR_END - YEAR_START) as u64) as i64;
        for name in HOME_PREFS.iter().take(prefs) {
            let key = FileKey::new(HOME, format!("Library/Preferences/{name}"));
            let entries = rng.range(4, 60) as u32;
            let mtime = when(rng);
            self.put_plist(t, key, PlistKind::Prefs, entries, false, mtime, 0)?;
        }
        let plists: &[(&str, &str, bool)] = &[
            ("SystemPreferencesDomain", "SystemConfiguration/preferences.plist", true),
            ("SystemPreferencesDomain", "SystemConfiguration/com.apple.wifi.plist", false),
            ("SystemPreferencesDomain", "SystemConfiguration/NetworkInterfaces.plist", true),
            ("WirelessDomain", "Library/Preferences/com.apple.commcenter.plist", false),
            ("WirelessDomain", "Library/Preferences/com.apple.commcenter.device_specific_nobackup.plist", false),
            ("RootDomain", "Library/Preferences/com.apple.MobileBackup.plist", false),
            ("ManagedPreferencesDomain", "mobile/com.apple.webcontentfilter.plist", true),
            (HOME, "Library/SpringBoard/IconState.plist", false),
            (HOME, "Library/SpringBoard/applicationstate.plist", false),
            (HOME, "Library/Mail/Accounts.plist", true),
            ("AppDomainGroup-group.com.apple.notes", "Library/Preferences/group.com.apple.notes.plist", false),
        ];
        for (domain, path, xml) in plists {
            let entries = rng.range(6, 80) as u32;
            let mtime = when(rng);
            self.put_plist(t, FileKey::new(*domain, *path), PlistKind::Prefs, entries, *xml, mtime, 0)?;
        }
        let items = scale.count(20, 20, 5_000);
        let mtime = when(rng);
        self.put_plist(
            t,
            FileKey::new("KeychainDomain", "keychain-backup.plist"),
            PlistKind::Keychain,
            items,
            false,
            mtime,
            0,
        )?;
        let dbs: &[(&str, &str, u64)] = &[
            (HOME, "Library/Calendar/Calendar.sqlitedb", 30),
            (HOME, "Library/Safari/Bookmarks.db", 100),
            (HOME, "Library/Voicemail/voicemail.db", 400),
            (HOME, "Library/Accounts/Accounts3.sqlite", 1_000),
            ("AppDomainGroup-group.com.apple.notes", "NoteStore.sqlite", 40),
            ("WirelessDomain", "Library/Databases/DataUsage.sqlite", 60),
        ];
        for (domain, path, per) in dbs {
            let key = FileKey::new(*domain, *path);
            let seed = self.body_seed(&key, 0);
            let rows = scale.count(*per, 3, 20_000);
            let mtime = when(rng);
            self.put_db(t, key, DbKind::App, seed, rows, mtime)?;
        }
        let (tlo, thi) = scale.thumbnail_sizes();
        for path in ["Library/SpringBoard/LockBackground.cpbitmap", "Library/SpringBoard/HomeBackground.cpbitmap"] {
            let mtime = when(rng);
            self.put_media(t, FileKey::new(HOME, path), MediaFormat::Bin, rng.range(tlo * 8, thi * 8), mtime, 0);
        }
        let mtime = when(rng);
        self.put_media(
            t,
            FileKey::new(HOME, "Library/Cookies/Cookies.binarycookies"),
            MediaFormat::Bin,
            rng.range(2_000, 60_000),
            mtime,
            0,
        );
        Ok(())
    }

    /// App containers: preferences, a Core Data store, sometimes a second database,
    /// cookies and a shared group container.
    fn add_apps(&mut self, t: &mut Touched, rng: &mut Rng, scale: Scale) -> Result<(), ContentError> {
        let count = scale.count(250, 3, APPS.len() as u32) as usize;
        let mut order: Vec<usize> = (0..APPS.len()).collect();
        shuffle(rng, &mut order);
        let when = |rng: &mut Rng| YEAR_START + rng.below((YEAR_END - YEAR_START) as u64) as i64;
        for &i in order.iter().take(count) {
            let (bundle, name) = APPS[i];
            let domain = format!("AppDomain-{bundle}");
            let entries = rng.range(8, 80) as u32;
            let mtime = when(rng);
            self.put_plist(
                t,
                FileKey::new(&domain, format!("Library/Preferences/{bundle}.plist")),
                PlistKind::Prefs,
                entries,
                false,
                mtime,
                0,
            )?;
            let mut dbs = vec![format!("Library/Application Support/{name}.sqlite")];
            if rng.chance(0.5) {
                dbs.push(format!("Documents/{}.db", name.to_ascii_lowercase()));
            }
            for path in dbs {
                let key = FileKey::new(&domain, path);
                let seed = self.body_seed(&key, 0);
                let rows = rng.range(10, 10 + (scale.files / 25).min(4_000)) as u32;
                let mtime = when(rng);
                self.put_db(t, key, DbKind::App, seed, rows, mtime)?;
            }
            if rng.chance(0.6) {
                let mtime = when(rng);
                let size = rng.range(300, 8_000);
                self.put_media(
                    t,
                    FileKey::new(&domain, "Library/Cookies/Cookies.binarycookies"),
                    MediaFormat::Bin,
                    size,
                    mtime,
                    0,
                );
            }
            if rng.chance(0.3) {
                let group = format!("AppDomainGroup-group.{bundle}");
                let entries = rng.range(4, 30) as u32;
                let mtime = when(rng);
                self.put_plist(
                    t,
                    FileKey::new(group, format!("Library/Preferences/group.{bundle}.plist")),
                    PlistKind::Prefs,
                    entries,
                    false,
                    mtime,
                    0,
                )?;
            }
        }
        Ok(())
    }

    /// One of the many small files: in an app container mostly, else in HomeDomain.
    #[allow(clippy::too_many_arguments)]
    fn add_small_file(
        &mut self,
        t: &mut Touched,
        rng: &mut Rng,
        apps: &[String],
        mean: u64,
        n: u64,
        mtime: i64,
        rev: u64,
    ) -> Result<(), ContentError> {
        let (domain, (dir, kind)) = if !apps.is_empty() && rng.chance(0.85) {
            (rng.pick(apps).clone(), *rng.pick(APP_DIRS))
        } else {
            (HOME.to_owned(), *rng.pick(HOME_DIRS))
        };
        let size = rng.exp_size(mean, 24, mean * 30);
        let word = *rng.pick(WORDS);
        let name = match kind {
            Fill::Json => format!("{word}-{n:05}.json"),
            Fill::Log => format!("{word}.{n}.log"),
            Fill::Prose => format!("Note {n:05}.txt"),
            Fill::Plist => format!("com.{word}.settings{n}.plist"),
            Fill::Cache => format!("{:016x}{:016x}", rng.next(), n),
            Fill::Thumb => format!("{:016x}-{n}.jpg", rng.next()),
            Fill::Data => format!("{word}{n}.dat"),
            Fill::Voicemail => format!("{n}.amr"),
        };
        let key = FileKey::new(domain, format!("{dir}/{name}"));
        match kind {
            Fill::Json => self.put_text(t, key, TextKind::Json, size, mtime, rev),
            Fill::Log => self.put_text(t, key, TextKind::Log, size, mtime, rev),
            Fill::Prose => self.put_text(t, key, TextKind::Prose, size, mtime, rev),
            Fill::Plist => {
                let entries = (size / 45).clamp(2, 60) as u32;
                self.put_plist(t, key, PlistKind::Prefs, entries, rng.chance(0.3), mtime, rev)?;
            }
            Fill::Cache | Fill::Data | Fill::Voicemail => self.put_media(t, key, MediaFormat::Bin, size, mtime, rev),
            Fill::Thumb => self.put_media(t, key, MediaFormat::Jpeg, size.max(600), mtime, rev),
        }
        Ok(())
    }

    /// Mean size of the non-media files (for new small files).
    fn small_file_mean(&self) -> u64 {
        let (n, bytes) = self
            .files
            .iter()
            .filter(|(_, e)| matches!(e.body, Body::Text { .. } | Body::Plist { .. }))
            .fold((0u64, 0u64), |(n, b), (_, e)| (n + 1, b + e.size));
        bytes.checked_div(n).map_or(4_096, |mean| mean.clamp(256, 256 << 10))
    }

    /// Gives an app file new bytes (new seed; text and binaries change size a little,
    /// databases and plists grow). Returns the new size (0 if the file is left alone).
    fn rewrite(
        &mut self,
        t: &mut Touched,
        rng: &mut Rng,
        key: &FileKey,
        mtime: i64,
        rev: u64,
    ) -> Result<u64, ContentError> {
        let Some(old) = self.files.get(key).cloned() else { return Ok(0) };
        let resize = |rng: &mut Rng, s: u64| ((s as f64 * (0.8 + 0.45 * rng.unit())) as u64).max(16);
        let owned = key.clone();
        match old.body {
            Body::Text { kind, .. } => {
                let size = resize(rng, old.size);
                self.put_text(t, owned, kind, size, mtime, rev);
            }
            Body::Media { format, .. } => {
                let size = resize(rng, old.size);
                self.put_media(t, owned, format, size, mtime, rev);
            }
            Body::Plist { kind, entries, xml, .. } => {
                let entries = entries + rng.range(0, 1 + u64::from(entries) / 5) as u32;
                self.put_plist(t, owned, kind, entries, xml, mtime, rev)?;
            }
            Body::Sqlite { db: DbKind::App, rows, .. } => {
                let seed = self.body_seed(key, rev);
                self.put_db(t, owned, DbKind::App, seed, rows + 1 + rows / 10, mtime)?;
            }
            Body::Sqlite { .. } => return Ok(0),
            Body::Stored { .. } => {
                let ext = key.path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
                match ext.as_str() {
                    "plist" => {
                        let entries = (old.size / 40).clamp(2, 3_000) as u32;
                        self.put_plist(t, owned, PlistKind::Prefs, entries, false, mtime, rev)?;
                    }
                    "sqlite" | "sqlitedb" | "db" | "storedata" => {
                        let seed = self.body_seed(key, rev);
                        let rows = (old.size / 300).clamp(3, 20_000) as u32;
                        self.put_db(t, owned, DbKind::App, seed, rows, mtime)?;
                    }
                    "json" => self.put_text(t, owned, TextKind::Json, resize(rng, old.size), mtime, rev),
                    "log" => self.put_text(t, owned, TextKind::Log, resize(rng, old.size), mtime, rev),
                    "txt" => self.put_text(t, owned, TextKind::Prose, resize(rng, old.size), mtime, rev),
                    _ => {
                        let size = resize(rng, old.size);
                        self.put_media(t, owned, MediaFormat::Bin, size, mtime, rev);
                    }
                }
            }
        }
        Ok(self.files.get(key).map_or(0, |e| e.size))
    }
}

/// Writes a restored file's bytes into `<blobs>/<sha256>` (atomically, through a temporary
/// file in `blobs`) and returns their size and SHA-256.
pub fn write_blob(blobs: &Path, data: &mut dyn Read) -> io::Result<(u64, String)> {
    std::fs::create_dir_all(blobs)?;
    let mut tmp = tempfile::NamedTempFile::new_in(blobs)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    {
        let mut w = io::BufWriter::new(tmp.as_file_mut());
        loop {
            let n = match data.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            ctx.update(&buf[..n]);
            w.write_all(&buf[..n])?;
            total += n as u64;
        }
        w.flush()?;
    }
    let sha = hex(ctx.finish().as_ref());
    tmp.persist(blobs.join(&sha)).map_err(|e| e.error)?;
    Ok((total, sha))
}

/// `<blobs>/<sha256>`, refusing anything but 64 lowercase hex digits.
fn blob_path(blobs: &Path, sha256: &str) -> io::Result<std::path::PathBuf> {
    if !is_sha256_hex(sha256) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("stored body {sha256:?} is not a SHA-256")));
    }
    Ok(blobs.join(sha256))
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Size now of the touched files that still exist.
fn touched_bytes(files: &BTreeMap<FileKey, FileEntry>, t: &Touched) -> u64 {
    t.keys().filter_map(|k| files.get(k)).map(|e| e.size).sum()
}

/// Files that use may rewrite: app containers and HomeDomain preferences.
fn is_app_data(key: &FileKey) -> bool {
    key.domain.starts_with("AppDomain") || (key.domain == HOME && key.path.starts_with("Library/Preferences/"))
}

/// Cache files that use may delete.
fn is_cache(key: &FileKey) -> bool {
    key.domain.starts_with("AppDomain") && key.path.contains("/ImageCache/")
}

/// `Some(is_video)` for a DCIM photo or video path.
fn camera_kind(path: &str) -> Option<bool> {
    let (_, ext) = path.rsplit_once('.')?;
    match ext.to_ascii_uppercase().as_str() {
        "JPG" | "JPEG" | "HEIC" | "PNG" => Some(false),
        "MOV" | "MP4" => Some(true),
        _ => None,
    }
}

/// The Photos thumbnail of a DCIM file.
fn thumbnail_key(key: &FileKey) -> FileKey {
    let rest = key.path.strip_prefix("Media/").unwrap_or(&key.path);
    FileKey::new(CAMERA_ROLL, format!("Media/PhotoData/Thumbnails/V2/{rest}/5005.JPG"))
}

/// The directory GUID of the `k`-th attachment of message `m`: random-looking, with `m`
/// and `k` recoverable from its last group (see [`attachment_message`]).
fn attachment_guid(seed: u64, m: u32, k: u64) -> String {
    let s = mix(seed, tag::GUID);
    let mask = s & 0xFFFF_FFFF_FFFF;
    let last = (((k & 0xFFFF) << 32) | u64::from(m)) ^ mask;
    let a = mix(s, (u64::from(m) << 16) | (k & 0xFFFF));
    format!("{:08X}-{:04X}-{:04X}-{:04X}-{:012X}", a >> 32, (a >> 16) & 0xFFFF, a & 0xFFFF, mix(a, 1) & 0xFFFF, last)
}

/// The message an attachment path belongs to, if its GUID is one [`attachment_guid`] made.
fn attachment_message(seed: u64, path: &str) -> Option<u32> {
    let guid = path.strip_prefix(ATTACHMENTS_PREFIX)?.split('/').nth(2)?;
    let last = u64::from_str_radix(guid.rsplit('-').next()?, 16).ok()?;
    let plain = last ^ (mix(seed, tag::GUID) & 0xFFFF_FFFF_FFFF);
    let m = u32::try_from(plain & 0xFFFF_FFFF).ok()?;
    (attachment_guid(seed, m, plain >> 32) == guid).then_some(m)
}

// ---------------------------------------------------------------------------------------
// Deterministic randomness

/// Domain separation of the random streams.
mod tag {
    pub const GENERATE: u64 = 0x01;
    pub const USE: u64 = 0x02;
    pub const SMS: u64 = 0x03;
    pub const HANDLE: u64 = 0x04;
    pub const ATTACHMENT: u64 = 0x05;
    pub const CONTACT: u64 = 0x06;
    pub const IMAGE: u64 = 0x07;
    pub const CALL: u64 = 0x08;
    pub const VISIT: u64 = 0x09;
    pub const ASSET: u64 = 0x0a;
    pub const APP_ROW: u64 = 0x0b;
    pub const TEXT: u64 = 0x0c;
    pub const PLIST: u64 = 0x0d;
    pub const GUID: u64 = 0x0e;
    pub const TITLE: u64 = 0x0f;
    pub const URL: u64 = 0x10;
}

/// The SplitMix64 finaliser: a bijective mix of 64 bits.
const fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Combines two values into a well-mixed 64-bit seed.
fn mix(a: u64, b: u64) -> u64 {
    splitmix(a ^ splitmix(b ^ 0x5851_F42D_4C95_7F2D))
}

/// The first 8 bytes of `bytes` as a little-endian integer (zero-padded).
fn first_u64(bytes: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    for (o, b) in a.iter_mut().zip(bytes) {
        *o = *b;
    }
    u64::from_le_bytes(a)
}

/// A small deterministic generator (SplitMix64).
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix(self.0)
    }

    /// Uniform in 0..n (0 when n is 0).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in lo..hi (lo when the range is empty).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo { lo } else { lo + self.below(hi - lo) }
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// An element of a non-empty slice (every caller passes a non-empty constant list or
    /// checks emptiness first).
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }

    /// A whole number whose expectation is `x`.
    fn expected(&mut self, x: f64) -> u64 {
        let x = if x.is_finite() { x.max(0.0) } else { 0.0 };
        let whole = x.floor();
        whole as u64 + u64::from(self.chance(x - whole))
    }

    /// Exponentially distributed around `mean`, clamped to [lo, hi].
    fn exp_size(&mut self, mean: u64, lo: u64, hi: u64) -> u64 {
        let x = -(1.0 - self.unit()).ln();
        ((mean as f64 * x) as u64).clamp(lo, hi.max(lo))
    }

    fn words(&mut self, lo: u64, hi: u64) -> String {
        let n = self.range(lo, hi + 1);
        let mut s = String::new();
        for i in 0..n {
            if i > 0 {
                s.push(' ');
            }
            let word: &&str = self.pick(WORDS);
            s.push_str(word);
        }
        s
    }
}

/// Sizes in [lo, hi) adding up to `budget` (the last one cut to what is left), stopping
/// when less than `lo` is left.
fn split_budget(rng: &mut Rng, budget: u64, lo: u64, hi: u64) -> Vec<u64> {
    let lo = lo.max(1);
    let mut out = Vec::new();
    let mut left = budget;
    while left >= lo {
        let size = rng.range(lo, hi.max(lo + 1)).min(left);
        out.push(size);
        left -= size;
    }
    out
}

fn shuffle<T>(rng: &mut Rng, xs: &mut [T]) {
    for i in (1..xs.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        xs.swap(i, j);
    }
}

/// `n` increasing times in (start, end).
fn spread(rng: &mut Rng, n: usize, start: i64, end: i64) -> Vec<i64> {
    let step = ((end - start) / (n as i64 + 1)).max(2);
    (0..n).map(|i| start + step * (i as i64 + 1) + rng.below(step.unsigned_abs() / 2) as i64).collect()
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(c) => c.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

/// `n` incompressible bytes from a seed.
fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut h = blake3::Hasher::new_derive_key("lifeboat virtual-iphone 2025 random bytes");
    h.update(&seed.to_le_bytes());
    let mut out = vec![0u8; n];
    h.finalize_xof().fill(&mut out);
    out
}

// ---------------------------------------------------------------------------------------
// Media bodies

/// Streams a [`Body::Media`] file: header, XOF bytes, trailer.
struct MediaReader {
    head: Vec<u8>,
    head_pos: usize,
    xof: Option<blake3::OutputReader>,
    middle: u64,
    tail: Vec<u8>,
    tail_pos: usize,
}

impl MediaReader {
    fn new(format: MediaFormat, seed: u64, size: u64) -> MediaReader {
        let (mut head, tail) = media_parts(format, size, seed);
        let fixed = (head.len() + tail.len()) as u64;
        if fixed >= size {
            // Too small for its header: the header, cut to size.
            head.extend_from_slice(&tail);
            head.truncate(usize::try_from(size).unwrap_or(usize::MAX));
            return MediaReader { head, head_pos: 0, xof: None, middle: 0, tail: Vec::new(), tail_pos: 0 };
        }
        let mut h = blake3::Hasher::new_derive_key("lifeboat virtual-iphone 2025 media bytes");
        h.update(&seed.to_le_bytes());
        h.update(&[format as u8]);
        h.update(&size.to_le_bytes());
        MediaReader { head, head_pos: 0, xof: Some(h.finalize_xof()), middle: size - fixed, tail, tail_pos: 0 }
    }
}

impl Read for MediaReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.head_pos < self.head.len() {
            let n = buf.len().min(self.head.len() - self.head_pos);
            buf[..n].copy_from_slice(&self.head[self.head_pos..self.head_pos + n]);
            self.head_pos += n;
            return Ok(n);
        }
        if self.middle > 0
            && let Some(xof) = &mut self.xof
        {
            let n = buf.len().min(usize::try_from(self.middle).unwrap_or(usize::MAX));
            xof.fill(&mut buf[..n]);
            self.middle -= n as u64;
            return Ok(n);
        }
        let n = buf.len().min(self.tail.len() - self.tail_pos);
        buf[..n].copy_from_slice(&self.tail[self.tail_pos..self.tail_pos + n]);
        self.tail_pos += n;
        Ok(n)
    }
}

/// Appends an ISO-BMFF box.
fn bmff_box(out: &mut Vec<u8>, kind: &[u8; 4], payload: &[u8]) {
    out.extend_from_slice(&u32::try_from(payload.len() + 8).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(payload);
}

/// Appends the header of an `mdat` box that runs from here to the end of a `total`-byte file
/// that has `after` more bytes after the box.
fn mdat_header(out: &mut Vec<u8>, total: u64, after: u64) {
    let rest = total.saturating_sub(out.len() as u64 + after);
    if rest <= u64::from(u32::MAX) {
        out.extend_from_slice(&u32::try_from(rest).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(b"mdat");
    } else {
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(b"mdat");
        out.extend_from_slice(&rest.to_be_bytes());
    }
}

/// How many different pictures JPEG photos start with.
const PICTURES: usize = 16;

/// Picture `i` of [`PICTURES`]: a 160×120 baseline JPEG without its SOI and JFIF APP0 (a
/// photo's own Exif APP1 goes there), from its DQT to its EOI. Made once per process.
fn picture(i: usize) -> &'static [u8] {
    static ALL: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        (0..PICTURES)
            .map(|n| {
                let (w, h) = (160u16, 120u16);
                let mut rgb = Vec::with_capacity(usize::from(w) * usize::from(h) * 3);
                for y in 0..h {
                    for x in 0..w {
                        // A sky-to-ground gradient tinted per picture, with a sun in a corner.
                        let (x, y, n) = (u32::from(x), u32::from(y), n as u32);
                        let sun = (x as i32 - 30 - 6 * n as i32).pow(2) + (y as i32 - 30).pow(2) < 200;
                        let (r, g, b) = if sun {
                            (250, 220, 90)
                        } else if y < 70 {
                            (60 + 8 * n, 120 + y, 200 + y / 2)
                        } else {
                            (40 + x / 4, 110 + 4 * n, 40 + (y - 70))
                        };
                        rgb.extend([r.min(255) as u8, g.min(255) as u8, b.min(255) as u8]);
                    }
                }
                let mut out = Vec::new();
                let encoder = jpeg_encoder::Encoder::new(&mut out, 80);
                // Encoding a small in-memory RGB buffer cannot fail; an empty picture would
                // still leave a well-formed (undecodable) photo.
                if encoder.encode(&rgb, w, h, jpeg_encoder::ColorType::Rgb).is_err() {
                    return vec![0xFF, 0xD9];
                }
                // Drop SOI and, if there, the JFIF APP0 segment.
                let mut at = 2;
                if out.get(2..4) == Some(&[0xFF, 0xE0]) {
                    at = 4 + usize::from(u16::from_be_bytes([out[4], out[5]]));
                }
                out.split_off(at)
            })
            .collect()
    });
    &all[i % PICTURES]
}

/// Header and trailer of a media file of `size` bytes.
fn media_parts(format: MediaFormat, size: u64, seed: u64) -> (Vec<u8>, Vec<u8>) {
    match format {
        MediaFormat::Bin => (Vec::new(), Vec::new()),
        MediaFormat::Jpeg => {
            let tiff = exif_tiff(&[(0x010F, "Apple"), (0x0110, "iPhone 15 Pro"), (0x0131, "18.5")], 1);
            let mut head = vec![0xFF, 0xD8, 0xFF, 0xE1];
            head.extend_from_slice(&u16::try_from(2 + 6 + tiff.len()).unwrap_or(u16::MAX).to_be_bytes());
            head.extend_from_slice(b"Exif\0\0");
            head.extend_from_slice(&tiff);
            head.extend_from_slice(picture((seed % PICTURES as u64) as usize));
            (head, vec![0xFF, 0xD9])
        }
        MediaFormat::Heic => {
            let mut head = Vec::new();
            let mut ftyp = b"heic\0\0\0\0".to_vec();
            for brand in [b"mif1", b"MiHE", b"MiPr", b"miaf", b"MiHB", b"heic"] {
                ftyp.extend_from_slice(brand);
            }
            bmff_box(&mut head, b"ftyp", &ftyp);
            let mut hdlr = vec![0u8; 8];
            hdlr.extend_from_slice(b"pict");
            hdlr.extend_from_slice(&[0u8; 13]);
            let mut meta = vec![0u8; 4];
            bmff_box(&mut meta, b"hdlr", &hdlr);
            bmff_box(&mut head, b"meta", &meta);
            mdat_header(&mut head, size, 0);
            (head, Vec::new())
        }
        MediaFormat::Mov => {
            let mut head = Vec::new();
            bmff_box(&mut head, b"ftyp", b"qt  \0\0\0\0qt  ");
            bmff_box(&mut head, b"wide", b"");
            let mut mvhd = vec![0u8; 12];
            mvhd.extend_from_slice(&600u32.to_be_bytes());
            let seconds = u32::try_from(size / 1_500_000 + 1).unwrap_or(u32::MAX / 600);
            mvhd.extend_from_slice(&seconds.saturating_mul(600).to_be_bytes());
            mvhd.extend_from_slice(&[0x00, 0x01, 0x00, 0x00, 0x01, 0x00]);
            mvhd.extend_from_slice(&[0u8; 10]);
            for m in [0x0001_0000u32, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000] {
                mvhd.extend_from_slice(&m.to_be_bytes());
            }
            mvhd.extend_from_slice(&[0u8; 24]);
            mvhd.extend_from_slice(&2u32.to_be_bytes());
            let mut moov_payload = Vec::new();
            bmff_box(&mut moov_payload, b"mvhd", &mvhd);
            let mut tail = Vec::new();
            bmff_box(&mut tail, b"moov", &moov_payload);
            mdat_header(&mut head, size, tail.len() as u64);
            (head, tail)
        }
    }
}

/// A big-endian TIFF structure with one IFD: ASCII entries (tags ascending) and Orientation.
fn exif_tiff(ascii: &[(u16, &str)], orientation: u16) -> Vec<u8> {
    let n = ascii.len() + 1;
    let data_start = 8 + 2 + 12 * n + 4;
    let mut ifd = Vec::new();
    let mut data = Vec::new();
    ifd.extend_from_slice(&u16::try_from(n).unwrap_or(0).to_be_bytes());
    let mut entries: Vec<(u16, Option<&str>)> = ascii.iter().map(|(t, s)| (*t, Some(*s))).collect();
    entries.push((0x0112, None));
    entries.sort_by_key(|e| e.0);
    for (tag, value) in entries {
        ifd.extend_from_slice(&tag.to_be_bytes());
        match value {
            Some(s) => {
                let mut bytes = s.as_bytes().to_vec();
                bytes.push(0);
                ifd.extend_from_slice(&2u16.to_be_bytes());
                ifd.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(0).to_be_bytes());
                if bytes.len() <= 4 {
                    bytes.resize(4, 0);
                    ifd.extend_from_slice(&bytes);
                } else {
                    ifd.extend_from_slice(&u32::try_from(data_start + data.len()).unwrap_or(0).to_be_bytes());
                    data.extend_from_slice(&bytes);
                    if data.len() % 2 == 1 {
                        data.push(0);
                    }
                }
            }
            None => {
                ifd.extend_from_slice(&3u16.to_be_bytes());
                ifd.extend_from_slice(&1u32.to_be_bytes());
                ifd.extend_from_slice(&orientation.to_be_bytes());
                ifd.extend_from_slice(&[0, 0]);
            }
        }
    }
    ifd.extend_from_slice(&0u32.to_be_bytes());
    let mut tiff = b"MM\0\x2A\0\0\0\x08".to_vec();
    tiff.extend_from_slice(&ifd);
    tiff.extend_from_slice(&data);
    tiff
}

// ---------------------------------------------------------------------------------------
// Text and plist bodies

/// Sentences that text bodies are made of (built once, the same everywhere).
fn line_pool() -> &'static [String] {
    static POOL: OnceLock<Vec<String>> = OnceLock::new();
    POOL.get_or_init(|| {
        let mut rng = Rng::new(0x7e57_7e57);
        (0..2048)
            .map(|_| {
                let mut line = capitalize(&rng.words(5, 15));
                if rng.chance(0.2) {
                    line.push(',');
                    line.push(' ');
                    line.push_str(&rng.words(2, 6));
                }
                line.push('.');
                line
            })
            .collect()
    })
}

/// [`WORDS`], capitalized (plist keys are made of them).
fn capitalized_words() -> &'static [String] {
    static WORDS_CAPITALIZED: OnceLock<Vec<String>> = OnceLock::new();
    WORDS_CAPITALIZED.get_or_init(|| WORDS.iter().map(|w| capitalize(w)).collect())
}

/// Unix seconds as `YYYY-MM-DD hh:mm:ss` (UTC).
fn civil(t: i64) -> String {
    let days = t.div_euclid(DAY);
    let secs = t.rem_euclid(DAY);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// Exactly `size` bytes of text (capped at 64 MiB; `open` reports a mismatch beyond that).
fn text_bytes(kind: TextKind, seed: u64, size: u64) -> Vec<u8> {
    let n = usize::try_from(size.min(64 << 20)).unwrap_or(0);
    let lines = line_pool();
    let mut rng = Rng::new(mix(seed, tag::TEXT));
    let mut out: Vec<u8> = Vec::with_capacity(n + 512);
    match kind {
        TextKind::Prose => {
            while out.len() < n {
                out.extend_from_slice(rng.pick(lines).as_bytes());
                out.push(if rng.chance(0.15) { b'\n' } else { b' ' });
            }
        }
        TextKind::Log => {
            let mut t = YEAR_START + rng.below((YEAR_END - YEAR_START) as u64) as i64;
            let component = *rng.pick(WORDS);
            while out.len() < n {
                t += rng.below(900) as i64;
                let level = *rng.pick(&["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"]);
                let line = format!("{}.{:03} [{level}] {component}: {}\n", civil(t), rng.below(1000), rng.pick(lines));
                out.extend_from_slice(line.as_bytes());
            }
        }
        TextKind::Json => {
            out.extend_from_slice(b"[\n");
            let mut id = rng.below(100_000);
            let mut first = true;
            loop {
                id += 1 + rng.below(5);
                let object = format!(
                    "  {{\n    \"id\": {id},\n    \"title\": \"{}\",\n    \"updated\": \"{}\",\n    \"read\": {},\n    \"text\": \"{}\"\n  }}",
                    capitalize(&rng.words(2, 5)),
                    civil(YEAR_START + rng.below((YEAR_END - YEAR_START) as u64) as i64),
                    rng.chance(0.5),
                    rng.pick(lines),
                );
                let separator = if first { 0 } else { 2 };
                if out.len() + separator + object.len() + 3 > n {
                    break;
                }
                if !first {
                    out.extend_from_slice(b",\n");
                }
                out.extend_from_slice(object.as_bytes());
                first = false;
            }
            out.resize(n.saturating_sub(3).max(out.len()), b' ');
            out.extend_from_slice(b"\n]\n");
        }
    }
    out.truncate(n);
    out
}

/// A plist body: preferences or a keychain, binary or XML.
fn plist_bytes(kind: PlistKind, seed: u64, entries: u32, xml: bool) -> Result<Vec<u8>, plist::Error> {
    let mut rng = Rng::new(mix(seed, tag::PLIST));
    let root = match kind {
        PlistKind::Prefs => Value::Dictionary(prefs_dict(&mut rng, entries, 0)),
        PlistKind::Keychain => keychain(&mut rng, entries),
    };
    let mut out = Vec::new();
    if xml {
        root.to_writer_xml(&mut out)?;
    } else {
        root.to_writer_binary(&mut out)?;
    }
    Ok(out)
}

fn plist_date(t: i64) -> Value {
    Value::Date((SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0).unsigned_abs())).into())
}

fn random_time(rng: &mut Rng) -> i64 {
    YEAR_START - 200 * DAY + rng.below((YEAR_END - YEAR_START + 200 * DAY) as u64) as i64
}

fn prefs_dict(rng: &mut Rng, entries: u32, depth: u32) -> Dictionary {
    let mut d = Dictionary::new();
    for i in 0..entries {
        let capitalized = capitalized_words();
        let mut key = format!("{}{}", rng.pick(capitalized), rng.pick(capitalized));
        if d.contains_key(&key) {
            key.push_str(&i.to_string());
        }
        let value = match rng.below(if depth < 2 { 10 } else { 8 }) {
            0 | 1 => Value::Boolean(rng.chance(0.5)),
            2 => Value::Integer(rng.below(1_000).into()),
            3 => Value::Integer(random_time(rng).into()),
            4 => Value::Real((rng.unit() * 100_000.0).round() / 100.0),
            5 => Value::String(rng.words(1, 4)),
            6 => plist_date(random_time(rng)),
            7 => Value::Data((0..rng.range(8, 48)).map(|_| rng.next() as u8).collect()),
            8 => Value::Array((0..rng.range(1, 6)).map(|_| Value::String(rng.words(1, 3))).collect()),
            _ => {
                let n = rng.range(2, 7) as u32;
                Value::Dictionary(prefs_dict(rng, n, depth + 1))
            }
        };
        d.insert(key, value);
    }
    d
}

fn keychain(rng: &mut Rng, items: u32) -> Value {
    let mut root = Dictionary::new();
    for (class, share) in [("genp", 50u32), ("inet", 25), ("keys", 15), ("cert", 10)] {
        let n = (items * share).div_ceil(100);
        let list = (0..n)
            .map(|_| {
                let (bundle, _) = *rng.pick(APPS);
                let mut item = Dictionary::new();
                item.insert("acct".into(), Value::String(rng.words(1, 2).replace(' ', ".")));
                item.insert("agrp".into(), Value::String(format!("{:010X}.{bundle}", rng.next() >> 24)));
                item.insert("cdat".into(), plist_date(random_time(rng)));
                item.insert("mdat".into(), plist_date(random_time(rng)));
                item.insert("pdmn".into(), Value::String((*rng.pick(&["ak", "ck", "dk", "aku"])).into()));
                item.insert("svce".into(), Value::String(format!("{bundle}.{}", rng.pick(WORDS))));
                item.insert("sync".into(), Value::Integer(0u64.into()));
                item.insert("tomb".into(), Value::Integer(0u64.into()));
                let len = rng.range(64, 700);
                item.insert("v_Data".into(), Value::Data((0..len).map(|_| rng.next() as u8).collect()));
                item.insert("v_PersistentRef".into(), Value::Data(rng.next().to_le_bytes().to_vec()));
                Value::Dictionary(item)
            })
            .collect();
        root.insert(class.into(), Value::Array(list));
    }
    Value::Dictionary(root)
}

// ---------------------------------------------------------------------------------------
// SQLite bodies

/// Builds a database in a private temporary file (rollback journal, so one self-contained
/// file) and returns its bytes. The same statements give the same bytes.
fn sqlite_bytes(
    build: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<(), ContentError>,
) -> Result<Vec<u8>, ContentError> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("db.sqlite");
    let mut conn = rusqlite::Connection::open(&path)?;
    conn.execute_batch("PRAGMA page_size = 4096; PRAGMA journal_mode = DELETE; PRAGMA synchronous = OFF;")?;
    let tx = conn.transaction()?;
    build(&tx)?;
    tx.commit()?;
    conn.close().map_err(|(_, e)| e)?;
    Ok(std::fs::read(&path)?)
}

/// A Core Data `Z_METADATA` plist.
fn core_data_metadata(seed: u64) -> Result<Vec<u8>, ContentError> {
    let mut d = Dictionary::new();
    d.insert("NSPersistenceFrameworkVersion".into(), Value::Integer(1_414u64.into()));
    d.insert("NSStoreType".into(), Value::String("SQLite".into()));
    d.insert("NSStoreUUID".into(), Value::String(guid(seed)));
    let mut out = Vec::new();
    Value::Dictionary(d).to_writer_binary(&mut out)?;
    Ok(out)
}

/// An upper-case UUID string from a seed.
fn guid(seed: u64) -> String {
    let a = mix(seed, 1);
    let b = mix(seed, 2);
    format!(
        "{:08X}-{:04X}-4{:03X}-{:04X}-{:012X}",
        a >> 32,
        (a >> 16) & 0xFFFF,
        a & 0xFFF,
        0x8000 | (b >> 48) & 0x3FFF,
        b & 0xFFFF_FFFF_FFFF
    )
}

/// An SQLite integer (saturating: SQLite integers are signed 64-bit).
fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn phone_number(r: u64, n: u64) -> String {
    let last = n.wrapping_mul(7_919) % 10_000_000;
    format!("+1{}{:07}", 201 + (r >> 8) % 780, last)
}

impl Content {
    /// The bytes of a database body.
    fn db_bytes(&self, db: DbKind, seed: u64, rows: u32) -> Result<Vec<u8>, ContentError> {
        sqlite_bytes(|tx| match db {
            DbKind::Sms => self.fill_sms(tx, rows),
            DbKind::AddressBook => self.fill_address_book(tx, rows),
            DbKind::AddressBookImages => self.fill_address_book_images(tx, rows),
            DbKind::CallHistory => self.fill_call_history(tx, rows),
            DbKind::Photos => self.fill_photos(tx, rows),
            DbKind::SafariHistory => self.fill_safari(tx, rows),
            DbKind::App => fill_app(tx, seed, rows),
        })
    }

    fn sms_handle(&self, h: u32) -> (String, &'static str) {
        let r = mix(mix(self.seed, tag::HANDLE), u64::from(h));
        if r.is_multiple_of(5) {
            let first = FIRST_NAMES[(r >> 8) as usize % FIRST_NAMES.len()].to_ascii_lowercase();
            let last = LAST_NAMES[(r >> 20) as usize % LAST_NAMES.len()].to_ascii_lowercase();
            (format!("{first}.{last}{h}@icloud.com"), "iMessage")
        } else {
            (phone_number(r, u64::from(h)), if (r >> 40) % 10 < 7 { "iMessage" } else { "SMS" })
        }
    }

    fn fill_sms(&self, tx: &rusqlite::Transaction<'_>, rows: u32) -> Result<(), ContentError> {
        tx.execute_batch(SMS_DDL)?;
        let s = mix(self.seed, tag::SMS);
        let times = self.state.messages.times(s);
        let mut attachments: BTreeMap<u32, Vec<(&FileKey, &FileEntry)>> = BTreeMap::new();
        let start = FileKey::new(MEDIA, ATTACHMENTS_PREFIX);
        for (k, e) in
            self.files.range(start..).take_while(|(k, _)| k.domain == MEDIA && k.path.starts_with(ATTACHMENTS_PREFIX))
        {
            if let Some(m) = attachment_message(self.seed, &k.path)
                && (1..=rows).contains(&m)
            {
                attachments.entry(m).or_default().push((k, e));
            }
        }
        let handles = 1 + rows / 25;
        let mut services = Vec::with_capacity(handles as usize);
        {
            let mut handle = tx.prepare(
                "INSERT INTO handle (ROWID, id, country, service, uncanonicalized_id) VALUES (?1, ?2, 'us', ?3, ?4)",
            )?;
            let mut chat = tx.prepare(
                "INSERT INTO chat (ROWID, guid, style, state, account_id, chat_identifier, service_name, \
                 account_login, is_archived, last_read_message_timestamp, display_name) \
                 VALUES (?1, ?2, 45, 3, ?3, ?4, ?5, 'E:me@icloud.com', 0, 0, '')",
            )?;
            let mut join = tx.prepare("INSERT INTO chat_handle_join (chat_id, handle_id) VALUES (?1, ?1)")?;
            for h in 1..=handles {
                let (id, service) = self.sms_handle(h);
                let raw = id.trim_start_matches("+1").to_owned();
                handle.execute(rusqlite::params![h, id, service, raw])?;
                chat.execute(rusqlite::params![
                    h,
                    format!("{service};-;{id}"),
                    guid(mix(s, u64::from(h))),
                    id,
                    service
                ])?;
                join.execute([h])?;
                services.push(service);
            }
        }
        let mut message = tx.prepare(
            "INSERT INTO message (ROWID, guid, text, handle_id, service, account, account_guid, date, date_read, \
             date_delivered, is_delivered, is_finished, is_from_me, is_read, is_sent, cache_has_attachments, \
             item_type, version, type, attributedBody) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'E:me@icloud.com', ?6, ?7, ?8, ?9, 1, 1, ?10, ?11, ?12, ?13, 0, 10, 0, ?14)",
        )?;
        let mut chat_message =
            tx.prepare("INSERT INTO chat_message_join (chat_id, message_id, message_date) VALUES (?1, ?2, ?3)")?;
        let mut attachment = tx.prepare(
            "INSERT INTO attachment (ROWID, guid, created_date, start_date, filename, uti, mime_type, \
             transfer_state, is_outgoing, transfer_name, total_bytes, is_sticker, hide_attachment) \
             VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6, 5, ?7, ?8, ?9, 0, 0)",
        )?;
        let mut message_attachment =
            tx.prepare("INSERT INTO message_attachment_join (message_id, attachment_id) VALUES (?1, ?2)")?;
        let account = guid(mix(s, 0));
        let mut attachment_id = 0u32;
        for r in 1..=rows {
            let mut rng = Rng::new(mix(s, u64::from(r)));
            let h = 1 + rng.below(1 + u64::from(r) / 25) as u32;
            let from_me = rng.chance(0.45);
            let t = times.get(r as usize - 1).copied().unwrap_or(self.state.clock);
            let date = (t - APPLE_EPOCH) * 1_000_000_000 + rng.below(1_000_000_000) as i64;
            let delivered = date + rng.range(1, 5_000_000_000) as i64;
            let read = if from_me { 0 } else { delivered + rng.range(1, 600_000_000_000) as i64 };
            let files = attachments.get(&r);
            let text = match files {
                Some(_) => "\u{FFFC}".to_owned(),
                // Attacker-controlled text, as anyone can send a phone: shown, never run.
                None if r == 1 => HOSTILE_MESSAGE.to_owned(),
                None => {
                    let n = rng.range(1, 4);
                    (0..n).map(|_| *rng.pick(SMS_PHRASES)).collect::<Vec<_>>().join(" ")
                }
            };
            // Newer iOS often leaves `text` NULL and keeps the body only in `attributedBody`.
            let (text, body) = match files {
                None if r % 5 == 3 => (None, Some(attributed_body(&text))),
                _ => (Some(text), None),
            };
            let service = services.get(h as usize - 1).copied().unwrap_or("iMessage");
            message.execute(rusqlite::params![
                r,
                guid(rng.next()),
                text,
                h,
                service,
                account,
                date,
                read,
                delivered,
                from_me,
                !from_me,
                from_me,
                files.is_some(),
                body
            ])?;
            chat_message.execute(rusqlite::params![h, r, date])?;
            for (key, entry) in files.into_iter().flatten() {
                attachment_id += 1;
                let name = key.path.rsplit('/').next().unwrap_or_default();
                let dir_guid =
                    key.path.strip_prefix(ATTACHMENTS_PREFIX).and_then(|p| p.split('/').nth(2)).unwrap_or_default();
                let (uti, mime) = match camera_kind(name) {
                    Some(true) => ("com.apple.quicktime-movie", "video/quicktime"),
                    _ if name.ends_with(".HEIC") => ("public.heic", "image/heic"),
                    _ => ("public.jpeg", "image/jpeg"),
                };
                attachment.execute(rusqlite::params![
                    attachment_id,
                    format!("at_0_{dir_guid}"),
                    t - APPLE_EPOCH,
                    format!("~/{}", key.path),
                    uti,
                    mime,
                    from_me,
                    name,
                    sql_int(entry.size)
                ])?;
                message_attachment.execute([r, attachment_id])?;
            }
        }
        Ok(())
    }

    fn fill_address_book(&self, tx: &rusqlite::Transaction<'_>, rows: u32) -> Result<(), ContentError> {
        tx.execute_batch(ADDRESS_BOOK_DDL)?;
        let s = mix(self.seed, tag::CONTACT);
        let times = self.state.contacts.times(s);
        let mut person = tx.prepare(
            "INSERT INTO ABPerson (ROWID, First, Last, Middle, Organization, Department, Note, Kind, JobTitle, \
             Nickname, FirstSort, LastSort, CreationDate, ModificationDate, CompositeNameFallback, StoreID, \
             DisplayName, guid) VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6, 0, ?7, NULL, ?8, ?9, ?10, ?11, NULL, 0, ?12, ?13)",
        )?;
        let mut value = tx.prepare(
            "INSERT INTO ABMultiValue (UID, record_id, property, identifier, label, value, guid) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let mut uid = 0u32;
        for r in 1..=rows {
            let mut rng = Rng::new(mix(s, u64::from(r)));
            let picked = *rng.pick(FIRST_NAMES);
            // One contact named by someone hostile (a shared contact card can be): shown, never run.
            let first = if r == 2 { HOSTILE_CONTACT } else { picked };
            let last = *rng.pick(LAST_NAMES);
            let middle = rng.chance(0.15).then(|| *rng.pick(FIRST_NAMES));
            let organization = rng.chance(0.3).then(|| *rng.pick(COMPANIES));
            let job = rng.chance(0.2).then(|| capitalize(&rng.words(1, 2)));
            let note = rng.chance(0.1).then(|| rng.pick(line_pool()).clone());
            let created = times.get(r as usize - 1).copied().unwrap_or(self.state.clock) - APPLE_EPOCH;
            let modified = created + rng.below(30 * DAY as u64) as i64;
            person.execute(rusqlite::params![
                r,
                first,
                last,
                middle,
                organization,
                note,
                job,
                format!("{first} {last}").to_lowercase(),
                format!("{last} {first}").to_lowercase(),
                created,
                modified,
                format!("{first} {last}"),
                guid(rng.next())
            ])?;
            for i in 0..rng.range(1, 3) {
                uid += 1;
                let label = rng.range(1, 4);
                let number = phone_number(rng.next(), u64::from(uid));
                value.execute(rusqlite::params![uid, r, 3, sql_int(i), sql_int(label), number, guid(rng.next())])?;
            }
            if rng.chance(0.5) {
                uid += 1;
                let email = format!("{}.{}@{}", first.to_lowercase(), last.to_lowercase(), rng.pick(MAIL_DOMAINS));
                value.execute(rusqlite::params![uid, r, 4, 0, sql_int(rng.range(2, 4)), email, guid(rng.next())])?;
            }
        }
        Ok(())
    }

    fn fill_address_book_images(&self, tx: &rusqlite::Transaction<'_>, rows: u32) -> Result<(), ContentError> {
        tx.execute_batch(ADDRESS_BOOK_IMAGES_DDL)?;
        let s = mix(self.seed, tag::IMAGE);
        let mut thumb = tx.prepare(
            "INSERT INTO ABThumbnailImage (ROWID, record_id, format, derived_from_format, data, crop_x, crop_y, \
             crop_width, crop_height) VALUES (?1, ?2, 0, 0, ?3, 0, 0, 320, 320)",
        )?;
        let mut full = tx.prepare(
            "INSERT INTO ABFullSizeImage (ROWID, record_id, crop_x, crop_y, crop_width, crop_height, data) \
             VALUES (?1, ?2, 0, 0, 1024, 1024, ?3)",
        )?;
        let mut full_id = 0u32;
        for i in 1..=rows {
            let mut rng = Rng::new(mix(s, u64::from(i)));
            let record = 4 * i - 3;
            let mut data = random_bytes(rng.next(), rng.range(3_000, 9_000) as usize);
            data[..3].copy_from_slice(&[0xFF, 0xD8, 0xFF]);
            thumb.execute(rusqlite::params![i, record, data])?;
            if i % 3 == 0 {
                full_id += 1;
                let mut data = random_bytes(rng.next(), rng.range(15_000, 40_000) as usize);
                data[..3].copy_from_slice(&[0xFF, 0xD8, 0xFF]);
                full.execute(rusqlite::params![full_id, record, data])?;
            }
        }
        Ok(())
    }

    fn fill_call_history(&self, tx: &rusqlite::Transaction<'_>, rows: u32) -> Result<(), ContentError> {
        tx.execute_batch(CALL_HISTORY_DDL)?;
        let s = mix(self.seed, tag::CALL);
        let times = self.state.calls.times(s);
        let mut call = tx.prepare(
            "INSERT INTO ZCALLRECORD (Z_PK, Z_ENT, Z_OPT, ZANSWERED, ZCALLTYPE, ZDISCONNECTED_CAUSE, \
             ZFACE_TIME_DATA, ZNUMBER_AVAILABILITY, ZORIGINATED, ZREAD, ZJUNKCONFIDENCE, \
             ZJUNKIDENTIFICATIONCATEGORY, ZDATE, ZDURATION, ZSPAM_SCORE, ZADDRESS, ZDEVICE_ID, \
             ZISO_COUNTRY_CODE, ZLOCATION, ZNAME, ZSERVICE_PROVIDER, ZUNIQUE_ID) \
             VALUES (?1, 2, 1, ?2, ?3, 0, NULL, 0, ?4, 1, 0, 0, ?5, ?6, 0, ?7, NULL, 'us', ?8, ?9, ?10, ?11)",
        )?;
        for r in 1..=rows {
            let mut rng = Rng::new(mix(s, u64::from(r)));
            let originated = rng.chance(0.5);
            let answered = originated || rng.chance(0.8);
            let facetime = rng.chance(0.2);
            let duration = if answered { (rng.exp_size(180, 1, 7_200) as f64) + rng.unit() } else { 0.0 };
            let t = times.get(r as usize - 1).copied().unwrap_or(self.state.clock);
            let date = (t - APPLE_EPOCH) as f64 + rng.unit();
            let (city, _, _) = *rng.pick(CITIES);
            let name = rng.chance(0.3).then(|| format!("{} {}", rng.pick(FIRST_NAMES), rng.pick(LAST_NAMES)));
            let address = phone_number(rng.next(), rng.below(10_000_000));
            call.execute(rusqlite::params![
                r,
                answered,
                if facetime { if rng.chance(0.5) { 8 } else { 16 } } else { 1 },
                originated,
                date,
                duration,
                address,
                city,
                name,
                if facetime { "com.apple.FaceTime" } else { "com.apple.Telephony" },
                guid(rng.next())
            ])?;
        }
        tx.execute("INSERT INTO Z_PRIMARYKEY VALUES (1, 'CallDBProperties', 0, 0), (2, 'CallRecord', 0, ?1)", [rows])?;
        tx.execute("INSERT INTO Z_METADATA VALUES (1, ?1, ?2)", rusqlite::params![guid(s), core_data_metadata(s)?])?;
        Ok(())
    }

    fn fill_photos(&self, tx: &rusqlite::Transaction<'_>, rows: u32) -> Result<(), ContentError> {
        tx.execute_batch(PHOTOS_DDL)?;
        let s = mix(self.seed, tag::ASSET);
        let mut asset = tx.prepare(
            "INSERT INTO ZASSET (Z_PK, Z_ENT, Z_OPT, ZCOMPLETE, ZFAVORITE, ZHIDDEN, ZKIND, ZKINDSUBTYPE, \
             ZPLAYBACKSTYLE, ZSAVEDASSETTYPE, ZTRASHEDSTATE, ZHEIGHT, ZWIDTH, ZORIENTATION, ZADDEDDATE, \
             ZDATECREATED, ZMODIFICATIONDATE, ZDURATION, ZLATITUDE, ZLONGITUDE, ZDIRECTORY, ZFILENAME, \
             ZUNIFORMTYPEIDENTIFIER, ZUUID, ZADDITIONALATTRIBUTES) \
             VALUES (?1, 3, 1, 1, ?2, 0, ?3, 0, ?4, 3, 0, ?5, ?6, ?7, ?8, ?8, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?1)",
        )?;
        let mut extra = tx.prepare(
            "INSERT INTO ZADDITIONALASSETATTRIBUTES (Z_PK, Z_ENT, Z_OPT, ZASSET, ZORIGINALFILESIZE, \
             ZORIGINALHEIGHT, ZORIGINALWIDTH, ZORIGINALFILENAME, ZTIMEZONENAME) \
             VALUES (?1, 1, 1, ?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let assets = self.camera_keys();
        let n = assets.len().min(rows as usize);
        for (i, (key, mtime)) in assets.iter().take(n).enumerate() {
            let pk = sql_int(i as u64 + 1);
            let mut rng = Rng::new(mix(s, first_u64(blake3::hash(key.path.as_bytes()).as_bytes())));
            let rest = key.path.strip_prefix("Media/").unwrap_or(&key.path);
            let (dir, name) = rest.rsplit_once('/').unwrap_or(("DCIM/100APPLE", rest));
            let video = camera_kind(name) == Some(true);
            let uti = match name.rsplit_once('.').map(|(_, e)| e) {
                Some("HEIC") => "public.heic",
                Some("PNG") => "public.png",
                Some("MOV") => "com.apple.quicktime-movie",
                _ => "public.jpeg",
            };
            let (mut w, mut h) = if video { (1920, 1080) } else { (4032, 3024) };
            let rotated = rng.chance(0.3);
            if rotated {
                std::mem::swap(&mut w, &mut h);
            }
            let size = self.files.get(key).map_or(0, |e| e.size);
            let date = (mtime - APPLE_EPOCH) as f64;
            let (_, lat, lon) = *rng.pick(CITIES);
            let duration = if video { size as f64 / 1_500_000.0 } else { 0.0 };
            asset.execute(rusqlite::params![
                pk,
                rng.chance(0.05),
                i64::from(video),
                if video { 4 } else { 1 },
                h,
                w,
                if rotated { 6 } else { 1 },
                date,
                duration,
                lat + (rng.unit() - 0.5) * 0.1,
                lon + (rng.unit() - 0.5) * 0.1,
                dir,
                name,
                uti,
                guid(rng.next())
            ])?;
            extra.execute(rusqlite::params![pk, sql_int(size), h, w, name, "America/Los_Angeles"])?;
        }
        tx.execute(
            "INSERT INTO Z_PRIMARYKEY VALUES (1, 'AdditionalAssetAttributes', 0, ?1), (3, 'Asset', 0, ?1)",
            [sql_int(n as u64)],
        )?;
        tx.execute("INSERT INTO Z_METADATA VALUES (1, ?1, ?2)", rusqlite::params![guid(s), core_data_metadata(s)?])?;
        Ok(())
    }

    fn fill_safari(&self, tx: &rusqlite::Transaction<'_>, rows: u32) -> Result<(), ContentError> {
        tx.execute_batch(SAFARI_DDL)?;
        let s = mix(self.seed, tag::VISIT);
        let times = self.state.visits.times(s);
        // Visit v goes to URL number u from a pool that grows with v; items get ids in the
        // order of their first visit.
        let mut items: HashMap<u64, (u32, u32)> = HashMap::new();
        let mut order: Vec<u64> = Vec::new();
        let mut visits = Vec::with_capacity(rows as usize);
        for v in 1..=rows {
            let mut rng = Rng::new(mix(s, u64::from(v)));
            let u = 1 + rng.below(1 + u64::from(v) / 2);
            let next_id = order.len() as u32 + 1;
            let item = items.entry(u).or_insert_with(|| {
                order.push(u);
                (next_id, 0)
            });
            item.1 += 1;
            let t = times.get(v as usize - 1).copied().unwrap_or(self.state.clock);
            visits.push((item.0, (t - APPLE_EPOCH) as f64 + rng.unit(), u));
        }
        {
            let mut insert = tx.prepare(
                "INSERT INTO history_items (id, url, domain_expansion, visit_count, daily_visit_counts, \
                 should_recompute_derived_visit_counts, visit_count_score, status_code) \
                 VALUES (?1, ?2, ?3, ?4, X'', 0, ?5, 0)",
            )?;
            for u in &order {
                let (id, count) = items[u];
                let (site, expansion) = site_of(s, *u);
                insert.execute(rusqlite::params![
                    id,
                    url_of(s, *u, (site, expansion)),
                    expansion,
                    count,
                    count * 100
                ])?;
            }
        }
        let mut insert = tx.prepare(
            "INSERT INTO history_visits (id, history_item, visit_time, title, load_successful, http_non_get, \
             synthesized, origin, generation, attributes, score) VALUES (?1, ?2, ?3, ?4, 1, 0, 0, 0, 0, 0, 100)",
        )?;
        for (i, (item, time, u)) in visits.into_iter().enumerate() {
            let mut rng = Rng::new(mix(mix(s, tag::TITLE), u));
            let title = capitalize(&rng.words(2, 7));
            insert.execute(rusqlite::params![sql_int(i as u64 + 1), item, time, title])?;
        }
        Ok(())
    }
}

/// The site of Safari URL number `u`: (host, domain_expansion).
fn site_of(seed: u64, u: u64) -> (&'static str, &'static str) {
    SITES[(mix(seed, u) % SITES.len() as u64) as usize]
}

fn url_of(seed: u64, u: u64, (host, _): (&str, &str)) -> String {
    let mut rng = Rng::new(mix(mix(seed, tag::URL), u));
    format!("https://{host}/{}-{u}", rng.words(1, 4).replace(' ', "-"))
}

/// An app's Core Data store: `ZITEM` rows from `seed`.
fn fill_app(tx: &rusqlite::Transaction<'_>, seed: u64, rows: u32) -> Result<(), ContentError> {
    tx.execute_batch(APP_DDL)?;
    let s = mix(seed, tag::APP_ROW);
    let mut item = tx.prepare(
        "INSERT INTO ZITEM (Z_PK, Z_ENT, Z_OPT, ZFLAGGED, ZCREATED, ZMODIFIED, ZIDENTIFIER, ZTITLE, ZBODY, ZPAYLOAD) \
         VALUES (?1, 1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for r in 1..=rows {
        let mut rng = Rng::new(mix(s, u64::from(r)));
        let created = (random_time(&mut rng) - APPLE_EPOCH) as f64;
        let modified = created + rng.below(90 * DAY as u64) as f64;
        let body = (0..rng.range(1, 4)).map(|_| rng.pick(line_pool()).as_str()).collect::<Vec<_>>().join(" ");
        let payload: Vec<u8> = (0..rng.below(120)).map(|_| rng.next() as u8).collect();
        item.execute(rusqlite::params![
            r,
            sql_int(1 + rng.below(5)),
            rng.chance(0.1),
            created,
            modified,
            guid(rng.next()),
            capitalize(&rng.words(2, 6)),
            body,
            payload
        ])?;
    }
    tx.execute("INSERT INTO Z_PRIMARYKEY VALUES (1, 'Item', 0, ?1)", [rows])?;
    tx.execute("INSERT INTO Z_METADATA VALUES (1, ?1, ?2)", rusqlite::params![guid(s), core_data_metadata(s)?])?;
    Ok(())
}

const SMS_DDL: &str = "
CREATE TABLE _SqliteDatabaseProperties (key TEXT, value TEXT, UNIQUE(key));
CREATE TABLE handle (ROWID INTEGER PRIMARY KEY AUTOINCREMENT UNIQUE, id TEXT NOT NULL, country TEXT, service TEXT NOT NULL, uncanonicalized_id TEXT, person_centric_id TEXT, UNIQUE (id, service));
CREATE TABLE message (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, guid TEXT UNIQUE NOT NULL, text TEXT, replace INTEGER DEFAULT 0, service_center TEXT, handle_id INTEGER DEFAULT 0, subject TEXT, country TEXT, attributedBody BLOB, version INTEGER DEFAULT 0, type INTEGER DEFAULT 0, service TEXT, account TEXT, account_guid TEXT, error INTEGER DEFAULT 0, date INTEGER, date_read INTEGER, date_delivered INTEGER, is_delivered INTEGER DEFAULT 0, is_finished INTEGER DEFAULT 0, is_emote INTEGER DEFAULT 0, is_from_me INTEGER DEFAULT 0, is_empty INTEGER DEFAULT 0, is_delayed INTEGER DEFAULT 0, is_auto_reply INTEGER DEFAULT 0, is_prepared INTEGER DEFAULT 0, is_read INTEGER DEFAULT 0, is_system_message INTEGER DEFAULT 0, is_sent INTEGER DEFAULT 0, has_dd_results INTEGER DEFAULT 0, is_service_message INTEGER DEFAULT 0, is_forward INTEGER DEFAULT 0, was_downgraded INTEGER DEFAULT 0, is_archive INTEGER DEFAULT 0, cache_has_attachments INTEGER DEFAULT 0, cache_roomnames TEXT, was_data_detected INTEGER DEFAULT 0, was_deduplicated INTEGER DEFAULT 0, is_audio_message INTEGER DEFAULT 0, is_played INTEGER DEFAULT 0, date_played INTEGER, item_type INTEGER DEFAULT 0, other_handle INTEGER DEFAULT 0, group_title TEXT, group_action_type INTEGER DEFAULT 0, share_status INTEGER DEFAULT 0, share_direction INTEGER DEFAULT 0, is_expirable INTEGER DEFAULT 0, expire_state INTEGER DEFAULT 0, message_action_type INTEGER DEFAULT 0, message_source INTEGER DEFAULT 0, associated_message_guid TEXT, associated_message_type INTEGER DEFAULT 0, balloon_bundle_id TEXT, payload_data BLOB, expressive_send_style_id TEXT, associated_message_range_location INTEGER DEFAULT 0, associated_message_range_length INTEGER DEFAULT 0, time_expressive_send_played INTEGER, message_summary_info BLOB, thread_originator_guid TEXT, thread_originator_part TEXT, date_retracted INTEGER DEFAULT 0, date_edited INTEGER DEFAULT 0);
CREATE TABLE chat (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, guid TEXT UNIQUE NOT NULL, style INTEGER, state INTEGER, account_id TEXT, properties BLOB, chat_identifier TEXT, service_name TEXT, room_name TEXT, account_login TEXT, is_archived INTEGER DEFAULT 0, last_addressed_handle TEXT, display_name TEXT, group_id TEXT, is_filtered INTEGER DEFAULT 0, successful_query INTEGER, last_read_message_timestamp INTEGER DEFAULT 0);
CREATE TABLE attachment (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, guid TEXT UNIQUE NOT NULL, created_date INTEGER DEFAULT 0, start_date INTEGER DEFAULT 0, filename TEXT, uti TEXT, mime_type TEXT, transfer_state INTEGER DEFAULT 0, is_outgoing INTEGER DEFAULT 0, user_info BLOB, transfer_name TEXT, total_bytes INTEGER DEFAULT 0, is_sticker INTEGER DEFAULT 0, sticker_user_info BLOB, attribution_info BLOB, hide_attachment INTEGER DEFAULT 0);
CREATE TABLE chat_handle_join (chat_id INTEGER REFERENCES chat (ROWID) ON DELETE CASCADE, handle_id INTEGER REFERENCES handle (ROWID) ON DELETE CASCADE, UNIQUE(chat_id, handle_id));
CREATE TABLE chat_message_join (chat_id INTEGER REFERENCES chat (ROWID) ON DELETE CASCADE, message_id INTEGER REFERENCES message (ROWID) ON DELETE CASCADE, message_date INTEGER DEFAULT 0, PRIMARY KEY (chat_id, message_id));
CREATE TABLE message_attachment_join (message_id INTEGER REFERENCES message (ROWID) ON DELETE CASCADE, attachment_id INTEGER REFERENCES attachment (ROWID) ON DELETE CASCADE, UNIQUE(message_id, attachment_id));
CREATE TABLE deleted_messages (ROWID INTEGER PRIMARY KEY AUTOINCREMENT UNIQUE, guid TEXT NOT NULL);
CREATE INDEX message_idx_handle ON message(handle_id, date);
CREATE INDEX message_idx_date ON message(date);
CREATE INDEX chat_message_join_idx_message_date_id_chat_id ON chat_message_join(chat_id, message_date, message_id);
CREATE INDEX message_attachment_join_idx_message_id ON message_attachment_join(message_id);
INSERT INTO _SqliteDatabaseProperties VALUES ('_ClientVersion', '17055'), ('_UniqueIdentifier', 'A1B2C3D4-0000-4000-8000-000000000000');
";

const ADDRESS_BOOK_DDL: &str = "
CREATE TABLE _SqliteDatabaseProperties (key TEXT, value TEXT, UNIQUE(key));
CREATE TABLE ABPerson (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, First TEXT, Last TEXT, Middle TEXT, FirstPhonetic TEXT, MiddlePhonetic TEXT, LastPhonetic TEXT, Organization TEXT, Department TEXT, Note TEXT, Kind INTEGER, Birthday TEXT, JobTitle TEXT, Nickname TEXT, Prefix TEXT, Suffix TEXT, FirstSort TEXT, LastSort TEXT, CreationDate INTEGER, ModificationDate INTEGER, CompositeNameFallback TEXT, ExternalIdentifier TEXT, ExternalModificationTag TEXT, ExternalUUID TEXT, StoreID INTEGER, DisplayName TEXT, ExternalRepresentation BLOB, FirstSortSection TEXT, LastSortSection TEXT, FirstSortLanguageIndex INTEGER DEFAULT 2147483647, LastSortLanguageIndex INTEGER DEFAULT 2147483647, PersonLink INTEGER DEFAULT -1, ImageURI TEXT, IsPreferredName INTEGER DEFAULT 1, guid TEXT, PhonemeData TEXT, AlternateBirthday TEXT, MapsData TEXT, FirstPronunciation TEXT, MiddlePronunciation TEXT, LastPronunciation TEXT, OrganizationPhonetic TEXT, OrganizationPronunciation TEXT, PreviousFamilyName TEXT, PreferredLikenessSource TEXT, PreferredPersonaIdentifier TEXT);
CREATE TABLE ABMultiValue (UID INTEGER PRIMARY KEY, record_id INTEGER, property INTEGER, identifier INTEGER, label INTEGER, value TEXT, guid TEXT);
CREATE TABLE ABMultiValueLabel (value TEXT, UNIQUE(value));
CREATE TABLE ABMultiValueEntry (parent_id INTEGER, key INTEGER, value TEXT, UNIQUE(parent_id, key));
CREATE TABLE ABGroup (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, Name TEXT, ExternalIdentifier TEXT, StoreID INTEGER, guid TEXT);
CREATE TABLE ABGroupMembers (UID INTEGER PRIMARY KEY, group_id INTEGER, member_type INTEGER, member_id INTEGER, UNIQUE(group_id, member_type, member_id));
CREATE TABLE ABStore (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, Name TEXT, ExternalIdentifier TEXT, Type INTEGER, Enabled INTEGER DEFAULT 1, guid TEXT);
CREATE INDEX ABMultiValueRecordIDIndex ON ABMultiValue(record_id);
CREATE INDEX ABPersonCreationDateIndex ON ABPerson(CreationDate);
INSERT INTO ABMultiValueLabel VALUES ('_$!<Mobile>!$_'), ('_$!<Home>!$_'), ('_$!<Work>!$_'), ('iPhone');
INSERT INTO ABStore (ROWID, Name, Type, Enabled) VALUES (0, 'Local', 0, 1);
INSERT INTO _SqliteDatabaseProperties VALUES ('__ABPersonSortOrdering', '0'), ('__ABDataBaseVersion', '1905');
";

const ADDRESS_BOOK_IMAGES_DDL: &str = "
CREATE TABLE _SqliteDatabaseProperties (key TEXT, value TEXT, UNIQUE(key));
CREATE TABLE ABThumbnailImage (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, record_id INTEGER, format INTEGER, derived_from_format INTEGER, data BLOB, crop_x INTEGER, crop_y INTEGER, crop_width INTEGER, crop_height INTEGER, UNIQUE(record_id, format));
CREATE TABLE ABFullSizeImage (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, record_id INTEGER, crop_x INTEGER, crop_y INTEGER, crop_width INTEGER, crop_height INTEGER, data BLOB, UNIQUE(record_id));
INSERT INTO _SqliteDatabaseProperties VALUES ('__ABImageDataBaseVersion', '1905');
";

const CALL_HISTORY_DDL: &str = "
CREATE TABLE ZCALLRECORD (Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER, ZANSWERED INTEGER, ZCALLTYPE INTEGER, ZDISCONNECTED_CAUSE INTEGER, ZFACE_TIME_DATA BLOB, ZNUMBER_AVAILABILITY INTEGER, ZORIGINATED INTEGER, ZREAD INTEGER, ZJUNKCONFIDENCE INTEGER, ZJUNKIDENTIFICATIONCATEGORY INTEGER, ZDATE TIMESTAMP, ZDURATION FLOAT, ZSPAM_SCORE FLOAT, ZADDRESS VARCHAR, ZDEVICE_ID VARCHAR, ZISO_COUNTRY_CODE VARCHAR, ZLOCATION VARCHAR, ZNAME VARCHAR, ZSERVICE_PROVIDER VARCHAR, ZUNIQUE_ID VARCHAR);
CREATE INDEX ZCALLRECORD_ZDATE_INDEX ON ZCALLRECORD (ZDATE);
CREATE INDEX ZCALLRECORD_ZUNIQUE_ID_INDEX ON ZCALLRECORD (ZUNIQUE_ID);
CREATE TABLE ZCALLDBPROPERTIES (Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER, ZKEY VARCHAR, ZVALUE VARCHAR);
CREATE TABLE Z_PRIMARYKEY (Z_ENT INTEGER PRIMARY KEY, Z_NAME VARCHAR, Z_SUPER INTEGER, Z_MAX INTEGER);
CREATE TABLE Z_METADATA (Z_VERSION INTEGER PRIMARY KEY, Z_UUID VARCHAR(255), Z_PLIST BLOB);
CREATE TABLE Z_MODELCACHE (Z_CONTENT BLOB);
";

const PHOTOS_DDL: &str = "
CREATE TABLE ZASSET (Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER, ZCOMPLETE INTEGER, ZFAVORITE INTEGER, ZHIDDEN INTEGER, ZKIND INTEGER, ZKINDSUBTYPE INTEGER, ZPLAYBACKSTYLE INTEGER, ZSAVEDASSETTYPE INTEGER, ZTRASHEDSTATE INTEGER, ZHEIGHT INTEGER, ZWIDTH INTEGER, ZORIENTATION INTEGER, ZADDITIONALATTRIBUTES INTEGER, ZADDEDDATE TIMESTAMP, ZDATECREATED TIMESTAMP, ZMODIFICATIONDATE TIMESTAMP, ZTRASHEDDATE TIMESTAMP, ZDURATION FLOAT, ZLATITUDE FLOAT, ZLONGITUDE FLOAT, ZDIRECTORY VARCHAR, ZFILENAME VARCHAR, ZUNIFORMTYPEIDENTIFIER VARCHAR, ZUUID VARCHAR);
CREATE INDEX ZASSET_ZDATECREATED_INDEX ON ZASSET (ZDATECREATED);
CREATE INDEX ZASSET_ZADDITIONALATTRIBUTES_INDEX ON ZASSET (ZADDITIONALATTRIBUTES);
CREATE TABLE ZADDITIONALASSETATTRIBUTES (Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER, ZASSET INTEGER, ZORIGINALFILESIZE INTEGER, ZORIGINALHEIGHT INTEGER, ZORIGINALWIDTH INTEGER, ZORIGINALFILENAME VARCHAR, ZTIMEZONENAME VARCHAR);
CREATE INDEX ZADDITIONALASSETATTRIBUTES_ZASSET_INDEX ON ZADDITIONALASSETATTRIBUTES (ZASSET);
CREATE TABLE ZGENERICALBUM (Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER, ZKIND INTEGER, ZTITLE VARCHAR, ZUUID VARCHAR);
CREATE TABLE Z_PRIMARYKEY (Z_ENT INTEGER PRIMARY KEY, Z_NAME VARCHAR, Z_SUPER INTEGER, Z_MAX INTEGER);
CREATE TABLE Z_METADATA (Z_VERSION INTEGER PRIMARY KEY, Z_UUID VARCHAR(255), Z_PLIST BLOB);
";

const SAFARI_DDL: &str = "
CREATE TABLE history_items (id INTEGER PRIMARY KEY AUTOINCREMENT, url TEXT NOT NULL UNIQUE, domain_expansion TEXT NULL, visit_count INTEGER NOT NULL, daily_visit_counts BLOB NOT NULL, weekly_visit_counts BLOB NULL, autocomplete_triggers BLOB NULL, should_recompute_derived_visit_counts INTEGER NOT NULL, visit_count_score INTEGER NOT NULL, status_code INTEGER NOT NULL DEFAULT 0);
CREATE TABLE history_visits (id INTEGER PRIMARY KEY AUTOINCREMENT, history_item INTEGER NOT NULL REFERENCES history_items(id) ON DELETE CASCADE, visit_time REAL NOT NULL, title TEXT NULL, load_successful BOOLEAN NOT NULL DEFAULT 1, http_non_get BOOLEAN NOT NULL DEFAULT 0, synthesized BOOLEAN NOT NULL DEFAULT 0, redirect_source INTEGER NULL UNIQUE REFERENCES history_visits(id) ON DELETE CASCADE, redirect_destination INTEGER NULL UNIQUE REFERENCES history_visits(id) ON DELETE CASCADE, origin INTEGER NOT NULL DEFAULT 0, generation INTEGER NOT NULL DEFAULT 0, attributes INTEGER NOT NULL DEFAULT 0, score INTEGER NOT NULL DEFAULT 0);
CREATE TABLE history_tombstones (id INTEGER PRIMARY KEY AUTOINCREMENT, start_time REAL NOT NULL, end_time REAL NOT NULL, url TEXT, generation INTEGER NOT NULL DEFAULT 0);
CREATE TABLE metadata (key TEXT NOT NULL UNIQUE, value);
CREATE INDEX history_item__last_visit ON history_visits (history_item, visit_time DESC, synthesized ASC);
CREATE INDEX history_visits__last_visit ON history_visits (visit_time, load_successful DESC);
INSERT INTO metadata VALUES ('version', 20);
";

const APP_DDL: &str = "
CREATE TABLE ZITEM (Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER, ZFLAGGED INTEGER, ZCREATED TIMESTAMP, ZMODIFIED TIMESTAMP, ZIDENTIFIER VARCHAR, ZTITLE VARCHAR, ZBODY VARCHAR, ZPAYLOAD BLOB);
CREATE INDEX ZITEM_ZMODIFIED_INDEX ON ZITEM (ZMODIFIED);
CREATE TABLE Z_PRIMARYKEY (Z_ENT INTEGER PRIMARY KEY, Z_NAME VARCHAR, Z_SUPER INTEGER, Z_MAX INTEGER);
CREATE TABLE Z_METADATA (Z_VERSION INTEGER PRIMARY KEY, Z_UUID VARCHAR(255), Z_PLIST BLOB);
CREATE TABLE Z_MODELCACHE (Z_CONTENT BLOB);
";

// ---------------------------------------------------------------------------------------
// Vocabulary

/// Where the many small files go.
#[derive(Clone, Copy, Debug)]
enum Fill {
    Json,
    Log,
    Prose,
    Plist,
    Cache,
    Thumb,
    Data,
    Voicemail,
}

const APP_DIRS: &[(&str, Fill)] = &[
    ("Documents", Fill::Json),
    ("Documents", Fill::Data),
    ("Documents/Drafts", Fill::Prose),
    ("Documents/Exports", Fill::Json),
    ("Library/Application Support/Config", Fill::Json),
    ("Library/Application Support/Storage", Fill::Data),
    ("Library/Application Support/Logs", Fill::Log),
    ("Library/Application Support/ImageCache", Fill::Cache),
    ("Library/Application Support/ImageCache", Fill::Thumb),
    ("Library/Application Support/Media/Thumbnails", Fill::Thumb),
    ("Library/Application Support/Sync", Fill::Json),
    ("Library/Preferences", Fill::Plist),
];

const HOME_DIRS: &[(&str, Fill)] = &[
    ("Library/Voicemail", Fill::Voicemail),
    ("Library/Keyboard", Fill::Data),
    ("Library/Notes", Fill::Prose),
    ("Library/Logs/CrashReporter", Fill::Log),
    ("Library/Application Support/com.apple.remotemanagementd", Fill::Plist),
    ("Library/SMS/Drafts", Fill::Plist),
    ("Library/Mail", Fill::Json),
    ("Library/Shortcuts", Fill::Json),
];

/// Third-party apps: (bundle id, name).
const APPS: &[(&str, &str)] = &[
    ("net.whatsapp.WhatsApp", "WhatsApp"),
    ("com.spotify.client", "Spotify"),
    ("com.burbn.instagram", "Instagram"),
    ("com.google.Maps", "GoogleMaps"),
    ("org.whispersystems.signal", "Signal"),
    ("ph.telegra.Telegraph", "Telegram"),
    ("com.duolingo.DuolingoMobile", "Duolingo"),
    ("com.strava.stravaride", "Strava"),
    ("com.netflix.Netflix", "Netflix"),
    ("com.ubercab.UberClient", "Uber"),
    ("com.airbnb.app", "Airbnb"),
    ("com.getdropbox.Dropbox", "Dropbox"),
    ("com.microsoft.Office.Outlook", "Outlook"),
    ("com.google.Gmail", "Gmail"),
    ("com.facebook.Facebook", "Facebook"),
    ("com.facebook.Messenger", "Messenger"),
    ("com.toyopagroup.picaboo", "Snapchat"),
    ("com.zhiliaoapp.musically", "TikTok"),
    ("com.linkedin.LinkedIn", "LinkedIn"),
    ("com.amazon.Amazon", "Amazon"),
    ("com.evernote.iPhone.Evernote", "Evernote"),
    ("com.readdle.smartemail", "Spark"),
    ("com.agilebits.onepassword-ios", "1Password"),
    ("com.shazam.Shazam", "Shazam"),
    ("com.pinterest", "Pinterest"),
    ("com.reddit.Reddit", "Reddit"),
    ("com.yelp.yelpiphone", "Yelp"),
    ("com.booking.BookingApp", "Booking"),
    ("com.google.chrome.ios", "Chrome"),
    ("com.microsoft.skype.teams", "Teams"),
    ("us.zoom.videomeetings", "Zoom"),
    ("com.tinyspeck.chatlyio", "Slack"),
    ("com.apple.Pages", "Pages"),
    ("com.apple.Keynote", "Keynote"),
    ("com.headspace.headspace", "Headspace"),
    ("com.nike.nikeplus-gps", "NikeRunClub"),
    ("com.audible.iphone", "Audible"),
    ("com.waze.iphone", "Waze"),
    ("com.ebay.iphone", "eBay"),
    ("com.paypal.ppclient.touch", "PayPal"),
];

/// HomeDomain Library/Preferences files of a real phone.
const HOME_PREFS: &[&str] = &[
    "com.apple.springboard.plist",
    "com.apple.Preferences.plist",
    "com.apple.mobilesafari.plist",
    "com.apple.MobileSMS.plist",
    "com.apple.mobilephone.plist",
    "com.apple.Maps.plist",
    "com.apple.weather.plist",
    "com.apple.stocks.plist",
    "com.apple.mobilecal.plist",
    "com.apple.mobilenotes.plist",
    "com.apple.camera.plist",
    "com.apple.mobileslideshow.plist",
    "com.apple.AppStore.plist",
    "com.apple.Music.plist",
    "com.apple.podcasts.plist",
    "com.apple.news.plist",
    "com.apple.Health.plist",
    "com.apple.assistant.support.plist",
    "com.apple.keyboard.preferences.plist",
    "com.apple.locationd.plist",
    "com.apple.mobiletimer.plist",
    "com.apple.findmy.plist",
    "com.apple.facetime.plist",
    "com.apple.itunesstored.plist",
    "com.apple.Accessibility.plist",
    "com.apple.purplebuddy.plist",
    "com.apple.VoiceMemos.plist",
    "com.apple.mobilemail.plist",
    "com.apple.homesharing.plist",
    "com.apple.icloud.findmydeviced.plist",
    "com.apple.coreduetd.plist",
    "com.apple.UIKit.plist",
    "com.apple.Translate.plist",
    "com.apple.shortcuts.plist",
    "com.apple.tips.plist",
    "com.apple.iBooks.plist",
    "com.apple.reminders.plist",
    "com.apple.WebUI.plist",
    "com.apple.nanoregistryd.plist",
    "com.apple.Fitness.plist",
    "com.apple.TVRemote.plist",
    "com.apple.sharingd.plist",
    "com.apple.suggestions.plist",
    "com.apple.voiceservices.plist",
    "com.apple.mediaremote.plist",
    "com.apple.DataMigration.plist",
    "com.apple.corerecents.recentsd.plist",
    "com.apple.mobile.ldbackup.plist",
];

const WORDS: &[&str] = &[
    "account",
    "action",
    "album",
    "alarm",
    "answer",
    "apple",
    "archive",
    "article",
    "audio",
    "autumn",
    "backup",
    "badge",
    "battery",
    "beach",
    "birthday",
    "book",
    "bridge",
    "budget",
    "button",
    "cache",
    "calendar",
    "camera",
    "cards",
    "center",
    "chapter",
    "charge",
    "city",
    "cloud",
    "coffee",
    "color",
    "comment",
    "contact",
    "cookie",
    "counter",
    "country",
    "daily",
    "dashboard",
    "delivery",
    "design",
    "device",
    "dinner",
    "display",
    "document",
    "download",
    "draft",
    "dream",
    "editor",
    "email",
    "energy",
    "event",
    "export",
    "family",
    "favorite",
    "feature",
    "filter",
    "flight",
    "folder",
    "forecast",
    "friend",
    "garden",
    "gallery",
    "game",
    "guide",
    "health",
    "history",
    "holiday",
    "home",
    "hotel",
    "image",
    "inbox",
    "index",
    "invoice",
    "journal",
    "kitchen",
    "language",
    "launch",
    "layout",
    "library",
    "light",
    "list",
    "location",
    "lunch",
    "market",
    "meeting",
    "memory",
    "message",
    "minute",
    "mobile",
    "morning",
    "mountain",
    "music",
    "network",
    "night",
    "note",
    "number",
    "office",
    "order",
    "package",
    "page",
    "payment",
    "people",
    "photo",
    "picture",
    "planet",
    "player",
    "playlist",
    "podcast",
    "preview",
    "profile",
    "project",
    "quick",
    "recent",
    "recipe",
    "reminder",
    "report",
    "river",
    "route",
    "schedule",
    "screen",
    "search",
    "season",
    "session",
    "settings",
    "share",
    "shopping",
    "signal",
    "sleep",
    "song",
    "sport",
    "station",
    "status",
    "storage",
    "story",
    "street",
    "summer",
    "sunset",
    "support",
    "sync",
    "table",
    "task",
    "theme",
    "ticket",
    "timer",
    "today",
    "track",
    "train",
    "travel",
    "update",
    "upload",
    "user",
    "vacation",
    "video",
    "view",
    "visit",
    "voice",
    "walk",
    "watch",
    "water",
    "weather",
    "weekend",
    "widget",
    "window",
    "winter",
    "work",
    "world",
];

const FIRST_NAMES: &[&str] = &[
    "Emma",
    "Liam",
    "Olivia",
    "Noah",
    "Ava",
    "Elijah",
    "Sophia",
    "James",
    "Isabella",
    "Lucas",
    "Mia",
    "Mateo",
    "Charlotte",
    "Benjamin",
    "Amelia",
    "Henry",
    "Harper",
    "Alexander",
    "Evelyn",
    "Daniel",
    "Abigail",
    "Michael",
    "Emily",
    "Sebastian",
    "Ella",
    "Jack",
    "Scarlett",
    "Owen",
    "Grace",
    "Samuel",
    "Chloe",
    "David",
    "Zoe",
    "Joseph",
    "Lily",
    "Carter",
    "Hannah",
    "Wyatt",
    "Nora",
    "John",
    "Aria",
    "Leo",
    "Layla",
    "Julian",
    "Maya",
    "Ezra",
    "Sara",
    "Hugo",
    "Ines",
    "Luca",
];

const LAST_NAMES: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Green",
    "Adams",
    "Nelson",
    "Baker",
    "Hall",
    "Rivera",
    "Campbell",
    "Mitchell",
    "Carter",
    "Roberts",
];

const COMPANIES: &[&str] = &[
    "Acme Corp",
    "Globex",
    "Initech",
    "Umbrella Health",
    "Stark Industries",
    "Wayne Enterprises",
    "Hooli",
    "Vandelay Industries",
    "Soylent",
    "Cyberdyne",
    "Wonka Foods",
    "Tyrell",
    "Massive Dynamic",
    "Pied Piper",
    "Blue Sun",
    "Oceanic Airlines",
    "Gringotts",
    "Monarch Solutions",
    "Aperture Labs",
    "Dunder Mifflin",
];

const MAIL_DOMAINS: &[&str] = &["gmail.com", "icloud.com", "outlook.com", "yahoo.com", "proton.me", "me.com"];

/// The body of message 1 of every device: markup that would run if a reader did not escape it.
pub const HOSTILE_MESSAGE: &str = "<img src=x onerror=\"document.body.dataset.pwned='message'\">";
/// The first name of contact 2 of every device, likewise.
pub const HOSTILE_CONTACT: &str = "<script>document.body.dataset.pwned='contact'</script>";

/// `text` as a typedstream-archived NSAttributedString, the `attributedBody` of sms.db: the
/// archive header, the class chain NSAttributedString → NSObject, the NSString with its
/// `+` type tag, length (one byte below 0x80, else 0x81 and a little-endian u16) and UTF-8
/// bytes, then one attribute run (`__kIMMessagePartAttributeName` = 0) over the whole text.
pub fn attributed_body(text: &str) -> Vec<u8> {
    fn length(out: &mut Vec<u8>, n: usize) {
        match u16::try_from(n) {
            Ok(n) if n < 0x80 => out.push(n as u8),
            Ok(n) => {
                out.push(0x81);
                out.extend_from_slice(&n.to_le_bytes());
            }
            Err(_) => {
                out.push(0x82);
                out.extend_from_slice(&(n as u32).to_le_bytes());
            }
        }
    }
    let mut out = b"\x04\x0bstreamtyped\x81\xe8\x03\x84\x01@\x84\x84\x84\x12NSAttributedString\x00\x84\x84\x08NSObject\x00\x85\x92\x84\x84\x84\x08NSString\x01\x94\x84\x01+".to_vec();
    length(&mut out, text.len());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\x86\x84\x02iI\x01");
    length(&mut out, text.encode_utf16().count());
    out.extend_from_slice(b"\x92\x84\x84\x84\x0cNSDictionary\x00\x94\x84\x01i\x01\x92\x84\x96\x96\x1d__kIMMessagePartAttributeName\x86\x92\x84\x84\x84\x08NSNumber\x00\x84\x84\x07NSValue\x00\x94\x84\x01*\x84\x99\x99\x00\x86\x86\x86");
    out
}

const SMS_PHRASES: &[&str] = &[
    "On my way!",
    "Running 10 min late, sorry.",
    "Sounds good.",
    "Can you call me when you get a chance?",
    "Did you see the game last night?",
    "Happy birthday!!",
    "Thanks so much!",
    "Where are you?",
    "See you soon.",
    "Let me check and get back to you.",
    "Dinner at 7?",
    "Love you",
    "Haha that's hilarious",
    "Can you pick up milk on the way home?",
    "Meeting moved to 3pm.",
    "Just landed.",
    "Ok",
    "Yes!",
    "No worries.",
    "What time works for you tomorrow?",
    "I'll be there in 5.",
    "Good morning!",
    "Good night",
    "Miss you",
    "Your package was delivered.",
    "Your verification code is 482913.",
    "Call me back please.",
    "Are we still on for Saturday?",
    "Congrats on the new job!",
    "Happy to help.",
    "Can't talk right now.",
    "Heading out now.",
    "Traffic is terrible.",
    "Let's do lunch next week.",
    "I sent you the file.",
    "Did you get my email?",
    "Weather looks great this weekend.",
    "Booked the tickets!",
    "Feel better soon.",
    "That's amazing news!",
    "Who's bringing dessert?",
    "Parking is on the left side.",
    "Kids are asleep finally.",
    "Remember to bring your passport.",
    "The code for the door is 1234.",
    "Just finished the run, 10k!",
];

/// Safari sites: (host, domain_expansion).
const SITES: &[(&str, &str)] = &[
    ("www.nytimes.com", "nytimes"),
    ("www.bbc.co.uk", "bbc"),
    ("en.wikipedia.org", "en.wikipedia"),
    ("www.reddit.com", "reddit"),
    ("www.youtube.com", "youtube"),
    ("www.amazon.com", "amazon"),
    ("github.com", "github"),
    ("stackoverflow.com", "stackoverflow"),
    ("www.theguardian.com", "theguardian"),
    ("www.espn.com", "espn"),
    ("www.allrecipes.com", "allrecipes"),
    ("www.imdb.com", "imdb"),
    ("www.apple.com", "apple"),
    ("support.apple.com", "support.apple"),
    ("www.weather.com", "weather"),
    ("maps.google.com", "maps.google"),
    ("www.booking.com", "booking"),
    ("www.tripadvisor.com", "tripadvisor"),
    ("medium.com", "medium"),
    ("news.ycombinator.com", "news.ycombinator"),
    ("www.etsy.com", "etsy"),
    ("www.zillow.com", "zillow"),
    ("www.linkedin.com", "linkedin"),
    ("www.instagram.com", "instagram"),
    ("www.cnn.com", "cnn"),
    ("www.washingtonpost.com", "washingtonpost"),
    ("www.theverge.com", "theverge"),
    ("www.healthline.com", "healthline"),
    ("www.ikea.com", "ikea"),
    ("www.nationalgeographic.com", "nationalgeographic"),
];

/// Places: (name, latitude, longitude).
const CITIES: &[(&str, f64, f64)] = &[
    ("San Francisco, CA", 37.7749, -122.4194),
    ("New York, NY", 40.7128, -74.0060),
    ("Chicago, IL", 41.8781, -87.6298),
    ("Austin, TX", 30.2672, -97.7431),
    ("Seattle, WA", 47.6062, -122.3321),
    ("Boston, MA", 42.3601, -71.0589),
    ("Denver, CO", 39.7392, -104.9903),
    ("Miami, FL", 25.7617, -80.1918),
    ("Los Angeles, CA", 34.0522, -118.2437),
    ("Portland, OR", 45.5152, -122.6784),
    ("London", 51.5074, -0.1278),
    ("Paris", 48.8566, 2.3522),
    ("Berlin", 52.5200, 13.4050),
    ("Tokyo", 35.6762, 139.6503),
    ("Sydney", -33.8688, 151.2093),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn read_all(c: &Content, key: &FileKey) -> Vec<u8> {
        let mut out = Vec::new();
        c.open(Path::new("/nonexistent"), key).unwrap().read_to_end(&mut out).unwrap();
        out
    }

    fn open_db(bytes: &[u8]) -> (tempfile::TempDir, rusqlite::Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        std::fs::write(&path, bytes).unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        (dir, conn)
    }

    fn columns(db: &rusqlite::Connection, table: &str) -> BTreeSet<String> {
        let mut stmt = db.prepare(&format!("PRAGMA table_info({table})")).unwrap();
        let names = stmt.query_map([], |r| r.get::<_, String>(1)).unwrap();
        names.map(|n| n.unwrap().to_ascii_lowercase()).collect()
    }

    fn has_columns(db: &rusqlite::Connection, table: &str, wanted: &[&str]) {
        let have = columns(db, table);
        for w in wanted {
            assert!(have.contains(&w.to_ascii_lowercase()), "{table} lacks {w}: {have:?}");
        }
    }

    fn count(db: &rusqlite::Connection, sql: &str) -> i64 {
        db.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    fn system_db(c: &Content, kind: DbKind) -> (tempfile::TempDir, rusqlite::Connection, u32) {
        let key = kind.key().unwrap();
        let rows = match &c.files[&key].body {
            Body::Sqlite { db, rows, .. } if *db == kind => *rows,
            other => panic!("{key}: {other:?}"),
        };
        let bytes = read_all(c, &key);
        assert!(bytes.starts_with(b"SQLite format 3\0"));
        assert_eq!(bytes[18..20], [1, 1], "rollback journal, not WAL");
        let (dir, db) = open_db(&bytes);
        (dir, db, rows)
    }

    fn blobs() -> &'static Path {
        Path::new("/nonexistent-blobs")
    }

    #[test]
    fn profiles_parse_and_print() {
        assert_eq!("tiny".parse::<Profile>(), Ok(Profile::Tiny));
        assert_eq!(" Small ".parse::<Profile>(), Ok(Profile::Small));
        assert_eq!("medium".parse::<Profile>(), Ok(Profile::Medium));
        assert_eq!("large:5G".parse::<Profile>(), Ok(Profile::Large { bytes: 5_000_000_000 }));
        assert_eq!("large:500M".parse::<Profile>(), Ok(Profile::Large { bytes: 500_000_000 }));
        assert_eq!("large:500MB".parse::<Profile>(), Ok(Profile::Large { bytes: 500_000_000 }));
        assert_eq!("large:2GiB".parse::<Profile>(), Ok(Profile::Large { bytes: 2 << 30 }));
        assert_eq!("LARGE:1.5g".parse::<Profile>(), Ok(Profile::Large { bytes: 1_500_000_000 }));
        assert_eq!("large:1234567".parse::<Profile>(), Ok(Profile::Large { bytes: 1_234_567 }));
        assert_eq!(parse_size("123456"), Ok(123_456));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!("large:123456".parse::<Profile>(), Err(ProfileError::TooSmall("123456".into())));
        assert!(matches!("huge".parse::<Profile>(), Err(ProfileError::Unknown(_))));
        assert!(matches!("large".parse::<Profile>(), Err(ProfileError::Unknown(_))));
        for bad in ["large:", "large:5X", "large:G", "large:-5G", "large:5 G B", "large:99999999999T", "large:1.2.3G"] {
            let err = bad.parse::<Profile>().unwrap_err();
            assert!(matches!(err, ProfileError::BadSize(_)), "{bad}: {err:?}");
            assert!(err.to_string().contains("e.g. 5G"), "{err}");
        }
        for p in [
            Profile::Tiny,
            Profile::Small,
            Profile::Medium,
            Profile::Large { bytes: 5_000_000_000 },
            Profile::Large { bytes: 2 << 30 },
            Profile::Large { bytes: 1_234_567 },
            Profile::Large { bytes: 1_500_000_000 },
        ] {
            assert_eq!(p.to_string().parse::<Profile>(), Ok(p), "{p}");
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(serde_json::from_str::<Profile>(&json).unwrap(), p);
        }
        assert_eq!(Profile::Large { bytes: 5_000_000_000 }.to_string(), "large:5G");
        assert_eq!(Profile::Large { bytes: 2 << 30 }.to_string(), "large:2GiB");
        assert_eq!(Profile::Large { bytes: 1_500_000_000 }.to_string(), "large:1500M");
    }

    #[test]
    fn tiny_is_deterministic_and_seeded() {
        let a = Content::generate(1, Profile::Tiny).unwrap();
        let b = Content::generate(1, Profile::Tiny).unwrap();
        assert_eq!(a, b);
        let ea = a.expect(blobs(), true).unwrap();
        assert_eq!(ea, b.expect(blobs(), true).unwrap());
        let c = Content::generate(2, Profile::Tiny).unwrap();
        let ec = c.expect(blobs(), true).unwrap();
        assert_ne!(ea, ec);
        // Same well-known paths, different bytes.
        let sms = "HomeDomain\tLibrary/SMS/sms.db\t";
        let line = |e: &[String]| e.iter().find(|l| l.starts_with(sms)).cloned().unwrap();
        assert_ne!(line(&ea), line(&ec));
        assert!((200..=450).contains(&a.files.len()), "{}", a.files.len());
        assert!((2_500_000..=6_000_000).contains(&a.total_bytes()), "{}", a.total_bytes());
    }

    #[test]
    fn expect_lines_are_sorted_well_formed_and_match_the_bytes() {
        let c = Content::generate(3, Profile::Tiny).unwrap();
        let lines = c.expect(blobs(), true).unwrap();
        assert_eq!(lines.len(), c.files.len());
        let mut previous: Option<(String, String)> = None;
        for (line, (key, entry)) in lines.iter().zip(&c.files) {
            let parts: Vec<&str> = line.split('\t').collect();
            assert_eq!(parts.len(), 4, "{line}");
            assert_eq!((parts[0], parts[1]), (key.domain.as_str(), key.path.as_str()));
            assert!(!parts[1].starts_with('/'));
            assert_eq!(parts[2].parse::<u64>().unwrap(), entry.size);
            assert!(is_sha256_hex(parts[3]), "{line}");
            let this = (parts[0].to_owned(), parts[1].to_owned());
            if let Some(p) = &previous {
                assert!(*p < this, "{p:?} before {this:?}");
            }
            previous = Some(this);
        }
        // Every kind of body yields exactly its catalog size, also with 1-byte reads.
        let mut seen = std::collections::HashSet::new();
        for (key, entry) in &c.files {
            let kind = std::mem::discriminant(&entry.body);
            if seen.insert(kind) {
                assert_eq!(read_all(&c, key).len() as u64, entry.size, "{key}");
                let mut r = c.open(blobs(), key).unwrap();
                let mut n = 0u64;
                let mut byte = [0u8; 1];
                while r.read(&mut byte).unwrap() == 1 {
                    n += 1;
                }
                assert_eq!(n, entry.size, "{key}");
            }
        }
        assert!(seen.len() >= 4);
        let sha = c.sha256(blobs(), &DbKind::Sms.key().unwrap()).unwrap();
        assert!(lines.contains(&format!("HomeDomain\tLibrary/SMS/sms.db\t{}\t{}", sha.0, sha.1)));
    }

    #[test]
    fn tiny_has_the_paths_of_a_real_phone() {
        let c = Content::generate(4, Profile::Tiny).unwrap();
        for (domain, path) in [
            ("HomeDomain", "Library/SMS/sms.db"),
            ("HomeDomain", "Library/AddressBook/AddressBook.sqlitedb"),
            ("HomeDomain", "Library/AddressBook/AddressBookImages.sqlitedb"),
            ("HomeDomain", "Library/CallHistoryDB/CallHistory.storedata"),
            ("HomeDomain", "Library/Safari/History.db"),
            ("CameraRollDomain", "Media/PhotoData/Photos.sqlite"),
            ("HomeDomain", "Library/Preferences/com.apple.springboard.plist"),
            ("KeychainDomain", "keychain-backup.plist"),
        ] {
            assert!(c.files.contains_key(&FileKey::new(domain, path)), "{domain} {path}");
        }
        assert!(
            c.files.keys().any(|k| k.domain == "CameraRollDomain" && k.path.starts_with("Media/DCIM/100APPLE/IMG_0"))
        );
        assert!(c.files.keys().any(|k| k.domain == "MediaDomain" && k.path.starts_with("Library/SMS/Attachments/")));
        let apps = c.app_bundles();
        assert!(apps.len() >= 3, "{apps:?}");
        for bundle in &apps {
            let domain = format!("AppDomain-{bundle}");
            assert!(c.files.contains_key(&FileKey::new(&domain, format!("Library/Preferences/{bundle}.plist"))));
            assert!(c.files.keys().any(|k| k.domain == domain && k.path.ends_with(".sqlite")));
        }
        let (lo, hi) = c.files.values().map(|e| e.mtime).fold((i64::MAX, i64::MIN), |(a, b), m| (a.min(m), b.max(m)));
        assert!(lo >= YEAR_START - 400 * DAY && hi <= YEAR_END, "{lo}..{hi}");
        // Photos are numbered in the order they were taken.
        let camera = c.camera_keys();
        let names: Vec<&str> = camera.iter().map(|(k, _)| k.path.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_by_key(|p| p.rsplit('/').next().map(|n| n[4..8].to_owned()));
        assert_eq!(names, sorted);
        // Manifest rows: one per file, with the well-known fileIDs.
        let rows = c.manifest_files(true);
        assert_eq!(rows.len(), c.files.len());
        assert!(rows.iter().any(|r| r.file_id == "3d0d7e5fb2ce288813306e4d4636395e047a3d28"));
        let db = crate::manifest::build_manifest_db(&rows).unwrap();
        let back = crate::manifest::read_manifest_db(&db).unwrap();
        let files: Vec<_> = back.into_iter().filter(|r| r.flags == 1).collect();
        let mut expected = rows.clone();
        expected.sort_by(|a, b| (&a.domain, &a.path).cmp(&(&b.domain, &b.path)));
        assert_eq!(files, expected);
    }

    #[test]
    fn sqlite_databases_have_forensic_schemas_and_catalog_counts() {
        let c = Content::generate(5, Profile::Tiny).unwrap();

        let (_d, db, rows) = system_db(&c, DbKind::Sms);
        has_columns(
            &db,
            "message",
            &["ROWID", "guid", "text", "handle_id", "date", "is_from_me", "cache_has_attachments", "service"],
        );
        has_columns(&db, "handle", &["ROWID", "id", "service"]);
        has_columns(&db, "attachment", &["ROWID", "guid", "filename", "mime_type", "transfer_name", "total_bytes"]);
        has_columns(&db, "message_attachment_join", &["message_id", "attachment_id"]);
        has_columns(&db, "chat_message_join", &["chat_id", "message_id"]);
        assert_eq!(rows, c.state.messages.len());
        assert_eq!(count(&db, "SELECT count(*) FROM message"), i64::from(rows));
        assert_eq!(
            count(&db, "SELECT count(*) FROM message m LEFT JOIN handle h ON h.rowid = m.handle_id WHERE h.id IS NULL"),
            0
        );
        let attachment_files =
            c.files.keys().filter(|k| k.domain == MEDIA && k.path.starts_with(ATTACHMENTS_PREFIX)).count();
        assert!(attachment_files > 0);
        assert_eq!(count(&db, "SELECT count(*) FROM attachment") as usize, attachment_files);
        assert_eq!(count(&db, "SELECT count(*) FROM message_attachment_join") as usize, attachment_files);
        assert_eq!(
            count(&db, "SELECT count(*) FROM message WHERE cache_has_attachments = 1"),
            count(&db, "SELECT count(DISTINCT message_id) FROM message_attachment_join")
        );
        let total: i64 = count(&db, "SELECT sum(total_bytes) FROM attachment");
        let catalog: u64 = c
            .files
            .iter()
            .filter(|(k, _)| k.domain == MEDIA && k.path.starts_with(ATTACHMENTS_PREFIX))
            .map(|(_, e)| e.size)
            .sum();
        assert_eq!(total as u64, catalog);
        let min_date = count(&db, "SELECT min(date) FROM message") / 1_000_000_000 + APPLE_EPOCH;
        assert!(min_date >= YEAR_START, "{min_date}");

        let (_d, db, rows) = system_db(&c, DbKind::AddressBook);
        has_columns(&db, "ABPerson", &["ROWID", "first", "middle", "last", "organization", "CreationDate"]);
        has_columns(&db, "ABMultiValue", &["UID", "record_id", "property", "label", "value"]);
        assert_eq!(count(&db, "SELECT count(*) FROM ABPerson"), i64::from(rows));
        assert_eq!(rows, c.state.contacts.len());
        assert!(count(&db, "SELECT count(*) FROM ABMultiValue WHERE property = 3") >= i64::from(rows));

        let (_d, db, rows) = system_db(&c, DbKind::AddressBookImages);
        has_columns(&db, "ABThumbnailImage", &["record_id", "format", "data"]);
        assert_eq!(count(&db, "SELECT count(*) FROM ABThumbnailImage"), i64::from(rows));
        assert_eq!(rows, c.state.contacts.len().div_ceil(4));

        let (_d, db, rows) = system_db(&c, DbKind::CallHistory);
        has_columns(
            &db,
            "ZCALLRECORD",
            &["Z_PK", "ZDATE", "ZDURATION", "ZLOCATION", "ZADDRESS", "ZSERVICE_PROVIDER", "ZORIGINATED", "ZANSWERED"],
        );
        assert_eq!(count(&db, "SELECT count(*) FROM ZCALLRECORD"), i64::from(rows));
        assert_eq!(rows, c.state.calls.len());

        let (_d, db, rows) = system_db(&c, DbKind::SafariHistory);
        has_columns(&db, "history_items", &["id", "url", "domain_expansion", "visit_count"]);
        has_columns(&db, "history_visits", &["id", "history_item", "visit_time", "title"]);
        assert_eq!(count(&db, "SELECT count(*) FROM history_visits"), i64::from(rows));
        assert_eq!(count(&db, "SELECT sum(visit_count) FROM history_items"), i64::from(rows));
        assert_eq!(rows, c.state.visits.len());

        let (_d, db, rows) = system_db(&c, DbKind::Photos);
        has_columns(&db, "ZASSET", &["Z_PK", "ZFILENAME", "ZDIRECTORY", "ZDATECREATED", "ZKIND", "ZWIDTH", "ZHEIGHT"]);
        let camera: BTreeSet<String> = c.camera_keys().into_iter().map(|(k, _)| k.path).collect();
        assert_eq!(rows as usize, camera.len());
        let mut stmt = db.prepare("SELECT ZDIRECTORY, ZFILENAME, ZKIND FROM ZASSET").unwrap();
        let listed: BTreeSet<String> = stmt
            .query_map([], |r| {
                let (dir, name, kind): (String, String, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
                assert_eq!(kind == 1, name.ends_with(".MOV"));
                Ok(format!("Media/{dir}/{name}"))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(listed, camera);

        for (key, entry) in &c.files {
            if let Body::Sqlite { db: DbKind::App, rows, .. } = entry.body {
                let (_d, db) = open_db(&read_all(&c, key));
                assert_eq!(count(&db, "SELECT count(*) FROM ZITEM"), i64::from(rows), "{key}");
            }
        }
    }

    fn boxes(bytes: &[u8], total: u64, head_only: bool) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < total {
            let p = pos as usize;
            let mut size = u64::from(u32::from_be_bytes(bytes[p..p + 4].try_into().unwrap()));
            let kind = String::from_utf8_lossy(&bytes[p + 4..p + 8]).into_owned();
            if size == 1 {
                size = u64::from_be_bytes(bytes[p + 8..p + 16].try_into().unwrap());
            }
            assert!(size >= 8, "{kind}");
            out.push((kind.clone(), size));
            pos += size;
            if head_only && kind == "mdat" {
                break;
            }
        }
        out
    }

    #[test]
    fn media_headers_are_real_and_bodies_stream() {
        let read = |format, size: u64| {
            let mut out = Vec::new();
            MediaReader::new(format, 42, size).read_to_end(&mut out).unwrap();
            assert_eq!(out.len() as u64, size);
            out
        };
        let jpeg = read(MediaFormat::Jpeg, 200_000);
        assert_eq!(jpeg[..4], [0xFF, 0xD8, 0xFF, 0xE1]);
        assert_eq!(&jpeg[6..12], b"Exif\0\0");
        assert_eq!(&jpeg[12..16], b"MM\0\x2A");
        let app1_len = usize::from(u16::from_be_bytes([jpeg[4], jpeg[5]]));
        // A whole picture follows the Exif: tables, frame, scan, and its end.
        let picture = &jpeg[4 + app1_len..];
        assert_eq!(picture[0], 0xFF, "a marker follows the Exif");
        let eoi = picture.windows(2).position(|w| w == [0xFF, 0xD9]).unwrap();
        for marker in [0xC0u8, 0xC4, 0xDA, 0xDB] {
            assert!(picture[..eoi].windows(2).any(|w| w == [0xFF, marker]), "marker {marker:02X}");
        }
        assert!(eoi < 8_000, "a small picture, then the body");
        assert!(jpeg.windows(5).any(|w| w == b"Apple"));
        assert_eq!(jpeg[jpeg.len() - 2..], [0xFF, 0xD9]);

        let heic = read(MediaFormat::Heic, 150_000);
        assert_eq!(&heic[4..12], b"ftypheic");
        assert!(heic[..40].windows(4).any(|w| w == b"mif1"));
        let b = boxes(&heic, heic.len() as u64, false);
        assert_eq!(b.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["ftyp", "meta", "mdat"]);
        assert_eq!(b.iter().map(|(_, s)| s).sum::<u64>(), 150_000);

        let mov = read(MediaFormat::Mov, 3_000_000);
        assert_eq!(&mov[4..12], b"ftypqt  ");
        let b = boxes(&mov, mov.len() as u64, false);
        assert_eq!(b.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["ftyp", "wide", "mdat", "moov"]);
        assert_eq!(b.iter().map(|(_, s)| s).sum::<u64>(), 3_000_000);

        // A video over 4 GiB uses a 64-bit mdat size; only its header is read.
        let huge = 5u64 << 30;
        let (head, tail) = media_parts(MediaFormat::Mov, huge, 0);
        let b = boxes(&head, huge, true);
        assert_eq!(b[2], ("mdat".to_string(), huge - 28 - tail.len() as u64));

        // The body is incompressible-looking: every byte value about equally often.
        let mut histogram = [0u32; 256];
        for byte in &mov[100_000..1_148_576] {
            histogram[usize::from(*byte)] += 1;
        }
        assert!(histogram.iter().all(|n| (3_000..5_200).contains(n)), "{histogram:?}");
        // Same seed, same bytes; another seed, other bytes.
        assert_eq!(read(MediaFormat::Heic, 150_000), heic);
        let mut other = Vec::new();
        MediaReader::new(MediaFormat::Heic, 43, 150_000).read_to_end(&mut other).unwrap();
        assert_ne!(other, heic);
        assert_eq!(other[..90], heic[..90]);
        // Smaller than a header: the header cut to size.
        assert_eq!(read(MediaFormat::Jpeg, 10), jpeg[..10]);
        assert_eq!(read(MediaFormat::Bin, 0), Vec::<u8>::new());

        // The camera roll of a generated device.
        let c = Content::generate(6, Profile::Tiny).unwrap();
        let mut kinds = BTreeSet::new();
        for (key, _) in c.camera_keys() {
            let ext = key.path.rsplit('.').next().unwrap().to_owned();
            if kinds.insert(ext.clone()) {
                let mut head = [0u8; 12];
                c.open(blobs(), &key).unwrap().read_exact(&mut head).unwrap();
                match ext.as_str() {
                    "JPG" => assert_eq!(head[..4], [0xFF, 0xD8, 0xFF, 0xE1]),
                    "HEIC" => assert_eq!(&head[4..12], b"ftypheic"),
                    "MOV" => assert_eq!(&head[4..12], b"ftypqt  "),
                    other => panic!("{other}"),
                }
            }
        }
        assert!(kinds.contains("HEIC") && kinds.contains("MOV"), "{kinds:?}");
    }

    #[test]
    fn text_and_plists_are_real() {
        let json = text_bytes(TextKind::Json, 1, 5_000);
        assert_eq!(json.len(), 5_000);
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert!(v.as_array().is_some_and(|a| !a.is_empty()));
        let tiny_json = text_bytes(TextKind::Json, 1, 40);
        assert_eq!(tiny_json.len(), 40);
        serde_json::from_slice::<serde_json::Value>(&tiny_json).unwrap();
        for kind in [TextKind::Log, TextKind::Prose] {
            let t = text_bytes(kind, 9, 10_000);
            assert_eq!(t.len(), 10_000);
            assert!(t.iter().all(|b| b.is_ascii()));
            assert_ne!(t, text_bytes(kind, 10, 10_000));
        }
        assert!(text_bytes(TextKind::Log, 9, 200).starts_with(b"2025-"));
        let binary = plist_bytes(PlistKind::Prefs, 3, 30, false).unwrap();
        assert!(binary.starts_with(b"bplist00"));
        let xml = plist_bytes(PlistKind::Prefs, 3, 30, true).unwrap();
        assert!(xml.starts_with(b"<?xml"));
        assert_eq!(Value::from_reader(Cursor::new(&binary)).unwrap(), Value::from_reader(Cursor::new(&xml)).unwrap());
        let keychain =
            Value::from_reader(Cursor::new(plist_bytes(PlistKind::Keychain, 3, 40, false).unwrap())).unwrap();
        assert!(keychain.as_dictionary().unwrap().get("genp").and_then(Value::as_array).is_some_and(|a| a.len() == 20));
    }

    #[test]
    fn simulate_use_on_tiny_keeps_the_catalog_consistent() {
        let mut c = Content::generate(7, Profile::Tiny).unwrap();
        let before = c.clone();
        let summary = c.simulate_use(0.05, 1).unwrap();
        assert!(summary.added > 0 && summary.changed > 0, "{summary:?}");
        assert!(c.state.messages.len() > before.state.messages.len());
        // Every size is still exact and the databases agree with the catalog.
        c.expect(blobs(), true).unwrap();
        let (_d, db, rows) = system_db(&c, DbKind::Photos);
        assert_eq!(count(&db, "SELECT count(*) FROM ZASSET") as usize, c.camera_keys().len());
        assert_eq!(rows as usize, c.camera_keys().len());
        let (_d, db, _) = system_db(&c, DbKind::Sms);
        assert_eq!(count(&db, "SELECT count(*) FROM message"), i64::from(c.state.messages.len()));
        let attachments =
            c.files.keys().filter(|k| k.domain == MEDIA && k.path.starts_with(ATTACHMENTS_PREFIX)).count();
        assert_eq!(count(&db, "SELECT count(*) FROM message_attachment_join") as usize, attachments);
        assert_eq!(c.simulate_use(0.0, 1).unwrap(), UseSummary::default());
    }

    #[test]
    fn simulate_use_on_small_changes_about_one_percent() {
        let original = Content::generate(8, Profile::Small).unwrap();
        let total = original.total_bytes();
        let mut c = original.clone();
        let summary = c.simulate_use(0.01, 99).unwrap();
        let touched = summary.added_bytes + summary.changed_bytes;
        assert!(touched * 200 >= total && touched * 100 <= total * 3, "{touched} of {total}: {summary:?}");
        assert!(summary.added > 0 && summary.changed > 0 && summary.deleted > 0, "{summary:?}");
        let mut changed = 0;
        for (key, old) in &original.files {
            match c.files.get(key) {
                Some(new) if new != old => {
                    changed += 1;
                    assert!(new.mtime > old.mtime, "{key}: {} -> {}", old.mtime, new.mtime);
                    assert_ne!(new.body, old.body, "{key}");
                    if !matches!(new.body, Body::Media { .. }) {
                        assert_eq!(read_all(&c, key).len() as u64, new.size, "{key}");
                    }
                }
                _ => {}
            }
        }
        assert_eq!(changed, summary.changed);
        let added = c.files.keys().filter(|k| !original.files.contains_key(*k)).count() as u64;
        assert_eq!(added, summary.added);
        assert!(c.files.keys().any(|k| !original.files.contains_key(k) && k.path.starts_with(DCIM_PREFIX)));
        assert!(c.files.keys().any(|k| !original.files.contains_key(k) && k.path.starts_with(ATTACHMENTS_PREFIX)));
        // Deterministic, and another use seed does something else.
        let mut again = original.clone();
        assert_eq!(again.simulate_use(0.01, 99).unwrap(), summary);
        assert_eq!(again, c);
        let mut other = original.clone();
        other.simulate_use(0.01, 100).unwrap();
        assert_ne!(other.files, c.files);
        // Small profile totals.
        assert!((180_000_000..=230_000_000).contains(&total), "{total}");
        assert!((4_500..=5_500).contains(&original.files.len()), "{}", original.files.len());
    }

    #[test]
    fn medium_catalog_is_about_two_gigabytes() {
        let c = Content::generate(9, Profile::Medium).unwrap();
        assert!((1_800_000_000..=2_300_000_000).contains(&c.total_bytes()), "{}", c.total_bytes());
        assert!((45_000..=55_000).contains(&c.files.len()), "{}", c.files.len());
        assert!(c.app_bundles().len() >= 30);
    }

    #[test]
    fn save_load_and_restore_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let c = Content::generate(10, Profile::Tiny).unwrap();
        let path = dir.path().join("content.json");
        c.save(&path).unwrap();
        assert_eq!(Content::load(&path).unwrap(), c);

        // Restore: every file's bytes into the blob directory, then replace the content.
        let blob_dir = dir.path().join("blobs");
        let mut restored = Vec::new();
        for (key, entry) in &c.files {
            let (size, sha) = write_blob(&blob_dir, &mut c.open(blobs(), key).unwrap()).unwrap();
            assert_eq!(size, entry.size);
            restored.push((key.clone(), FileEntry::stored(size, entry.mtime, entry.mode, sha)));
        }
        let mut d = Content::generate(11, Profile::Tiny).unwrap();
        d.replace_with_stored(restored);
        assert_eq!(d.expect(&blob_dir, true).unwrap(), c.expect(blobs(), true).unwrap());
        assert_eq!(d.manifest_files(true), c.manifest_files(true));
        // Use continues on restored content.
        d.simulate_use(0.05, 3).unwrap();
        d.expect(&blob_dir, true).unwrap();

        // A missing or tampered blob is an error, not wrong bytes.
        let (key, entry) = d.files.iter().find(|(_, e)| matches!(e.body, Body::Stored { .. }) && e.size > 0).unwrap();
        let Body::Stored { sha256 } = &entry.body else { unreachable!() };
        std::fs::write(blob_dir.join(sha256), b"x").unwrap();
        assert!(d.open(&blob_dir, key).is_err());
        assert!(d.expect(&blob_dir, true).is_err());

        // A content file with a stored body that is not a hash does not load.
        let mut bad = c.clone();
        bad.files.insert(FileKey::new("HomeDomain", "x"), FileEntry::stored(1, 0, FILE_MODE, "../../etc/passwd"));
        bad.save(&path).unwrap();
        assert!(matches!(Content::load(&path), Err(ContentError::Invalid(_))));
        std::fs::write(&path, b"{").unwrap();
        assert!(matches!(Content::load(&path), Err(ContentError::Json(_))));
    }
}
