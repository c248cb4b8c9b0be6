//! An authenticated agent's session, and the refusals sent back to it as
//! `Response::Error` — shared by every subsystem that answers agents.

use lifeboat_shared::ids::{AgentId, TenantId};
use lifeboat_shared::wire::{ErrorCode, FrameError};

/// An authenticated agent connection.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    pub agent: AgentId,
    pub tenant: TenantId,
}

/// A refusal sent to the agent as `Response::Error`.
#[derive(Debug)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// A server-side failure: logged here with its cause, reported to the agent without it.
    pub fn internal(what: &str, e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "{what}");
        Self::new(ErrorCode::Internal, format!("{what} failed on the server; retry later"))
    }
}

impl From<tokio_postgres::Error> for Rejection {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::internal("a database query", e)
    }
}

impl From<deadpool_postgres::PoolError> for Rejection {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::internal("getting a database connection", e)
    }
}

impl From<FrameError> for Rejection {
    fn from(e: FrameError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

/// The outcome of answering a request with no value of its own.
pub type Reply = Result<(), Rejection>;

/// Valid reason codes: `device-disconnected` and the like.
pub fn valid_reason(r: &str) -> bool {
    (1..=64).contains(&r.len()) && r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}
