//! The agent ↔ server wire protocol, version 2 (`docs/protocol.md`; every frame's bytes
//! pinned by `shared/tests/golden/`).
//!
//! QUIC (ALPN `lifeboat/1`); every message is a frame: `length u32be | postcard payload`,
//! with a hard size limit checked before the payload is read. The first bidirectional
//! stream of a connection carries [`Hello`] → [`Welcome`]; after a welcome, each request
//! opens its own bidirectional stream: one [`Request`] frame, then (for uploads) [`Data`]
//! frames ending in [`Data::End`]; the server answers with [`Response`] frames (and
//! [`Data`] frames for downloads).
//!
//! No I/O here: frames are read from and written to any `futures_io` stream the caller
//! passes (QUIC streams in the agent and server, [`MemStream`] in tests).

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_io::{AsyncRead, AsyncWrite};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::format::MAX_BLOB_BYTES;
use crate::ids::{AgentId, ChunkId, RestoreJobId, RunId, SnapshotId, TenantId, Udid};
use crate::manifest::DeviceInfo;
use crate::secret::Secret;

/// QUIC/TLS application protocol name.
pub const ALPN: &[u8] = b"lifeboat/1";
/// Versions of this protocol that this build speaks, newest last. Version 3 is version 2
/// with the backup-password requests and the `NeedsBackupPassword` state appended; an
/// agent uses those only in a session of version 3. Version 4 appends the encryption
/// policy (`GetEncryptionPolicy`, `EncryptionPolicy`). Version 5 appends `ReportKeybag`.
/// Version 6 appends `StartJob` (a restore or export a help-desk user started at the
/// workstation); from version 6 the server serves a snapshot's manifest and chunks only
/// to the agent running a job on it, and a device's backup password only to the agent
/// holding its lease or a job on its snapshot.
pub const VERSIONS: &[u16] = &[2, 3, 4, 5, 6];
/// The first version with `GetBackupPassword`, `PutBackupPassword` and
/// `DeviceState::NeedsBackupPassword`.
pub const ESCROW_VERSION: u16 = 3;
/// The first version with `GetEncryptionPolicy` and `Response::EncryptionPolicy`.
pub const ENCRYPTION_POLICY_VERSION: u16 = 4;
/// The first version with `ReportKeybag`.
pub const KEYBAG_VERSION: u16 = 5;
/// The first version with `StartJob`.
pub const START_JOB_VERSION: u16 = 6;
/// Longest help-desk credential a `StartJob` carries.
pub const MAX_CREDENTIAL_BYTES: usize = 256;
/// Largest backup keybag a `ReportKeybag` carries (a phone's is about 1.5 KiB).
pub const MAX_KEYBAG_BYTES: usize = 64 * 1024;
/// Largest control frame (hello, requests, responses).
pub const MAX_CONTROL_FRAME_BYTES: usize = 1024 * 1024;
/// Largest data frame: one blob, or one part of a byte stream, plus framing.
pub const MAX_DATA_FRAME_BYTES: usize = MAX_BLOB_BYTES + 1024;
/// Part size of byte streams (manifests).
pub const BYTES_PART: usize = 1024 * 1024;
/// Most chunk ids in one missing-chunks query or one download request.
pub const MAX_IDS_PER_REQUEST: usize = 16_384;

/// A refusal or failure a peer can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// No protocol version in common.
    UnsupportedVersion,
    /// Token or credential unknown, forged, or for another server.
    BadCredential,
    /// Token expired.
    Expired,
    /// Enrolment token already used.
    AlreadyUsed,
    /// The agent was revoked.
    Revoked,
    /// Not allowed for this agent (another tenant's device, snapshot or run).
    Forbidden,
    NotFound,
    /// Another agent holds the device's backup lease.
    LeaseHeld,
    /// The run's lease expired or the run is finished.
    LeaseLost,
    /// A frame that does not decode, or a request that breaks the rules.
    Malformed,
    /// A frame over the size limit.
    TooLarge,
    /// A chunk whose content does not match its id; nothing of it was stored.
    ChunkMismatch,
    /// A commit references chunks the server does not hold.
    MissingChunks,
    /// The server failed; retrying later may help.
    Internal,
}

