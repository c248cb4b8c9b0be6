//! Integration tests of lifeboat-server's library and binary against a real PostgreSQL
//! (a private cluster per test process, a fresh database per test).

// Test code: an unwrap is an assertion, and its panic message is the failure report.
#![allow(clippy::unwrap_used)]

mod audit;
mod cli;
mod http;
mod layout;
mod migrations;
mod pg_cluster;
mod storage;
mod tenants;
mod tls;
