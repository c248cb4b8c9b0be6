//! What the Lifeboat agent and server agree on, with no I/O: identifiers, secrets, the
//! chunk, pack and manifest formats (and, as it lands, the wire protocol).
//!
//! Invariant: nothing in this crate touches sockets, files, clocks or randomness;
//! callers pass those in (nonces, times, readers). See `ARCHITECTURE.md`.

pub mod chunk;
pub mod format;
pub mod ids;
pub mod ios_backup;
pub mod ios_crypto;
pub mod manifest;
pub mod pack;
pub mod protocol;
pub mod restore;
pub mod secret;
pub mod token;
pub mod wire;

pub use secret::Secret;
