//! The protocol's state machines, without I/O (`docs/protocol.md`): the hello/welcome
//! handshake on both sides, for each request the answer its sender must get, frame by
//! frame, and what the server reads after an upload request (`BytesUpload`,
//! `put_chunks_frame`). The agent and the server only move frames between a QUIC stream and these
//! machines, so a protocol bug reproduces here, in a unit test, without sockets.

use crate::ids::{AgentId, ChunkId, TenantId};
use crate::wire::{self, Data, Enrolled, ErrorCode, Hello, Request, Response, VERSIONS, Welcome};

/// Why an exchange failed, as its sender sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The other side refused, with a code and a message for people.
    #[error("the server refused: {message} ({code:?})")]
    Refused { code: ErrorCode, message: String },
    /// The other side broke the protocol.
    #[error("protocol error: {0}")]
    Violation(String),
}

fn violation(what: impl Into<String>) -> ProtocolError {
    ProtocolError::Violation(what.into())
}

// ---- the handshake ----

/// What the agent holds after a welcome.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub version: u16,
    pub agent: AgentId,
    pub tenant: TenantId,
    pub access_token: String,
    pub enrolled: Option<Enrolled>,
}

/// The agent's hello: every version this build speaks.
pub fn hello(auth: wire::Auth) -> Hello {
    Hello { versions: VERSIONS.to_vec(), auth }
}

/// The agent's reading of the server's welcome: a version it offered, or a refusal.
pub fn on_welcome(offered: &[u16], welcome: Welcome) -> Result<Accepted, ProtocolError> {
    match welcome {
        Welcome::Accepted { version, agent, tenant, access_token, enrolled, .. } => {
            if !offered.contains(&version) {
                return Err(violation(format!("the server chose protocol version {version}, which was not offered")));
            }
            Ok(Accepted { version, agent, tenant, access_token, enrolled })
        }
        Welcome::Refused { code, message } => Err(ProtocolError::Refused { code, message }),
    }
}

/// The server's first look at a hello: the version both speak, or the refusal to send
/// (before anything is authenticated, so an enrolment token offered by an agent that
/// cannot speak to this server is not used up).
pub fn negotiate_hello(hello: &Hello) -> Result<u16, (ErrorCode, String)> {
    wire::negotiate(&hello.versions).ok_or_else(|| {
        (
            ErrorCode::UnsupportedVersion,
            format!(
                "agent speaks protocol versions {:?}; this server speaks {VERSIONS:?}: upgrade lifeboat-agent",
                hello.versions
            ),
        )
    })
}

// ---- the answer to a request ----

/// Which frame the sender of a request must read next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Response,
    Data,
}

