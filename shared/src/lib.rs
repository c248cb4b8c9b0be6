//! What the Lifeboat agent and server agree on, with no I/O: identifiers, secrets,
//! and (as they land) the wire protocol, chunk, pack and manifest formats.
//!
//! Invariant: nothing in this crate touches sockets, files, clocks or randomness;
//! callers pass those in. See `ARCHITECTURE.md`.

pub mod secret;

pub use secret::Secret;
