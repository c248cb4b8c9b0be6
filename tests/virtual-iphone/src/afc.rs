//! A minimal AFC (`com.apple.afc`): the media file system the host tools touch around a
//! backup — the iTunes sync lock, the `/iTunes_Control/iTunes` and `/Books` files read for
//! Info.plist, and `/iTunesRestore/RestoreApplications.plist` written before a restore.
//!
//! Packet: `"CFA6LPAA" | entire_length u64le | this_length u64le | packet_num u64le |
//! operation u64le`, then header data and payload. Replies echo the packet number (both
//! hosts match on it); status codes as libimobiledevice and pymobiledevice3 define them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::devices::DeviceState;

const MAGIC: &[u8; 8] = b"CFA6LPAA";
const HEADER: usize = 40;
/// Largest packet accepted (pymobiledevice3 writes in 4 MiB pieces).
const MAX_PACKET: u64 = 64 << 20;

mod op {
    pub const STATUS: u64 = 0x01;
    pub const DATA: u64 = 0x02;
    pub const READ_DIR: u64 = 0x03;
    pub const REMOVE_PATH: u64 = 0x08;
    pub const MAKE_DIR: u64 = 0x09;
    pub const GET_FILE_INFO: u64 = 0x0a;
    pub const GET_DEVINFO: u64 = 0x0b;
    pub const FILE_OPEN: u64 = 0x0d;
    pub const FILE_OPEN_RES: u64 = 0x0e;
    pub const READ: u64 = 0x0f;
    pub const WRITE: u64 = 0x10;
    pub const FILE_CLOSE: u64 = 0x14;
    pub const FILE_LOCK: u64 = 0x1b;
}

mod status {
    pub const SUCCESS: u64 = 0;
    pub const UNKNOWN_PACKET: u64 = 2;
    pub const INVALID_ARG: u64 = 7;
    pub const OBJECT_NOT_FOUND: u64 = 8;
    pub const OBJECT_IS_DIR: u64 = 9;
    pub const DIR_NOT_EMPTY: u64 = 33;
    pub const OP_WOULD_BLOCK: u64 = 19;
    pub const BAD_HANDLE: u64 = 22;
}