/// How the agent proves who it is in [`Hello`]. `Debug` hides every secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Auth {
    /// First contact: the secret of a one-time enrolment token.
    Enroll {
        #[serde(with = "serde_bytes")]
        token_secret: Vec<u8>,
        hostname: String,
        agent_version: String,
    },
    /// A short-lived access token (JWT).
    Access { token: String },
    /// The agent's long-lived refresh secret, to get a new access token.
    Refresh {
        agent: AgentId,
        #[serde(with = "serde_bytes")]
        secret: Vec<u8>,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Enroll { hostname, agent_version, .. } => f
                .debug_struct("Enroll")
                .field("token_secret", &"***")
                .field("hostname", hostname)
                .field("agent_version", agent_version)
                .finish(),
            Self::Access { .. } => f.debug_struct("Access").field("token", &"***").finish(),
            Self::Refresh { agent, .. } => {
                f.debug_struct("Refresh").field("agent", agent).field("secret", &"***").finish()
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub versions: Vec<u16>,
    pub auth: Auth,
}

/// What the agent keeps after enrolling (sent once, over TLS).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    #[serde(with = "serde_bytes")]
    pub refresh_secret: Vec<u8>,
    pub id_key: [u8; 32],
    pub data_key: [u8; 32],
}

impl std::fmt::Debug for Enrolled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Enrolled(***)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Welcome {
    Accepted {
        version: u16,
        agent: AgentId,
        tenant: TenantId,
        access_token: String,
        access_expires_in_seconds: u32,
        enrolled: Option<Enrolled>,
    },
    Refused {
        code: ErrorCode,
        message: String,
    },
}

/// Device states the agent reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    Idle,
    BackingUp,
    NeedsTrust,
    NeedsPasscode,
    Failing,
    /// The phone encrypts its backups with a password the server does not know.
    NeedsBackupPassword,
}

impl DeviceState {
    /// The name used in the database, the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::BackingUp => "backing-up",
            Self::NeedsTrust => "needs-trust",
            Self::NeedsPasscode => "needs-passcode",
            Self::Failing => "failing",
            Self::NeedsBackupPassword => "needs-backup-password",
        }
    }
}

/// The reason codes a run or restore job ends with: those `lifeboat-agent` sends
/// (`RunEnd`, `RestoreEnd`) and those the server sets itself. Another well-formed code is
/// stored and shown as sent, but a metric counts it as `other`, so what an agent sends
/// cannot create series.
pub const REASONS: &[&str] = &[
    "backup-failed",
    "device-disconnected",
    "device-error",
    "download-failed",
    "lease-expired",
    "needs-backup-password",
    "needs-passcode",
    "needs-trust",
    "out-of-space",
    "restore-failed",
    "upload-failed",
];

/// `reason` as a metric label: itself if it is one of [`REASONS`], else `other`.
pub fn metric_reason(reason: &str) -> &str {
    if REASONS.contains(&reason) { reason } else { "other" }
}

/// How a run ended, when it did not commit a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunEnd {
    Failed { reason: String, message: String },
    Cancelled { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    RegisterDevice {
        device: DeviceInfo,
        serial_number: Option<String>,
    },
    ReportState {
        udid: Udid,
        state: DeviceState,
        message: Option<String>,
    },
    /// Open (or, with `resume`, re-open) a backup run: takes the device's lease.
    OpenRun {
        udid: Udid,
        resume: Option<RunId>,
    },
    /// Which of these does the server lack?
    MissingChunks {
        run: RunId,
        ids: Vec<ChunkId>,
    },
    /// Followed by [`Data::Blob`] frames and [`Data::End`].
    PutChunks {
        run: RunId,
    },
    /// Followed by the sealed manifest as [`Data::Bytes`] parts and [`Data::End`].
    Commit {
        run: RunId,
        snapshot: SnapshotId,
    },
    EndRun {
        run: RunId,
        end: RunEnd,
    },
    LatestSnapshot {
        udid: Udid,
    },
    /// Answered by [`Response::Manifest`], then [`Data::Bytes`] parts and [`Data::End`].
    GetManifest {
        snapshot: SnapshotId,
    },
    /// Answered by [`Data::Blob`] frames and [`Data::End`].
    GetChunks {
        ids: Vec<ChunkId>,
    },
    /// The server's backup policy: answered by [`Response::Policy`].
    GetPolicy,
    /// Claims the oldest queued restore job for this attached device: answered by
    /// [`Response::RestoreJob`], or [`Response::Ok`] when there is none.
    NextRestore {
        udid: Udid,
    },
    /// How a claimed restore job ended.
    EndRestore {
        job: RestoreJobId,
        end: RestoreEnd,
    },
    /// The device's escrowed iOS backup password: answered by [`Response::BackupPassword`].
    GetBackupPassword {
        udid: Udid,
    },
    /// Escrow a backup password the agent generated, before it sets it on the phone.
    PutBackupPassword {
        udid: Udid,
        password: Secret<String>,
    },
    /// Whether the device's backups must be encrypted by the phone (its tenant's policy):
    /// answered by [`Response::EncryptionPolicy`]. Version 4.
    GetEncryptionPolicy {
        udid: Udid,
    },
    /// The `BackupKeyBag` of a backup the phone encrypted with a password the server does
    /// not know (none escrowed, or the escrowed one does not unlock it): the server checks
    /// an admin's password against it before it keeps one. Version 5.
    ReportKeybag {
        udid: Udid,
        #[serde(with = "serde_bytes")]
        keybag: Vec<u8>,
    },
    /// Starts a job that reads a snapshot — a restore onto a phone attached here, or an
    /// export — for a help-desk user at this workstation, who proves it with their API
    /// credential (checked by the server and recorded as the job's creator). The job is
    /// this agent's at once: answered by [`Response::RestoreJob`]; ended by `EndRestore`.
    /// Version 6.
    StartJob {
        credential: Secret<String>,
        job: JobRequest,
    },
}