/// What a frame fed to an [`Answer`] gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The exchange is over: the answer's response (for downloads, the one that opened it).
    Done(Response),
    /// Nothing to hand out; read the next frame.
    More,
    /// A chunk blob of a `GetChunks` download (not verified: the caller opens it).
    Blob(ChunkId, Vec<u8>),
    /// A part of a `GetManifest` download.
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, Copy)]
enum Shape {
    /// One response of the expected kind.
    One(fn(&Response) -> bool, &'static str),
    /// `Manifest { bytes }`, then `Bytes` parts adding up to `bytes`, then `End`.
    Manifest,
    /// `Ok`, then one `Blob` per chunk asked at most, each asked for, then `End`.
    Chunks,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Head,
    Body { opened: Response, expected: u64, got: u64 },
    Finished,
}

/// The answer a request must get, as a state machine its sender feeds with the frames
/// it reads: [`Answer::next`] says which kind of frame to read, `on_response` and
/// `on_data` take it. An `Error` response ends any exchange as [`ProtocolError::Refused`];
/// any frame out of place ends it as a violation.
#[derive(Debug, Clone)]
pub struct Answer {
    shape: Shape,
    state: State,
    /// For `GetChunks`: the ids asked for, sorted and distinct, and which came.
    asked: Vec<ChunkId>,
    received: Vec<bool>,
}

impl Answer {
    /// The answer `req` must get.
    pub fn to(req: &Request) -> Self {
        let one = |f: fn(&Response) -> bool, what| Shape::One(f, what);
        let shape = match req {
            Request::RegisterDevice { .. }
            | Request::ReportState { .. }
            | Request::EndRun { .. }
            | Request::EndRestore { .. }
            | Request::PutBackupPassword { .. }
            | Request::ReportKeybag { .. } => one(|r| matches!(r, Response::Ok), "Ok"),
            Request::GetBackupPassword { .. } => {
                one(|r| matches!(r, Response::BackupPassword { .. }), "BackupPassword")
            }
            Request::GetEncryptionPolicy { .. } => {
                one(|r| matches!(r, Response::EncryptionPolicy { .. }), "EncryptionPolicy")
            }
            Request::OpenRun { .. } => one(|r| matches!(r, Response::RunOpened { .. }), "RunOpened"),
            Request::MissingChunks { .. } => one(|r| matches!(r, Response::Missing { .. }), "Missing"),
            Request::PutChunks { .. } => one(|r| matches!(r, Response::Stored { .. }), "Stored"),
            Request::Commit { .. } => one(|r| matches!(r, Response::Committed { .. }), "Committed"),
            Request::LatestSnapshot { .. } => one(|r| matches!(r, Response::Snapshot { .. }), "Snapshot"),
            Request::GetPolicy => one(|r| matches!(r, Response::Policy { .. }), "Policy"),
            Request::NextRestore { .. } => {
                one(|r| matches!(r, Response::RestoreJob { .. } | Response::Ok), "RestoreJob or Ok")
            }
            Request::StartJob { .. } => one(|r| matches!(r, Response::RestoreJob { .. }), "RestoreJob"),
            Request::GetManifest { .. } => Shape::Manifest,
            Request::GetChunks { .. } => Shape::Chunks,
        };
        let mut asked = match req {
            Request::GetChunks { ids } => ids.clone(),
            _ => Vec::new(),
        };
        asked.sort_unstable();
        asked.dedup();
        let received = vec![false; asked.len()];
        Self { shape, state: State::Head, asked, received }
    }

    /// The kind of frame to read next; `None` once the exchange is over.
    pub fn next(&self) -> Option<Next> {
        match self.state {
            State::Head => Some(Next::Response),
            State::Body { .. } => Some(Next::Data),
            State::Finished => None,
        }
    }

    pub fn on_response(&mut self, r: Response) -> Result<Step, ProtocolError> {
        if self.state != State::Head {
            return Err(violation("a response where a data frame belongs"));
        }
        if let Response::Error { code, message } = r {
            self.state = State::Finished;
            return Err(ProtocolError::Refused { code, message });
        }
        match self.shape {
            Shape::One(ok, what) => {
                self.state = State::Finished;
                if ok(&r) { Ok(Step::Done(r)) } else { Err(violation(format!("expected {what}, got {r:?}"))) }
            }
            Shape::Manifest => match r {
                Response::Manifest { bytes, .. } => {
                    self.state = State::Body { opened: r, expected: bytes, got: 0 };
                    Ok(Step::More)
                }
                other => Err(violation(format!("expected Manifest, got {other:?}"))),
            },
            Shape::Chunks => match r {
                Response::Ok => {
                    self.state = State::Body { opened: r, expected: self.asked.len() as u64, got: 0 };
                    Ok(Step::More)
                }
                other => Err(violation(format!("expected Ok, got {other:?}"))),
            },
        }
    }

