//! MobileBackup2 against idevice's real host client (the agent's library): full and
//! incremental backups equal the device's ground truth, restores onto another model,
//! unplugging mid-backup, the passcode prompt, out of space, many devices at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use idevice::IdeviceService as _;
use idevice::services::mobilebackup2::{FsBackupDelegate, MobileBackup2Client, RestoreOptions};
use idevice::usbmuxd::UsbmuxdAddr;
use plist::{Dictionary, Value};
use virtual_iphone::content::Profile;
use virtual_iphone::devices::Faults;
use virtual_iphone::manifest;
use virtual_iphone::{Config, Registry, usbmuxd};

use crate::provider::NoDelayProvider;

pub struct Rig {
    pub addr: std::net::SocketAddr,
    pub registry: Arc<Registry>,
    pub _state: tempfile::TempDir,
}

pub async fn rig(devices: u32, profile: Profile) -> Rig {
    if let Ok(filter) = std::env::var("VIRTUAL_IPHONE_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
    let state = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config { seed: 5, devices, profile, state_dir: state.path().to_path_buf(), kdf_rounds: 1000 };
    let registry = Arc::new(Registry::new(config).unwrap());
    tokio::spawn(usbmuxd::serve(listener, registry.clone()));
    Rig { addr, registry, _state: state }
}

impl Rig {
    pub fn udid(&self, n: usize) -> String {
        self.registry.all()[n].udid.clone()
    }

    async fn client(&self, udid: &str) -> Result<MobileBackup2Client, idevice::IdeviceError> {
        let mut mux = UsbmuxdAddr::TcpSocket(self.addr).connect(1).await?;
        let device = mux.get_device(udid).await?;
        let provider = NoDelayProvider { addr: self.addr, device_id: device.device_id, udid: udid.to_string() };
        MobileBackup2Client::connect(&provider).await
    }

    /// One backup with idevice, as the agent makes it; the device's final reply.
    pub async fn backup(&self, udid: &str, root: &Path, full: bool) -> Result<Dictionary, idevice::IdeviceError> {
        let mut client = self.client(udid).await?;
        let options = full.then(|| {
            let mut o = Dictionary::new();
            o.insert("ForceFullBackup".into(), Value::Boolean(true));
            o
        });
        let reply = client.backup_from_path(root, Some(udid), options, &FsBackupDelegate).await?;
        let _ = client.disconnect().await;
        Ok(reply.unwrap_or_default())
    }

    pub async fn restore(
        &self,
        target: &str,
        source: &str,
        root: &Path,
        reboot: bool,
        password: Option<&str>,
    ) -> Result<Dictionary, idevice::IdeviceError> {
        let mut client = self.client(target).await?;
        let mut options = RestoreOptions::new().with_reboot(reboot);
        if let Some(p) = password {
            options = options.with_password(p);
        }
        let reply = client.restore_from_path(root, Some(source), Some(options), &FsBackupDelegate).await?;
        let _ = client.disconnect().await;
        Ok(reply.unwrap_or_default())
    }

    pub fn expect(&self, udid: &str) -> Vec<String> {
        self.registry.state_by_udid(udid).unwrap().expect().unwrap()
    }
}

pub fn error_code(reply: &Dictionary) -> u64 {
    reply.get("ErrorCode").and_then(Value::as_unsigned_integer).unwrap_or(u64::MAX)
}

pub fn sha256_file(path: &Path) -> (u64, String) {
    let bytes = std::fs::read(path).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    (bytes.len() as u64, digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// A backup directory's content in `expect`'s format, from its Manifest.db and blobs;
/// checks Status.plist says finished and no `Snapshot` directory is left.
pub fn backup_content(dir: &Path) -> Vec<String> {
    let status = manifest::read_status_plist(&std::fs::read(dir.join("Status.plist")).unwrap()).unwrap();
    assert_eq!(status.snapshot_state, "finished");
    assert!(!dir.join("Snapshot").exists(), "the snapshot directory is removed at the end");
    let rows = manifest::read_manifest_db(&std::fs::read(dir.join("Manifest.db")).unwrap()).unwrap();
    let mut lines: Vec<String> = rows
        .iter()
        .filter(|r| r.flags == 1)
        .map(|r| {
            let (size, sha) = sha256_file(&dir.join(&r.file_id[..2]).join(&r.file_id));
            assert_eq!(size, r.size, "{}/{}: Manifest.db size", r.domain, r.path);
            format!("{}\t{}\t{size}\t{sha}", r.domain, r.path)
        })
        .collect();
    lines.sort();
    // No blob that the manifest does not list.
    let listed: std::collections::HashSet<&str> = rows.iter().map(|r| r.file_id.as_str()).collect();
    for entry in walk(dir) {
        let name = entry.file_name().unwrap().to_string_lossy().to_string();
        if name.len() == 40 {
            assert!(listed.contains(name.as_str()), "stray blob {name}");
        }
    }
    lines
}

/// Bytes of the regular files under `dir` (0 while it does not exist).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_incremental_backup_equals_the_device_and_sends_only_changes() {
    let rig = rig(1, Profile::Small).await;
    let udid = rig.udid(0);
    let root = tempfile::tempdir().unwrap();

    let reply = rig.backup(&udid, root.path(), true).await.unwrap();
    assert_eq!(error_code(&reply), 0, "{reply:?}");
    let truth = rig.expect(&udid);
    assert!(truth.len() > 4000, "a small device has thousands of files: {}", truth.len());
    assert_eq!(backup_content(&root.path().join(&udid)), truth);
    let full = rig.registry.state_by_udid(&udid).unwrap().stats();
    assert_eq!(full.last_backup_files as usize, truth.len());

    // Simulated use, then an incremental backup: only new and changed files travel.
    let used = rig.registry.state_by_udid(&udid).unwrap().simulate_use(0.01, 7).unwrap();
    assert!(used.added > 0 && used.changed > 0 && used.deleted > 0, "{used:?}");
    let reply = rig.backup(&udid, root.path(), false).await.unwrap();
    assert_eq!(error_code(&reply), 0, "{reply:?}");
    let incremental = rig.registry.state_by_udid(&udid).unwrap().stats();
    assert_eq!(incremental.last_backup_files, used.added + used.changed);
    assert_eq!(incremental.last_backup_bytes, used.added_bytes + used.changed_bytes);
    let truth = rig.expect(&udid);
    assert_eq!(backup_content(&root.path().join(&udid)), truth, "incremental result equals the device");

    // A fresh full backup of the same device has the same content.
    let fresh = tempfile::tempdir().unwrap();
    assert_eq!(error_code(&rig.backup(&udid, fresh.path(), true).await.unwrap()), 0);
    assert_eq!(backup_content(&fresh.path().join(&udid)), truth);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_onto_another_model_makes_it_hold_the_backup_and_reboots_it() {
    let rig = rig(2, Profile::Tiny).await;
    let (a, b) = (rig.udid(0), rig.udid(1));
    assert_ne!(rig.registry.all()[0].product_type, rig.registry.all()[1].product_type);
    let root = tempfile::tempdir().unwrap();
    assert_eq!(error_code(&rig.backup(&a, root.path(), true).await.unwrap()), 0);
    write_info_plist(&root.path().join(&a), &a, "17.5.1");
    let backed_up = backup_content(&root.path().join(&a));
    assert_ne!(rig.expect(&b), backed_up);

    let mut events = rig.registry.subscribe();
    let reply = rig.restore(&b, &a, root.path(), true, None).await.unwrap();
    assert_eq!(error_code(&reply), 0, "{reply:?}");
    assert_eq!(rig.expect(&b), backed_up, "B holds A's backup");
    // The reboot: Detached, then Attached.
    let id = rig.registry.by_udid(&b).unwrap().device_id;
    let detached = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.unwrap().unwrap();
    assert_eq!(detached, virtual_iphone::devices::Event::Detached(id));
    let attached = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.unwrap().unwrap();
    assert!(matches!(attached, virtual_iphone::devices::Event::Attached(ref d) if d.udid == b));

    // B, backed up now, has the same content as A's backup.
    let again = tempfile::tempdir().unwrap();
    assert_eq!(error_code(&rig.backup(&b, again.path(), true).await.unwrap()), 0);
    assert_eq!(backup_content(&again.path().join(&b)), backed_up);
}

/// Info.plist, which hosts write (restore reads its product version).
pub fn write_info_plist(dir: &Path, udid: &str, version: &str) {
    let mut info = Dictionary::new();
    info.insert("Product Version".into(), version.into());
    info.insert("Target Identifier".into(), udid.into());
    info.insert("Unique Identifier".into(), udid.to_uppercase().into());
    plist::to_file_xml(dir.join("Info.plist"), &info).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_errors_are_the_real_codes() {
    let rig = rig(2, Profile::Tiny).await;
    let (a, b) = (rig.udid(0), rig.udid(1));
    let root = tempfile::tempdir().unwrap();
    assert_eq!(error_code(&rig.backup(&a, root.path(), true).await.unwrap()), 0);
    write_info_plist(&root.path().join(&a), &a, "17.5.1");
    let before = rig.expect(&b);

    // Out of space during the restore: 105, and the device keeps its content.
    let state = rig.registry.state_by_udid(&b).unwrap();
    state.set_faults(Faults { restore_space_bytes: Some(100_000), ..Faults::default() });
    let reply = rig.restore(&b, &a, root.path(), false, None).await.unwrap();
    assert_eq!(error_code(&reply), 105, "{reply:?}");
    assert_eq!(rig.expect(&b), before);
    state.set_faults(Faults::default());

    // A backup from a newer iOS than the device runs.
    write_info_plist(&root.path().join(&a), &a, "99.0");
    let reply = rig.restore(&b, &a, root.path(), false, None).await.unwrap();
    assert_eq!(error_code(&reply), 209, "{reply:?}");

    // An unfinished backup.
    write_info_plist(&root.path().join(&a), &a, "17.5.1");
    let status = manifest::status_plist("uploading", true, "X", std::time::SystemTime::now());
    std::fs::write(root.path().join(&a).join("Status.plist"), status).unwrap();
    let reply = rig.restore(&b, &a, root.path(), false, None).await.unwrap();
    assert_eq!(error_code(&reply), 204, "{reply:?}");
    assert_eq!(rig.expect(&b), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passcode_prompt_waits_then_fails_with_208_or_goes_on_when_entered() {
    let rig = rig(1, Profile::Tiny).await;
    let udid = rig.udid(0);
    let state = rig.registry.state_by_udid(&udid).unwrap();
    let root = tempfile::tempdir().unwrap();

    state.require_passcode(Duration::from_millis(300));
    let reply = rig.backup(&udid, root.path(), true).await.unwrap();
    assert_eq!(error_code(&reply), 208, "{reply:?}");

    state.require_passcode(Duration::from_secs(30));
    let backup = {
        let root = root.path().to_path_buf();
        let udid = udid.clone();
        let rig = &rig;
        async move { rig.backup(&udid, &root, true).await }
    };
    let enter = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !state.waiting_for_passcode() {
            assert!(std::time::Instant::now() < deadline, "the device did not ask for its passcode within 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        state.enter_passcode();
    };
    let (reply, ()) = tokio::join!(backup, enter);
    assert_eq!(error_code(&reply.unwrap()), 0);
    assert_eq!(backup_content(&root.path().join(&udid)), rig.expect(&udid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplugging_mid_backup_is_a_clean_error_and_the_next_backup_succeeds() {
    let rig = rig(1, Profile::Tiny).await;
    let udid = rig.udid(0);
    let state = rig.registry.state_by_udid(&udid).unwrap();
    let root = tempfile::tempdir().unwrap();
    // Slow the device down (its few MB take seconds) and unplug it once the host has
    // staged 200,000 bytes of them: mid-transfer.
    state.set_faults(Faults { throttle_mb_per_s: Some(2.0), ..Faults::default() });
    let registry = rig.registry.clone();
    let unplug = {
        let (udid, staging) = (udid.clone(), root.path().join(&udid).join("Snapshot"));
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while dir_bytes(&staging) < 200_000 {
                assert!(std::time::Instant::now() < deadline, "the host did not stage 200,000 bytes within 30 s");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(registry.set_plugged(&udid, false));
        }
    };
    let (result, ()) = tokio::join!(rig.backup(&udid, root.path(), true), unplug);
    assert!(result.is_err(), "the host sees the connection go: {result:?}");
    assert!(rig.backup(&udid, root.path(), true).await.is_err(), "an unplugged device cannot be backed up");

    rig.registry.set_plugged(&udid, true);
    state.set_faults(Faults::default());
    let reply = rig.backup(&udid, root.path(), false).await.unwrap();
    assert_eq!(error_code(&reply), 0, "{reply:?}");
    assert_eq!(backup_content(&root.path().join(&udid)), rig.expect(&udid));

    // A connection dropped after some bytes (fault injection) is also a clean error, once.
    state.set_faults(Faults { drop_after_bytes: Some(200_000), ..Faults::default() });
    assert!(rig.backup(&udid, root.path(), true).await.is_err());
    assert_eq!(error_code(&rig.backup(&udid, root.path(), true).await.unwrap()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_serves_fifty_devices_while_ten_back_up_at_once() {
    let rig = rig(50, Profile::Tiny).await;
    let root = tempfile::tempdir().unwrap();
    let udids: Vec<String> = (0..50).step_by(5).map(|n| rig.udid(n)).collect();
    let backups = udids.iter().map(|u| rig.backup(u, root.path(), true));
    let replies = futures_util::future::join_all(backups).await;
    let mut seen = BTreeMap::new();
    for (udid, reply) in udids.iter().zip(replies) {
        assert_eq!(error_code(&reply.unwrap()), 0, "{udid}");
        let content = backup_content(&root.path().join(udid));
        assert_eq!(content, rig.expect(udid), "{udid}");
        seen.insert(udid.clone(), content.len());
    }
    assert_eq!(seen.len(), 10);
    let mut mux = UsbmuxdAddr::TcpSocket(rig.addr).connect(9).await.unwrap();
    assert_eq!(mux.get_devices().await.unwrap().len(), 50);
}