/// What a [`Request::StartJob`] asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobRequest {
    /// Restore the snapshot onto the iPhone `target`, attached to this workstation.
    Restore { target: Udid, source: JobSource },
    /// Export the snapshot's files to this workstation.
    Export { source: JobSource },
}

/// Which snapshot a job reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobSource {
    Snapshot(SnapshotId),
    /// The device's newest snapshot.
    LatestOf(Udid),
}

/// How a restore job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestoreEnd {
    Succeeded,
    Failed { reason: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Data {
    Blob {
        id: ChunkId,
        #[serde(with = "serde_bytes")]
        blob: Vec<u8>,
    },
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    End,
}

/// [`Data`] borrowing its bytes: the same encoding, so a sender need not copy a blob into
/// a message and a receiver can decode a frame without copying it out of its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataRef<'a> {
    Blob {
        id: ChunkId,
        #[serde(borrow, with = "serde_bytes")]
        blob: &'a [u8],
    },
    Bytes(#[serde(borrow, with = "serde_bytes")] &'a [u8]),
    End,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Ok,
    RunOpened {
        run: RunId,
        snapshot: SnapshotId,
        lease_seconds: u32,
    },
    Missing {
        ids: Vec<ChunkId>,
    },
    Stored {
        chunks: u32,
        new_chunks: u32,
        new_bytes: u64,
    },
    Committed {
        snapshot: SnapshotId,
        files: u64,
        logical_bytes: u64,
    },
    Snapshot {
        snapshot: SnapshotId,
        device: DeviceInfo,
        created_unix_ms: i64,
    },
    Manifest {
        snapshot: SnapshotId,
        bytes: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Back up an attached device when its last successful backup is older than this.
    Policy {
        backup_interval_seconds: u64,
    },
    /// A restore job this agent now holds: restore `snapshot` onto the device.
    RestoreJob {
        job: RestoreJobId,
        snapshot: SnapshotId,
    },
    /// The escrowed password, or `None` when the server knows none for the device.
    BackupPassword {
        password: Option<Secret<String>>,
    },
    /// `required`: an agent turns encryption on (with an escrowed password) before it
    /// backs up a phone that does not encrypt. Version 4.
    EncryptionPolicy {
        required: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the {1}-byte limit")]
    TooLarge(usize, usize),
    #[error("frame does not decode: {0}")]
    Malformed(String),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The code to tell the peer about a frame it sent.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooLarge(..) => ErrorCode::TooLarge,
            _ => ErrorCode::Malformed,
        }
    }
}

/// Encodes `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Invariant: serialising our own types into a Vec cannot fail.
    let mut frame = postcard::to_extend(msg, vec![0u8; 4]).expect("postcard into Vec");
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    frame
}

/// The frame of a [`DataRef::Blob`] up to its blob: `header ++ blob` is exactly
/// `encode(&DataRef::Blob { id, blob })`. A sender writes the header and then hands over
/// the blob itself, so a blob is never copied into a message buffer.
pub fn blob_frame_header(id: &ChunkId, blob_len: usize) -> Vec<u8> {
    // The message with an empty blob ends in its length, the one-byte varint 0.
    let mut frame = encode(&DataRef::Blob { id: *id, blob: &[] });
    frame.pop();
    let mut varint = [0u8; 10];
    // Invariant: a usize varint takes at most 10 bytes.
    let len = postcard::to_slice(&blob_len, &mut varint).expect("varint fits").len();
    frame.extend_from_slice(&varint[..len]);
    let payload = (frame.len() - 4 + blob_len) as u32;
    frame[..4].copy_from_slice(&payload.to_be_bytes());
    frame
}

