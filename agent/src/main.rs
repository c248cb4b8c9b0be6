//! The `lifeboat-agent` command. The device watcher, backup pipeline and restore land with
//! the agent issue; until then it only identifies itself, so nothing pretends to back up.

use clap::Parser;

/// Lifeboat agent: notices iPhones on USB and backs them up to a Lifeboat server.
///
/// Not functional yet: enrolment, device watching, backup and restore are being built
/// (see README.md, "Status").
#[derive(Debug, Parser)]
#[command(name = "lifeboat-agent", version)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!(
        "lifeboat-agent {}: backup and restore are not implemented yet; see README.md",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