const LOCK_EXCLUSIVE: u64 = 2;
const LOCK_UNLOCK: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum AfcError {
    #[error("bad AFC packet: {0}")]
    BadPacket(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The device's AFC file system: a handful of small files, in memory.
#[derive(Debug)]
pub struct Fs {
    inner: Mutex<FsInner>,
    next_client: AtomicU64,
}

#[derive(Debug)]
struct FsInner {
    dirs: BTreeSet<String>,
    files: BTreeMap<String, Vec<u8>>,
    /// Exclusive locks: path → the client holding it.
    locks: HashMap<String, u64>,
}

impl Default for Fs {
    fn default() -> Self {
        let dirs = ["/", "/Books", "/DCIM", "/iTunes_Control", "/iTunes_Control/iTunes"].map(String::from).into();
        let mut files = BTreeMap::new();
        files.insert("/com.apple.itunes.lock_sync".to_string(), Vec::new());
        Self { inner: Mutex::new(FsInner { dirs, files, locks: HashMap::new() }), next_client: AtomicU64::new(1) }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn normalize(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    format!("/{}", parts.join("/"))
}

fn parent(path: &str) -> String {
    match path.rfind('/') {
        Some(0) | None => "/".into(),
        Some(i) => path[..i].to_string(),
    }
}

impl Fs {
    /// A file's bytes (tests read what a host wrote, e.g. RestoreApplications.plist).
    pub fn read(&self, path: &str) -> Option<Vec<u8>> {
        lock(&self.inner).files.get(&normalize(path)).cloned()
    }
}

/// An open file of one connection.
#[derive(Debug)]
struct Handle {
    path: String,
    pos: usize,
}

fn reply(packet_num: u64, operation: u64, data: &[u8], this_is_whole: bool) -> Vec<u8> {
    let total = (HEADER + data.len()) as u64;
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(&(if this_is_whole { total } else { HEADER as u64 }).to_le_bytes());
    out.extend_from_slice(&packet_num.to_le_bytes());
    out.extend_from_slice(&operation.to_le_bytes());
    out.extend_from_slice(data);
    out
}

fn status_reply(packet_num: u64, code: u64) -> Vec<u8> {
    reply(packet_num, op::STATUS, &code.to_le_bytes(), true)
}

fn c_string(data: &[u8]) -> Option<String> {
    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    std::str::from_utf8(&data[..end]).ok().map(normalize)
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    data.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
}

fn pairs(items: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in items {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Serves one AFC connection.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, state: &DeviceState) -> Result<(), AfcError> {
    let fs = state.afc();
    let client = fs.next_client.fetch_add(1, Ordering::Relaxed);
    let mut handles: HashMap<u64, Handle> = HashMap::new();
    let mut next_handle = 1u64;
    let result = loop {
        let mut header = [0u8; HEADER];
        match s.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        if &header[..8] != MAGIC {
            break Err(AfcError::BadPacket("missing CFA6LPAA magic".into()));
        }
        let field = |i: usize| u64::from_le_bytes(header[8 + 8 * i..16 + 8 * i].try_into().unwrap_or_default());
        let (entire, packet_num, operation) = (field(0), field(2), field(3));
        if !(HEADER as u64..=MAX_PACKET).contains(&entire) {
            break Err(AfcError::BadPacket(format!("length {entire}")));
        }
        let mut data = vec![0u8; entire as usize - HEADER];
        s.read_exact(&mut data).await?;
        tracing::debug!(device.udid = %state.device.udid, afc.op = operation, afc.packet = packet_num, "AFC request");
        let out = handle(fs, client, &mut handles, &mut next_handle, packet_num, operation, &data);
        s.write_all(&out).await?;
        s.flush().await?;
    };
    // A connection that goes away releases its locks.
    lock(&fs.inner).locks.retain(|_, holder| *holder != client);
    result
}

fn handle(
    fs: &Fs,
    client: u64,
    handles: &mut HashMap<u64, Handle>,
    next_handle: &mut u64,
    packet_num: u64,
    operation: u64,
    data: &[u8],
) -> Vec<u8> {
    let mut inner = lock(&fs.inner);
    let status = |code| status_reply(packet_num, code);
    match operation {
        op::GET_FILE_INFO => {
            let Some(path) = c_string(data) else { return status(status::INVALID_ARG) };
            let (size, kind) = if let Some(f) = inner.files.get(&path) {
                (f.len(), "S_IFREG")
            } else if inner.dirs.contains(&path) {
                (0, "S_IFDIR")
            } else {
                return status(status::OBJECT_NOT_FOUND);
            };
            // 2025-01-01, in nanoseconds, as AFC reports times.
            let time = "1735689600000000000".to_string();
            let info = pairs(&[
                ("st_size", size.to_string()),
                ("st_blocks", size.div_ceil(512).to_string()),
                ("st_nlink", "1".into()),
                ("st_ifmt", kind.into()),
                ("st_mtime", time.clone()),
                ("st_birthtime", time),
            ]);
            reply(packet_num, op::DATA, &info, false)
        }
        op::READ_DIR => {
            let Some(path) = c_string(data) else { return status(status::INVALID_ARG) };
            if !inner.dirs.contains(&path) {
                return status(status::OBJECT_NOT_FOUND);
            }
            let prefix = if path == "/" { "/".to_string() } else { format!("{path}/") };
            let mut names = vec![".".to_string(), "..".to_string()];
            let children = inner.dirs.iter().chain(inner.files.keys());
            names.extend(
                children
                    .filter_map(|p| p.strip_prefix(&prefix))
                    .filter(|r| !r.is_empty() && !r.contains('/'))
                    .map(String::from),
            );
            let mut out = Vec::new();
            for n in names {
                out.extend_from_slice(n.as_bytes());
                out.push(0);
            }
            reply(packet_num, op::DATA, &out, false)
        }
        op::GET_DEVINFO => {
            let info = pairs(&[
                ("Model", "iPhone".into()),
                ("FSTotalBytes", (128u64 << 30).to_string()),
                ("FSFreeBytes", (64u64 << 30).to_string()),
                ("FSBlockSize", "4096".into()),
            ]);
            reply(packet_num, op::DATA, &info, false)
        }
        op::MAKE_DIR => {
            let Some(path) = c_string(data) else { return status(status::INVALID_ARG) };
            let mut p = path;
            while p != "/" {
                inner.dirs.insert(p.clone());
                p = parent(&p);
            }
            status(status::SUCCESS)
        }
        op::REMOVE_PATH => {
            let Some(path) = c_string(data) else { return status(status::INVALID_ARG) };
            if inner.files.remove(&path).is_some() {
                return status(status::SUCCESS);
            }
            if !inner.dirs.contains(&path) || path == "/" {
                return status(status::OBJECT_NOT_FOUND);
            }
            let prefix = format!("{path}/");
            let busy = inner.files.keys().chain(inner.dirs.iter()).any(|p| p.starts_with(&prefix));
            if busy {
                return status(status::DIR_NOT_EMPTY);
            }
            inner.dirs.remove(&path);
            status(status::SUCCESS)
        }
        op::FILE_OPEN => {
            let (Some(mode), Some(path)) = (u64_at(data, 0), data.get(8..).and_then(c_string)) else {
                return status(status::INVALID_ARG);
            };
            if inner.dirs.contains(&path) {
                return status(status::OBJECT_IS_DIR);
            }
            // Modes: 1 read-only, 2 read-write (create), 3 write-only (create, truncate),
            // 4 read-write (create, truncate), 5 append, 6 read-append.
            let exists = inner.files.contains_key(&path);
            match mode {
                1 if !exists => return status(status::OBJECT_NOT_FOUND),
                1 => {}
                2 | 5 | 6 => {
                    if !inner.dirs.contains(&parent(&path)) {
                        return status(status::OBJECT_NOT_FOUND);
                    }
                    inner.files.entry(path.clone()).or_default();
                }
                3 | 4 => {
                    if !inner.dirs.contains(&parent(&path)) {
                        return status(status::OBJECT_NOT_FOUND);
                    }
                    inner.files.insert(path.clone(), Vec::new());
                }
                _ => return status(status::INVALID_ARG),
            }
            let h = *next_handle;
            *next_handle += 1;
            handles.insert(h, Handle { path, pos: 0 });
            reply(packet_num, op::FILE_OPEN_RES, &h.to_le_bytes(), true)
        }
        op::READ => {
            let (Some(h), Some(len)) = (u64_at(data, 0), u64_at(data, 8)) else { return status(status::INVALID_ARG) };
            let Some(handle) = handles.get_mut(&h) else { return status(status::BAD_HANDLE) };
            let Some(file) = inner.files.get(&handle.path) else { return status(status::OBJECT_NOT_FOUND) };
            let start = handle.pos.min(file.len());
            let end = start.saturating_add(len.min(MAX_PACKET) as usize).min(file.len());
            handle.pos = end;
            reply(packet_num, op::DATA, &file[start..end], false)
        }
        op::WRITE => {
            let Some(h) = u64_at(data, 0) else { return status(status::INVALID_ARG) };
            let Some(handle) = handles.get_mut(&h) else { return status(status::BAD_HANDLE) };
            let Some(file) = inner.files.get_mut(&handle.path) else { return status(status::OBJECT_NOT_FOUND) };
            let bytes = &data[8..];
            let end = handle.pos + bytes.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            file[handle.pos..end].copy_from_slice(bytes);
            handle.pos = end;
            status(status::SUCCESS)
        }
        op::FILE_CLOSE => {
            let Some(h) = u64_at(data, 0) else { return status(status::INVALID_ARG) };
            match handles.remove(&h) {
                Some(handle) => {
                    if inner.locks.get(&handle.path) == Some(&client)
                        && !handles.values().any(|other| other.path == handle.path)
                    {
                        inner.locks.remove(&handle.path);
                    }
                    status(status::SUCCESS)
                }
                None => status(status::BAD_HANDLE),
            }
        }
        op::FILE_LOCK => {
            let (Some(h), Some(how)) = (u64_at(data, 0), u64_at(data, 8)) else { return status(status::INVALID_ARG) };
            let Some(handle) = handles.get(&h) else { return status(status::BAD_HANDLE) };
            if how & LOCK_UNLOCK != 0 {
                if inner.locks.get(&handle.path) == Some(&client) {
                    inner.locks.remove(&handle.path);
                }
                return status(status::SUCCESS);
            }
            if how & LOCK_EXCLUSIVE == 0 {
                return status(status::SUCCESS);
            }
            match inner.locks.get(&handle.path) {
                Some(holder) if *holder != client => status(status::OP_WOULD_BLOCK),
                _ => {
                    inner.locks.insert(handle.path.clone(), client);
                    status(status::SUCCESS)
                }
            }
        }
        other => {
            tracing::debug!(afc.op = other, "unsupported AFC operation");
            status(status::UNKNOWN_PACKET)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(out: &[u8]) -> (u64, u64, Vec<u8>) {
        assert_eq!(&out[..8], MAGIC);
        let f = |i: usize| u64::from_le_bytes(out[8 + 8 * i..16 + 8 * i].try_into().unwrap());
        assert_eq!(f(0) as usize, out.len());
        (f(2), f(3), out[HEADER..].to_vec())
    }

    fn path(p: &str) -> Vec<u8> {
        let mut v = p.as_bytes().to_vec();
        v.push(0);
        v
    }

    #[test]
    fn lock_file_write_read_and_not_found() {
        let fs = Fs::default();
        let mut handles = HashMap::new();
        let mut next = 1;
        let mut run = |client: u64, handles: &mut HashMap<u64, Handle>, n: u64, op: u64, data: &[u8]| {
            parse(&handle(&fs, client, handles, &mut next, n, op, data))
        };
        let (n, o, d) = run(1, &mut handles, 9, op::GET_FILE_INFO, &path("/iTunes_Control/iTunes/IC-Info.sidb"));
        assert_eq!((n, o, d), (9, op::STATUS, status::OBJECT_NOT_FOUND.to_le_bytes().to_vec()));

        let mut open = 2u64.to_le_bytes().to_vec();
        open.extend(path("/com.apple.itunes.lock_sync"));
        let (_, o, d) = run(1, &mut handles, 10, op::FILE_OPEN, &open);
        assert_eq!(o, op::FILE_OPEN_RES);
        let h = u64::from_le_bytes(d[..8].try_into().unwrap());
        assert_ne!(h, 0, "handle 0 means failure to both hosts");
        let mut lock_ex = h.to_le_bytes().to_vec();
        lock_ex.extend(6u64.to_le_bytes());
        assert_eq!(run(1, &mut handles, 11, op::FILE_LOCK, &lock_ex).2, 0u64.to_le_bytes());
        // Another client opening the same file cannot take the lock.
        let mut other = HashMap::new();
        let (_, _, d) = run(2, &mut other, 1, op::FILE_OPEN, &open);
        let h2 = u64::from_le_bytes(d[..8].try_into().unwrap());
        let mut lock2 = h2.to_le_bytes().to_vec();
        lock2.extend(6u64.to_le_bytes());
        assert_eq!(run(2, &mut other, 2, op::FILE_LOCK, &lock2).2, status::OP_WOULD_BLOCK.to_le_bytes());

        assert_eq!(run(1, &mut handles, 12, op::MAKE_DIR, &path("/iTunesRestore")).2, 0u64.to_le_bytes());
        let mut open_w = 4u64.to_le_bytes().to_vec();
        open_w.extend(path("/iTunesRestore/RestoreApplications.plist"));
        let (_, _, d) = run(1, &mut handles, 13, op::FILE_OPEN, &open_w);
        let hw = u64::from_le_bytes(d[..8].try_into().unwrap());
        let mut write = hw.to_le_bytes().to_vec();
        write.extend_from_slice(b"<plist/>");
        assert_eq!(run(1, &mut handles, 14, op::WRITE, &write).2, 0u64.to_le_bytes());
        assert_eq!(fs.read("/iTunesRestore/RestoreApplications.plist").unwrap(), b"<plist/>");
        let (_, o, d) = run(1, &mut handles, 15, op::GET_FILE_INFO, &path("/iTunesRestore/RestoreApplications.plist"));
        assert_eq!(o, op::DATA);
        let text = String::from_utf8(d).unwrap();
        assert!(text.starts_with("st_size\08\0"), "{text:?}");
        assert!(text.ends_with('\0'), "info ends with a NUL");
    }
}