/// Decodes one frame's payload, borrowing bytes from it (for [`DataRef`]).
pub fn decode_borrowed<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, FrameError> {
    postcard::from_bytes(payload).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Decodes one frame's payload.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(payload).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Fills `buf` from `r`; `Ok(false)` if the stream ended cleanly before the first byte.
pub async fn read_exact_or_eof<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<bool, FrameError> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = std::future::poll_fn(|cx| Pin::new(&mut *r).poll_read(cx, &mut buf[filled..])).await?;
        if n == 0 {
            return if filled == 0 { Ok(false) } else { Err(FrameError::Truncated) };
        }
        filled += n;
    }
    Ok(true)
}

/// Writes all of `buf`: a frame encoded by hand, such as a [`blob_frame_header`].
pub async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, mut buf: &[u8]) -> Result<(), FrameError> {
    while !buf.is_empty() {
        let n = std::future::poll_fn(|cx| Pin::new(&mut *w).poll_write(cx, buf)).await?;
        if n == 0 {
            return Err(FrameError::Io(std::io::ErrorKind::WriteZero.into()));
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// Reads one frame of at most `max` bytes; `None` at a clean end of stream.
pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<T>, FrameError> {
    let mut payload = Vec::new();
    match read_frame_into(r, max, &mut payload).await? {
        None => Ok(None),
        Some(len) => decode(&payload[..len]).map(Some),
    }
}

/// Reads one frame's payload into `buf` (grown as needed, never shrunk, so a reader of
/// many frames allocates and zeroes once) and returns its length; `None` at a clean end
/// of stream. Decode `&buf[..len]`, for example as a [`DataRef`].
pub async fn read_frame_into<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    buf: &mut Vec<u8>,
) -> Result<Option<usize>, FrameError> {
    let mut len = [0u8; 4];
    if !read_exact_or_eof(r, &mut len).await? {
        return Ok(None);
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge(len, max));
    }
    if buf.len() < len {
        buf.resize(len, 0);
    }
    if !read_exact_or_eof(r, &mut buf[..len]).await? && len > 0 {
        return Err(FrameError::Truncated);
    }
    Ok(Some(len))
}

/// Reads one frame that must be there.
pub async fn expect_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<T, FrameError> {
    read_frame(r, max).await?.ok_or(FrameError::Truncated)
}

/// Writes one frame.
pub async fn write_frame<T: Serialize, W: AsyncWrite + Unpin>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    write_all(w, &encode(msg)).await
}

/// Picks the newest version both sides speak.
pub fn negotiate(offered: &[u16]) -> Option<u16> {
    VERSIONS.iter().rev().find(|v| offered.contains(v)).copied()
}

/// An in-memory stream, for protocol tests of both sides without sockets.
#[derive(Debug, Default)]
pub struct MemStream {
    pub buf: Vec<u8>,
    pub pos: usize,
}

