//! `virtual-iphone`: virtual iPhones behind a usbmuxd endpoint on TCP, for tests, demos and
//! load. `serve` runs them (point hosts at it with `USBMUXD_SOCKET_ADDRESS=127.0.0.1:PORT`),
//! `ctl` drives a running `serve`, `expect` prints a device's content as ground truth.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use virtual_iphone::content::Profile;
use virtual_iphone::control::{self, Request, Response};
use virtual_iphone::devices::{Config, Faults};
use virtual_iphone::{Registry, usbmuxd};

/// A virtual iPhone for tests: the device side of usbmuxd, lockdownd, MobileBackup2 and
/// the helper services, with synthetic content.
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
        /// Where devices keep their content and restored files (and the control socket).
        #[arg(long)]
        state: PathBuf,
        /// How many devices.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        devices: u32,
        /// Content of each device: tiny, small, medium, or large:SIZE (e.g. large:20G).
        #[arg(long, default_value = "small")]
        profile: Profile,
        /// Seed of the devices' identities and content.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// PBKDF2 rounds of the keybags a backup password makes (DPIC; ITER is at most
        /// 10,000). iOS uses 10,000,000 (seconds of CPU); tests may use far fewer.
        #[arg(long, default_value_t = virtual_iphone::encryption::DEFAULT_KDF_ROUNDS,
              value_parser = clap::value_parser!(u32).range(1..=20_000_000))]
        kdf_rounds: u32,
    },
    /// Drive a running `serve` through its control socket.
    Ctl {
        /// The `serve`'s state directory.
        #[arg(long)]
        state: PathBuf,
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        op: CtlOp,
    },
    /// Print a device's current content: domain, relativePath, size, sha256 (tab-separated, sorted).
    Expect {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        udid: String,
    },
}

