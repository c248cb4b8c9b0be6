//! `virtual-iphone serve`: virtual iPhones behind a usbmuxd endpoint on TCP, for tests,
//! demos and load. Point hosts at it with `USBMUXD_SOCKET_ADDRESS=127.0.0.1:PORT`.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use virtual_iphone::{Registry, usbmuxd};

/// A virtual iPhone for tests: speaks the device side of usbmuxd (lockdownd and
/// MobileBackup2 are being built).
#[derive(Debug, Parser)]
#[command(name = "virtual-iphone", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve virtual devices; prints one line per device: UDID, model, iOS version.
    Serve {
        /// usbmuxd address (TCP; the only form every host accepts).
        #[arg(long, default_value = "127.0.0.1:27015")]
        listen: SocketAddr,
        /// How many devices.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        devices: u32,
        /// Seed of the devices' identities (and, later, content).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIRTUAL_IPHONE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let Command::Serve { listen, devices, seed } = Cli::parse().command;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for usbmuxd on {listen}: {e}"))?;
        let registry = Arc::new(Registry::new(seed, devices));
        for d in registry.all() {
            println!("{}\t{}\t{}", d.udid, d.product_type, d.ios_version);
        }
        eprintln!("usbmuxd on {}: export USBMUXD_SOCKET_ADDRESS={}", listener.local_addr()?, listener.local_addr()?);
        tokio::select! {
            () = usbmuxd::serve(listener, registry) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        anyhow::Ok(())
    })
}