impl AsyncRead for MemStream {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, out: &mut [u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let n = out.len().min(this.buf.len() - this.pos);
        out[..n].copy_from_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for MemStream {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.get_mut().buf.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: Future>(f: F) -> F::Output {
        // The futures here never pend: poll once with a no-op waker.
        let mut f = std::pin::pin!(f);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("MemStream futures never pend"),
        }
    }

    #[test]
    fn frames_round_trip() {
        let mut s = MemStream::default();
        let hello = Hello { versions: vec![2], auth: Auth::Access { token: "t".into() } };
        let data = Data::Blob { id: ChunkId([7; 32]), blob: vec![1, 2, 3] };
        block_on(write_frame(&mut s, &hello)).unwrap();
        block_on(write_frame(&mut s, &data)).unwrap();
        assert_eq!(block_on(read_frame::<Hello, _>(&mut s, MAX_CONTROL_FRAME_BYTES)).unwrap(), Some(hello));
        assert_eq!(block_on(read_frame::<Data, _>(&mut s, MAX_DATA_FRAME_BYTES)).unwrap(), Some(data));
        assert_eq!(block_on(read_frame::<Data, _>(&mut s, MAX_DATA_FRAME_BYTES)).unwrap(), None);
    }

    #[test]
    fn a_blob_frame_header_and_its_blob_are_the_whole_frame() {
        // Lengths around each varint width, up to the largest blob.
        for len in [0, 1, 127, 128, 16_383, 16_384, 524_288, 2_097_151, 2_097_152, MAX_BLOB_BYTES] {
            let blob: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let id = ChunkId([len as u8; 32]);
            let mut frame = blob_frame_header(&id, len);
            frame.extend_from_slice(&blob);
            assert_eq!(frame, encode(&DataRef::Blob { id, blob: &blob }), "blob of {len} bytes");
        }
    }

    #[test]
    fn borrowed_data_has_the_owned_encoding_and_reads_into_a_reused_buffer() {
        let owned = [
            Data::Blob { id: ChunkId([3; 32]), blob: vec![9; 1000] },
            Data::Bytes(vec![1, 2]),
            Data::End,
            Data::Blob { id: ChunkId([4; 32]), blob: vec![] },
        ];
        let borrowed = [
            DataRef::Blob { id: ChunkId([3; 32]), blob: &[9; 1000] },
            DataRef::Bytes(&[1, 2]),
            DataRef::End,
            DataRef::Blob { id: ChunkId([4; 32]), blob: &[] },
        ];
        let mut s = MemStream::default();
        for (o, b) in owned.iter().zip(&borrowed) {
            assert_eq!(encode(o), encode(b));
            block_on(write_frame(&mut s, b)).unwrap();
        }
        let mut buf = Vec::new();
        for b in &borrowed {
            let len = block_on(read_frame_into(&mut s, MAX_DATA_FRAME_BYTES, &mut buf)).unwrap().unwrap();
            assert_eq!(decode_borrowed::<DataRef<'_>>(&buf[..len]).unwrap(), *b);
        }
        assert_eq!(buf.len(), 1000 + 32 + 3, "grown to the largest frame, never shrunk");
        assert_eq!(block_on(read_frame_into(&mut s, MAX_DATA_FRAME_BYTES, &mut buf)).unwrap(), None);
        let mut s = MemStream { buf: (u32::MAX).to_be_bytes().to_vec(), pos: 0 };
        let err = block_on(read_frame_into(&mut s, MAX_DATA_FRAME_BYTES, &mut buf)).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_, MAX_DATA_FRAME_BYTES)));
    }

    #[test]
    fn oversized_malformed_and_truncated_frames_are_errors() {
        let mut s = MemStream { buf: (u32::MAX).to_be_bytes().to_vec(), pos: 0 };
        let err = block_on(read_frame::<Hello, _>(&mut s, MAX_CONTROL_FRAME_BYTES)).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_, MAX_CONTROL_FRAME_BYTES)));
        assert_eq!(err.code(), ErrorCode::TooLarge);

        let mut s = MemStream { buf: vec![0, 0, 0, 3, 0xff, 0xff, 0xff], pos: 0 };
        let err = block_on(read_frame::<Hello, _>(&mut s, MAX_CONTROL_FRAME_BYTES)).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");

        let mut s = MemStream { buf: vec![0, 0, 0, 9, 1], pos: 0 };
        let err = block_on(read_frame::<Hello, _>(&mut s, MAX_CONTROL_FRAME_BYTES)).unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
        let mut s = MemStream { buf: vec![0, 0], pos: 0 };
        let err = block_on(read_frame::<Hello, _>(&mut s, MAX_CONTROL_FRAME_BYTES)).unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
    }

    #[test]
    fn versions_are_negotiated_or_refused() {
        assert_eq!(negotiate(&[2]), Some(2));
        assert_eq!(negotiate(&[1, 2, 3, 4, 5, 6, 7]), Some(6));
        assert_eq!(negotiate(&[1]), None, "v1 is no longer spoken");
        assert_eq!(negotiate(&[7]), None);
        assert_eq!(negotiate(&[]), None);
    }

    #[test]
    fn the_enrolment_secret_never_prints() {
        let e = Enrolled { refresh_secret: vec![1; 32], id_key: [2; 32], data_key: [3; 32] };
        assert_eq!(format!("{e:?}"), "Enrolled(***)");
        let h = Hello {
            versions: vec![1],
            auth: Auth::Enroll { token_secret: vec![42; 32], hostname: "ws1".into(), agent_version: "0.1".into() },
        };
        assert!(!format!("{h:?}").contains("42"), "{h:?}");
        let a = Auth::Access { token: "eyJhbGciOi.secret".into() };
        assert!(!format!("{a:?}").contains("secret"));
    }
}