#[derive(Debug, Subcommand)]
enum CtlOp {
    /// List the devices with their state.
    List,
    /// Plug a device in.
    Plug { udid: String },
    /// Pull a device out (its open connections are cut).
    Unplug { udid: String },
    /// Simulate days of use: add photos, messages and contacts, change app data, delete files.
    Use {
        udid: String,
        /// About this fraction of the device's content changes (0–1).
        #[arg(long, default_value_t = 0.01)]
        fraction: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// The next backup or restore waits for the passcode, then fails with 208 if not entered.
    RequirePasscode {
        udid: String,
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// "Enter" the passcode on the device.
    EnterPasscode { udid: String },
    /// The device does not trust this computer yet (usbmuxd has no pair record for it).
    Untrust { udid: String },
    /// "Tap Trust" on the device: usbmuxd has its pair record again.
    Trust { udid: String },
    /// The device's backup password, as its user or another computer set it: the host
    /// does not know it. `--mdm-forced`: a profile forces encrypted backups (the phone
    /// refuses to back up without a password or to turn encryption off). `--off`: no
    /// password, not forced.
    #[command(group(clap::ArgGroup::new("how").required(true).args(["password", "mdm_forced", "off"])))]
    Encryption {
        udid: String,
        #[arg(long)]
        password: Option<String>,
        #[arg(long)]
        mdm_forced: bool,
        #[arg(long)]
        off: bool,
    },
    /// Inject faults into the device's backups and restores (no flag clears them).
    Fault {
        udid: String,
        /// Cut the next backup connection after this many bytes.
        #[arg(long)]
        drop_after: Option<u64>,
        /// Send at most this many MB/s.
        #[arg(long)]
        throttle: Option<f64>,
        /// Free space for restores, in bytes.
        #[arg(long)]
        restore_space: Option<u64>,
    },
}

/// What `serve` records so `expect` can rebuild a device that never ran.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Recorded {
    seed: u64,
    devices: u32,
    profile: String,
}

fn registry_file(state: &Path) -> PathBuf {
    state.join("registry.json")
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIRTUAL_IPHONE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match Cli::parse().command {
        Command::Serve { listen, state, devices, profile, seed, kdf_rounds } => {
            rt.block_on(serve(listen, state, Config { seed, devices, profile, state_dir: PathBuf::new(), kdf_rounds }))
        }
        Command::Ctl { state, json, op } => rt.block_on(ctl(&state, json, op)),
        Command::Expect { state, udid } => expect(&state, &udid),
    }
}

async fn serve(listen: SocketAddr, state: PathBuf, config: Config) -> anyhow::Result<()> {
    let Config { seed, devices, profile, kdf_rounds, .. } = config;
    std::fs::create_dir_all(&state).with_context(|| format!("creating the state directory {}", state.display()))?;
    let recorded = Recorded { seed, devices, profile: profile.to_string() };
    std::fs::write(registry_file(&state), serde_json::to_vec_pretty(&recorded)?)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for usbmuxd on {listen}"))?;
    let socket = control::socket_path(&state);
    let _ = std::fs::remove_file(&socket);
    let ctl =
        tokio::net::UnixListener::bind(&socket).with_context(|| format!("control socket {}", socket.display()))?;
    let registry = Arc::new(Registry::new(Config { seed, devices, profile, state_dir: state.clone(), kdf_rounds })?);
    let mut out = std::io::stdout().lock();
    for d in registry.all() {
        writeln!(out, "{}\t{}\t{}", d.udid, d.product_type, d.ios_version)?;
    }
    out.flush()?;
    drop(out);
    let addr = listener.local_addr()?;
    eprintln!(
        "usbmuxd on {addr}: export USBMUXD_SOCKET_ADDRESS={addr}; control: virtual-iphone ctl --state {}",
        state.display()
    );
    tokio::select! {
        () = usbmuxd::serve(listener, registry.clone()) => {}
        () = control::serve(ctl, registry) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

async fn ctl(state: &Path, json: bool, op: CtlOp) -> anyhow::Result<()> {
    let request = match op {
        CtlOp::List => Request::List,
        CtlOp::Plug { udid } => Request::Plug { udid },
        CtlOp::Unplug { udid } => Request::Unplug { udid },
        CtlOp::Use { udid, fraction, seed } => Request::Use { udid, fraction, seed },
        CtlOp::RequirePasscode { udid, timeout_secs } => Request::RequirePasscode { udid, timeout_secs },
        CtlOp::EnterPasscode { udid } => Request::EnterPasscode { udid },
        CtlOp::Untrust { udid } => Request::Untrust { udid },
        CtlOp::Trust { udid } => Request::Trust { udid },
        CtlOp::Encryption { udid, password, mdm_forced, off } => {
            Request::Encryption { udid, password, mdm_forced, off }
        }
        CtlOp::Fault { udid, drop_after, throttle, restore_space } => Request::SetFaults {
            udid,
            faults: Faults {
                drop_after_bytes: drop_after,
                throttle_mb_per_s: throttle,
                restore_space_bytes: restore_space,
            },
        },
    };
    let response = control::call(state, &request).await?;
    if json {
        println!("{}", serde_json::to_string(&response)?);
    } else {
        match &response {
            Response::Devices { devices } => {
                for d in devices {
                    let plugged = if d.plugged { "plugged" } else { "unplugged" };
                    let passcode = if d.waiting_for_passcode { "\twaiting-for-passcode" } else { "" };
                    let encryption = match (d.encrypted, d.mdm_forced) {
                        (true, true) => "encrypted,mdm-forced",
                        (true, false) => "encrypted",
                        (false, true) => "mdm-forced",
                        (false, false) => "unencrypted",
                    };
                    println!(
                        "{}\t{}\t{}\t{plugged}\t{encryption}\tbackups={}{passcode}",
                        d.udid, d.product_type, d.ios_version, d.stats.backups
                    );
                }
            }
            Response::Used { added, changed, deleted, added_bytes, changed_bytes } => {
                println!(
                    "added {added} files ({added_bytes} bytes), changed {changed} ({changed_bytes} bytes), deleted {deleted}"
                );
            }
            Response::Ok => {}
            Response::Error { .. } => {}
        }
    }
    if let Response::Error { message } = response {
        anyhow::bail!(message);
    }
    Ok(())
}

fn expect(state: &Path, udid: &str) -> anyhow::Result<()> {
    let recorded: Recorded = serde_json::from_slice(
        &std::fs::read(registry_file(state))
            .with_context(|| format!("{} is not a virtual-iphone state directory", state.display()))?,
    )?;
    let profile: Profile = recorded.profile.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let registry = Registry::new(Config {
        seed: recorded.seed,
        devices: recorded.devices,
        profile,
        state_dir: state.to_path_buf(),
        kdf_rounds: virtual_iphone::encryption::DEFAULT_KDF_ROUNDS,
    })?;
    let device =
        registry.state_by_udid(udid).with_context(|| format!("no virtual device {udid} in {}", state.display()))?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for line in device.expect()? {
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}