    pub fn on_data(&mut self, d: Data) -> Result<Step, ProtocolError> {
        let State::Body { opened, expected, got } = &mut self.state else {
            return Err(violation("a data frame where a response belongs"));
        };
        match (self.shape, d) {
            (Shape::Manifest, Data::Bytes(part)) => {
                *got += part.len() as u64;
                if *got > *expected {
                    return Err(violation(format!("a manifest announced as {expected} bytes goes on past it")));
                }
                Ok(Step::Bytes(part))
            }
            (Shape::Chunks, Data::Blob { id, blob }) => {
                let Ok(at) = self.asked.binary_search(&id) else {
                    return Err(violation(format!("the server sent chunk {id}, which was not asked for")));
                };
                if std::mem::replace(&mut self.received[at], true) {
                    return Err(violation(format!("the server sent chunk {id} twice")));
                }
                *got += 1;
                Ok(Step::Blob(id, blob))
            }
            (Shape::Manifest, Data::End) if *got != *expected => {
                Err(violation(format!("manifest of {got} bytes announced as {expected}")))
            }
            (Shape::Chunks, Data::End) if *got != *expected => {
                Err(violation(format!("the server sent {got} of the {expected} chunks asked for")))
            }
            (_, Data::End) => {
                let opened = opened.clone();
                self.state = State::Finished;
                Ok(Step::Done(opened))
            }
            (Shape::Manifest, _) => Err(violation("a chunk inside a manifest")),
            (_, _) => Err(violation("bytes inside a chunk download")),
        }
    }
}

// ---- what follows a request ----

/// A refusal the receiving side answers with: a code and a message for people.
pub type Refusal = (ErrorCode, String);

/// What the server reads after `Commit`: `Bytes` parts of at most `max` bytes in all,
/// then `End`.
#[derive(Debug)]
pub struct BytesUpload {
    max: usize,
    bytes: Vec<u8>,
}

impl BytesUpload {
    pub fn new(max: usize) -> Self {
        Self { max, bytes: Vec::new() }
    }

