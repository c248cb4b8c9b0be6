//! Benchmark: full MobileBackup2 backups of a `medium` virtual iPhone (~2 GB, ~50,000
//! files) by idevice over loopback TCP usbmuxd and TLS — once into a delegate that
//! discards what it receives (the device side and the protocol alone), once to local disk
//! with idevice's own `FsBackupDelegate` — then an incremental backup after 1 % simulated
//! use.
//!
//! `cargo bench -p virtual-iphone --bench backup` (set `VI_BENCH_PROFILE` for another
//! profile, e.g. `large:5G`). Results go in docs/performance.md.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

#[path = "../tests/it/provider.rs"]
mod provider;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use idevice::IdeviceError;
use idevice::IdeviceService as _;
use idevice::services::mobilebackup2::{BackupDelegate, DirEntryInfo, FsBackupDelegate, MobileBackup2Client};
use plist::{Dictionary, Value};
use virtual_iphone::content::Profile;
use virtual_iphone::{Config, Registry, usbmuxd};

fn main() {
    let profile: Profile = std::env::var("VI_BENCH_PROFILE").unwrap_or_else(|_| "medium".into()).parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let state = tempfile::tempdir().unwrap();
        let root =
            tempfile::tempdir_in(std::env::var("VI_BENCH_DIR").unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").into()))
                .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Config { seed: 11, devices: 1, profile, state_dir: state.path().to_path_buf(), kdf_rounds: 1000 };
        let registry = Arc::new(Registry::new(config).unwrap());
        tokio::spawn(usbmuxd::serve(listener, registry.clone()));
        let device = registry.all()[0].clone();
        let state = registry.state_by_udid(&device.udid).unwrap();
        let started = Instant::now();
        let content = state.content().unwrap();
        println!(
            "profile {profile}: {} files, {:.1} MB (catalog generated in {:.1} s)",
            content.files.len(),
            content.total_bytes() as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
        let provider = provider::NoDelayProvider { addr, device_id: device.device_id, udid: device.udid.clone() };
        let rounds: [(&str, bool, &dyn BackupDelegate); 3] = [
            ("full, received data discarded", true, &Discard),
            ("full, to local disk", true, &FsBackupDelegate),
            ("incremental after 1 % use, to local disk", false, &FsBackupDelegate),
        ];
        for (round, full, delegate) in rounds {
            if !full {
                let used = state.simulate_use(0.01, 1).unwrap();
                println!("simulated use: {used:?}");
            }
            let started = Instant::now();
            let mut client = MobileBackup2Client::connect(&provider).await.unwrap();
            let mut options = Dictionary::new();
            options.insert("ForceFullBackup".into(), Value::Boolean(full));
            let reply = client.backup_from_path(root.path(), Some(&device.udid), Some(options), delegate).await;
            let _ = client.disconnect().await;
            let secs = started.elapsed().as_secs_f64();
            assert_eq!(reply.unwrap().unwrap()["ErrorCode"].as_unsigned_integer(), Some(0));
            let stats = state.stats();
            println!(
                "{round}: {} files, {:.1} MB in {secs:.1} s = {:.0} MB/s",
                stats.last_backup_files,
                stats.last_backup_bytes as f64 / 1e6,
                stats.last_backup_bytes as f64 / 1e6 / secs
            );
        }
    });
}

/// A host that keeps nothing: every file written goes nowhere, nothing exists before.
struct Discard;

type Fut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl BackupDelegate for Discard {
    fn get_free_disk_space(&self, _: &Path) -> u64 {
        u64::MAX / 2
    }
    fn open_file_read<'a>(&'a self, _: &'a Path) -> Fut<'a, Result<Box<dyn std::io::Read + Send>, IdeviceError>> {
        Box::pin(async { Err(IdeviceError::NotFound) })
    }
    fn create_file_write<'a>(&'a self, _: &'a Path) -> Fut<'a, Result<Box<dyn std::io::Write + Send>, IdeviceError>> {
        Box::pin(async { Ok(Box::new(std::io::sink()) as Box<dyn std::io::Write + Send>) })
    }
    fn create_dir_all<'a>(&'a self, _: &'a Path) -> Fut<'a, Result<(), IdeviceError>> {
        Box::pin(async { Ok(()) })
    }
    fn remove<'a>(&'a self, _: &'a Path) -> Fut<'a, Result<(), IdeviceError>> {
        Box::pin(async { Ok(()) })
    }
    fn rename<'a>(&'a self, _: &'a Path, _: &'a Path) -> Fut<'a, Result<(), IdeviceError>> {
        Box::pin(async { Ok(()) })
    }
    fn copy<'a>(&'a self, _: &'a Path, _: &'a Path) -> Fut<'a, Result<(), IdeviceError>> {
        Box::pin(async { Ok(()) })
    }
    fn exists<'a>(&'a self, _: &'a Path) -> Fut<'a, bool> {
        Box::pin(async { false })
    }
    fn is_dir<'a>(&'a self, _: &'a Path) -> Fut<'a, bool> {
        Box::pin(async { false })
    }
    fn list_dir<'a>(&'a self, _: &'a Path) -> Fut<'a, Result<Vec<DirEntryInfo>, IdeviceError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}
