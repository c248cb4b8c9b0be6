//! End-to-end tests: real lifeboat-server processes on the embedded defaults.

// Test code: an unwrap is an assertion, and its panic message is the failure report.
#![allow(clippy::unwrap_used)]

mod agent;
mod agent_run;
mod api;
mod console;
mod crash_resume;
mod encrypted;
mod escrow;
mod ingest;
mod jobs;
mod leases;
mod least_privilege;
mod monitoring;
mod operator_cli;
mod server_lifecycle;
mod verify;
