//! Restore: reading committed snapshots back — for agents (`LatestSnapshot`,
//! `GetManifest`, `GetChunks`, restore jobs claimed and ended), for the help-desk API,
//! and for restore tests (`verify`), which rebuild a snapshot exactly as a restore does.
//! `read` is the server's one read path: locate chunks in the index, read neighbouring
//! blobs with one ranged read, and (for the API and restore tests) open and re-hash them.
//! Never here: writing to storage or changing the chunk index.

pub mod agent;
pub mod export;
pub mod preview;
pub mod read;
pub mod verify;