    /// Takes the next data frame: `Ok(true)` once `End` came.
    pub fn on_data(&mut self, d: Data) -> Result<bool, Refusal> {
        match d {
            Data::End => Ok(true),
            Data::Bytes(part) => {
                if self.bytes.len() + part.len() > self.max {
                    return Err((ErrorCode::TooLarge, format!("more than {} bytes", self.max)));
                }
                self.bytes.extend_from_slice(&part);
                Ok(false)
            }
            Data::Blob { .. } => Err((ErrorCode::Malformed, "expected bytes, got a chunk".into())),
        }
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// What the server reads after `PutChunks`: a chunk blob per frame, then `End` — borrowed
/// from the frame buffer, so a blob is never copied out of it.
pub fn put_chunks_frame(d: wire::DataRef<'_>) -> Result<Option<(ChunkId, &[u8])>, Refusal> {
    match d {
        wire::DataRef::End => Ok(None),
        wire::DataRef::Blob { id, blob } => Ok(Some((id, blob))),
        wire::DataRef::Bytes(_) => Err((ErrorCode::Malformed, "expected chunk blobs".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{RestoreJobId, RunId, SnapshotId};
    use crate::wire::Auth;

    fn uuid(n: u128) -> uuid::Uuid {
        uuid::Uuid::from_u128(n)
    }

    #[test]
    fn the_handshake_agrees_on_a_version_or_says_why_not() {
        let h = hello(Auth::Access { token: "t".into() });
        assert_eq!(h.versions, VERSIONS);
        assert_eq!(negotiate_hello(&h), Ok(6));
        assert_eq!(negotiate_hello(&Hello { versions: vec![2, 3, 4, 5], ..h.clone() }), Ok(5));
        assert_eq!(negotiate_hello(&Hello { versions: vec![2, 3, 4], ..h.clone() }), Ok(4));
        assert_eq!(negotiate_hello(&Hello { versions: vec![2, 3], ..h.clone() }), Ok(3));
        assert_eq!(negotiate_hello(&Hello { versions: vec![2], ..h.clone() }), Ok(2));
        let old = Hello { versions: vec![1], ..h.clone() };
        let (code, message) = negotiate_hello(&old).unwrap_err();
        assert_eq!(code, ErrorCode::UnsupportedVersion);
        assert_eq!(
            message,
            format!("agent speaks protocol versions [1]; this server speaks {VERSIONS:?}: upgrade lifeboat-agent")
        );

        let accepted = |version| Welcome::Accepted {
            version,
            agent: AgentId(uuid(1)),
            tenant: TenantId(uuid(2)),
            access_token: "a".into(),
            access_expires_in_seconds: 900,
            enrolled: None,
        };
        assert_eq!(on_welcome(&h.versions, accepted(2)).unwrap().version, 2);
        assert_eq!(on_welcome(&h.versions, accepted(3)).unwrap().version, 3);
        assert_eq!(on_welcome(&h.versions, accepted(4)).unwrap().version, 4);
        assert_eq!(on_welcome(&h.versions, accepted(5)).unwrap().version, 5);
        assert_eq!(on_welcome(&h.versions, accepted(6)).unwrap().version, 6);
        assert_eq!(
            on_welcome(&h.versions, accepted(7)).unwrap_err(),
            violation("the server chose protocol version 7, which was not offered")
        );
        let refused = Welcome::Refused { code: ErrorCode::Revoked, message: "enrol again".into() };
        assert_eq!(
            on_welcome(&h.versions, refused).unwrap_err(),
            ProtocolError::Refused { code: ErrorCode::Revoked, message: "enrol again".into() }
        );
    }

    #[test]
    fn a_request_gets_its_own_kind_of_response_or_a_refusal() {
        let run = RunId(uuid(3));
        let mut a = Answer::to(&Request::OpenRun { udid: "00008030-001A2B3C4D5E6F70".parse().unwrap(), resume: None });
        assert_eq!(a.next(), Some(Next::Response));
        let opened = Response::RunOpened { run, snapshot: SnapshotId(uuid(4)), lease_seconds: 600 };
        assert_eq!(a.on_response(opened.clone()), Ok(Step::Done(opened)));
        assert_eq!(a.next(), None);

        // The bug this pins: a client numbering requests wrongly gets an answer of another
        // kind, and must say so rather than take it.
        let mut a = Answer::to(&Request::NextRestore { udid: "00008030-001A2B3C4D5E6F70".parse().unwrap() });
        assert_eq!(
            a.on_response(Response::Policy { backup_interval_seconds: 86_400 }),
            Err(violation("expected RestoreJob or Ok, got Policy { backup_interval_seconds: 86400 }"))
        );
        let mut a = Answer::to(&Request::NextRestore { udid: "00008030-001A2B3C4D5E6F70".parse().unwrap() });
        let job = Response::RestoreJob { job: RestoreJobId(uuid(5)), snapshot: SnapshotId(uuid(6)) };
        assert_eq!(a.on_response(job.clone()), Ok(Step::Done(job)));

        let mut a = Answer::to(&Request::EndRun { run, end: wire::RunEnd::Cancelled { reason: "shutdown".into() } });
        let refusal = Response::Error { code: ErrorCode::LeaseLost, message: "run is failed".into() };
        assert_eq!(
            a.on_response(refusal),
            Err(ProtocolError::Refused { code: ErrorCode::LeaseLost, message: "run is failed".into() })
        );
        assert_eq!(a.next(), None);
        assert_eq!(a.on_data(Data::End), Err(violation("a data frame where a response belongs")));
    }

    #[test]
    fn a_manifest_download_adds_up_to_what_was_announced() {
        let snapshot = SnapshotId(uuid(7));
        let head = Response::Manifest { snapshot, bytes: 5 };
        let mut a = Answer::to(&Request::GetManifest { snapshot });
        assert_eq!(a.on_response(head.clone()), Ok(Step::More));
        assert_eq!(a.next(), Some(Next::Data));
        assert_eq!(a.on_data(Data::Bytes(b"abc".to_vec())), Ok(Step::Bytes(b"abc".to_vec())));
        assert_eq!(a.on_data(Data::Bytes(b"de".to_vec())), Ok(Step::Bytes(b"de".to_vec())));
        assert_eq!(a.on_data(Data::End), Ok(Step::Done(head.clone())));

        let mut short = Answer::to(&Request::GetManifest { snapshot });
        short.on_response(head.clone()).unwrap();
        short.on_data(Data::Bytes(b"abc".to_vec())).unwrap();
        assert_eq!(short.on_data(Data::End), Err(violation("manifest of 3 bytes announced as 5")));
        let mut long = Answer::to(&Request::GetManifest { snapshot });
        long.on_response(head.clone()).unwrap();
        assert_eq!(
            long.on_data(Data::Bytes(b"abcdef".to_vec())),
            Err(violation("a manifest announced as 5 bytes goes on past it"))
        );
        let mut mixed = Answer::to(&Request::GetManifest { snapshot });
        mixed.on_response(head).unwrap();
        assert_eq!(
            mixed.on_data(Data::Blob { id: ChunkId([0; 32]), blob: vec![] }),
            Err(violation("a chunk inside a manifest"))
        );
    }

    #[test]
    fn uploads_after_a_request_end_in_end_within_their_limits() {
        let mut up = BytesUpload::new(5);
        assert_eq!(up.on_data(Data::Bytes(b"abc".to_vec())), Ok(false));
        assert_eq!(up.on_data(Data::Bytes(b"de".to_vec())), Ok(false));
        assert_eq!(up.on_data(Data::End), Ok(true));
        assert_eq!(up.into_bytes(), b"abcde");
        let mut over = BytesUpload::new(2);
        assert_eq!(over.on_data(Data::Bytes(b"abc".to_vec())), Err((ErrorCode::TooLarge, "more than 2 bytes".into())));
        let mut blob = BytesUpload::new(2);
        let chunk = Data::Blob { id: ChunkId([0; 32]), blob: vec![] };
        assert_eq!(blob.on_data(chunk), Err((ErrorCode::Malformed, "expected bytes, got a chunk".into())));

        let id = ChunkId([4; 32]);
        assert_eq!(put_chunks_frame(wire::DataRef::Blob { id, blob: b"x" }), Ok(Some((id, &b"x"[..]))));
        assert_eq!(put_chunks_frame(wire::DataRef::End), Ok(None));
        assert_eq!(
            put_chunks_frame(wire::DataRef::Bytes(b"x")),
            Err((ErrorCode::Malformed, "expected chunk blobs".into()))
        );
    }

    #[test]
    fn a_chunk_download_brings_only_what_was_asked() {
        let (a_id, b_id) = (ChunkId([1; 32]), ChunkId([2; 32]));
        let req = Request::GetChunks { ids: vec![b_id, a_id] };
        let mut a = Answer::to(&req);
        assert_eq!(a.on_response(Response::Ok), Ok(Step::More));
        assert_eq!(a.on_data(Data::Blob { id: a_id, blob: vec![1] }), Ok(Step::Blob(a_id, vec![1])));
        assert_eq!(a.on_data(Data::Blob { id: b_id, blob: vec![2] }), Ok(Step::Blob(b_id, vec![2])));
        assert_eq!(a.on_data(Data::End), Ok(Step::Done(Response::Ok)));

        let mut extra = Answer::to(&req);
        extra.on_response(Response::Ok).unwrap();
        let stranger = ChunkId([3; 32]);
        assert_eq!(
            extra.on_data(Data::Blob { id: stranger, blob: vec![] }),
            Err(violation(format!("the server sent chunk {stranger}, which was not asked for")))
        );
        let mut bytes = Answer::to(&req);
        bytes.on_response(Response::Ok).unwrap();
        assert_eq!(bytes.on_data(Data::Bytes(vec![1])), Err(violation("bytes inside a chunk download")));
        let mut twice = Answer::to(&req);
        twice.on_response(Response::Ok).unwrap();
        twice.on_data(Data::Blob { id: a_id, blob: vec![1] }).unwrap();
        assert_eq!(
            twice.on_data(Data::Blob { id: a_id, blob: vec![1] }),
            Err(violation(format!("the server sent chunk {a_id} twice")))
        );
        let mut short = Answer::to(&req);
        short.on_response(Response::Ok).unwrap();
        short.on_data(Data::Blob { id: b_id, blob: vec![2] }).unwrap();
        assert_eq!(short.on_data(Data::End), Err(violation("the server sent 1 of the 2 chunks asked for")));
        let mut refused = Answer::to(&req);
        assert_eq!(
            refused.on_response(Response::Error { code: ErrorCode::NotFound, message: "1 of 2 chunks".into() }),
            Err(ProtocolError::Refused { code: ErrorCode::NotFound, message: "1 of 2 chunks".into() })
        );
    }
}
