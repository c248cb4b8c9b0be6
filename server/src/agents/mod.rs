//! The QUIC edge for agents: the endpoint and its hello/welcome handshake (`endpoint`,
//! authenticating through `crate::auth`), and the dispatch of each request stream to the
//! subsystem that answers it (`dispatch`: ingest for backups, restore for reads).
//! Never here: SQL (auth asks `store`), or what a request does once dispatched.

pub mod dispatch;
pub mod endpoint;

use std::sync::Arc;

use crate::app::App;
use crate::ingest::Ingest;

/// What every agent connection shares.
#[derive(Debug)]
pub struct Agents {
    pub app: Arc<App>,
    pub ingest: Ingest,
    /// What agents may read (`restore::agent`).
    pub reads: crate::restore::agent::Reads,
}
