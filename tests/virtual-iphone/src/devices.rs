//! The virtual devices one process serves: identity derived from a seed, plugged in or
//! not, and the events usbmuxd listeners see when that changes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, watch};

use crate::afc;
use crate::content::{Content, ContentError, FileEntry, FileKey, Profile, UseSummary};
use crate::encryption::Encryption;
use crate::manifest::DeviceFacts;
use crate::pairing::{Identity, PairingError};

/// How long a virtual device is gone while it reboots.
pub const REBOOT_TIME: Duration = Duration::from_secs(2);

/// Models a virtual device can be, with an iOS version each (all ≥ 10, see the reference:
/// libimobiledevice caps TLS at 1.0 below that).
const MODELS: &[(&str, &str, &str)] = &[
    ("iPhone14,5", "17.5.1", "21F90"),
    ("iPhone15,2", "17.6", "21G80"),
    ("iPhone16,1", "18.1", "22B83"),
    ("iPhone13,2", "16.7.8", "20H343"),
];

/// One virtual iPhone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// usbmuxd's handle for the device (1, 2, …).
    pub device_id: u32,
    /// `XXXXXXXX-XXXXXXXXXXXXXXXX`, as iPhones since the XS have.
    pub udid: String,
    pub product_type: String,
    pub ios_version: String,
    pub build_version: String,
    pub name: String,
    pub serial_number: String,
}

impl Device {
    /// The `n`-th device (from 0) of a seed: the same seed always gives the same devices.
    pub fn from_seed(seed: u64, n: u32) -> Self {
        let mut s = seed ^ (u64::from(n) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let (product_type, ios_version, build_version) = MODELS[n as usize % MODELS.len()];
        let chip = 0x8000 + (next() % 0x200) as u16;
        let udid = format!("{chip:08X}-{:016X}", next() & 0x00FF_FFFF_FFFF_FFFF);
        let serial: String =
            (0..10).map(|_| char::from(b"ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"[(next() % 34) as usize])).collect();
        Self {
            device_id: n + 1,
            udid,
            product_type: product_type.into(),
            ios_version: ios_version.into(),
            build_version: build_version.into(),
            name: format!("Virtual iPhone {}", n + 1),
            serial_number: serial,
        }
    }
}

/// What usbmuxd listeners are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Attached(Device),
    Detached(u32),
}

/// Faults a test injects into a device's MobileBackup2 connections.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Faults {
    /// Cut the next backup connection once this many bytes were sent (then the fault clears).
    pub drop_after_bytes: Option<u64>,
    /// Send backup data at most this fast (MB/s).
    pub throttle_mb_per_s: Option<f64>,
    /// Free space for a restore: one needing more fails with "out of space" (105).
    pub restore_space_bytes: Option<u64>,
}

/// The passcode prompt iOS 16.1 and later show before a backup or restore.
#[derive(Debug)]
struct Passcode {
    required: bool,
    entered: bool,
    waiting: bool,
    timeout: Duration,
}

/// One device's live state: plugged in or not, the hosts it trusts, the services a host
/// has started on it, its content, faults and passcode prompt.
#[derive(Debug)]
pub struct DeviceState {
    pub device: Device,
    plugged: watch::Sender<bool>,
    faults: Mutex<Faults>,
    passcode: Mutex<Passcode>,
    passcode_entered: Notify,
    /// HostIDs that may start a lockdown session (the pre-made record's, and hosts that paired).
    paired_hosts: Mutex<HashSet<String>>,
    /// Ports a `StartService` opened and no `Connect` has used yet.
    grants: Mutex<HashMap<u16, u32>>,
    /// `<state>/<udid>`: the device's content catalog and restored files.
    dir: PathBuf,
    seed: u64,
    profile: Profile,
    /// Loaded (or generated) on first use; replaced as a whole when it changes.
    content: Mutex<Option<Arc<Content>>>,
    afc: afc::Fs,
    stats: Mutex<Stats>,
    encryption: Encryption,
}

/// What the device has done, for tests and `ctl status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub backups: u64,
    /// Files and bytes the last backup uploaded.
    pub last_backup_files: u64,
    pub last_backup_bytes: u64,
    pub restores: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Pairing(#[from] PairingError),
    #[error("device content: {0}")]
    Content(#[from] ContentError),
    #[error("state directory {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
}

/// What a registry is made from.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    pub devices: u32,
    pub profile: Profile,
    /// Where each device keeps its content catalog and restored files.
    pub state_dir: PathBuf,
    /// PBKDF2 count of the keybags a backup password makes (DPIC; ITER is at most 10,000).
    pub kdf_rounds: u32,
}

impl DeviceState {
    pub fn is_plugged(&self) -> bool {
        *self.plugged.borrow()
    }

    /// Resolves when the device is pulled out (at once if it is out already).
    pub async fn unplugged(&self) {
        let mut rx = self.plugged.subscribe();
        // An error means the sender is gone: the device is gone too.
        let _ = rx.wait_for(|plugged| !*plugged).await;
    }

    pub fn trusts(&self, host_id: &str) -> bool {
        lock(&self.paired_hosts).contains(host_id)
    }

    pub fn pair(&self, host_id: &str) {
        lock(&self.paired_hosts).insert(host_id.to_string());
    }

    pub fn unpair(&self, host_id: &str) -> bool {
        lock(&self.paired_hosts).remove(host_id)
    }

    /// Records that a `StartService` opened `port` for one connection.
    pub fn grant(&self, port: u16) {
        *lock(&self.grants).entry(port).or_default() += 1;
    }

    pub fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.faults) = faults;
    }

    /// The drop-after fault fired: the next connection runs clean.
    pub fn clear_drop_fault(&self) {
        lock(&self.faults).drop_after_bytes = None;
    }

    /// The next backup or restore waits for the passcode, at most `timeout`.
    pub fn require_passcode(&self, timeout: Duration) {
        let mut p = lock(&self.passcode);
        p.required = true;
        p.entered = false;
        p.timeout = timeout;
    }

    /// The user types the passcode: a waiting backup goes on (or the next one will not wait).
    pub fn enter_passcode(&self) {
        lock(&self.passcode).entered = true;
        self.passcode_entered.notify_waiters();
    }

    /// Whether a backup is waiting for the passcode right now.
    pub fn waiting_for_passcode(&self) -> bool {
        lock(&self.passcode).waiting
    }

    /// Waits for the passcode when one is required; false when it was not entered in time
    /// (the request then fails with "device locked", 208, and the next one asks again).
    pub async fn wait_for_passcode(&self) -> bool {
        let timeout = {
            let mut p = lock(&self.passcode);
            if !p.required || p.entered {
                p.required = false;
                p.entered = false;
                return true;
            }
            p.waiting = true;
            p.timeout
        };
        // Whatever ends the wait (entered, timed out, or the host gone and this future
        // dropped), the device is no longer waiting.
        struct NotWaiting<'a>(&'a Mutex<Passcode>);
        impl Drop for NotWaiting<'_> {
            fn drop(&mut self) {
                lock(self.0).waiting = false;
            }
        }
        let _not_waiting = NotWaiting(&self.passcode);
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(timeout).unwrap_or(now + Duration::from_secs(86_400 * 365));
        loop {
            let notified = self.passcode_entered.notified();
            {
                let mut p = lock(&self.passcode);
                if p.entered {
                    p.required = false;
                    p.entered = false;
                    p.waiting = false;
                    return true;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                lock(&self.passcode).waiting = false;
                return false;
            }
        }
    }

    /// The device's content now (generated from its seed and saved the first time).
    pub fn content(&self) -> Result<Arc<Content>, ContentError> {
        let mut slot = lock(&self.content);
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let path = self.dir.join("content.json");
        let content = if path.exists() {
            Content::load(&path)?
        } else {
            let seed = self.seed ^ u64::from(self.device.device_id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let c = Content::generate(seed, self.profile)?;
            c.save(&path)?;
            c
        };
        let content = Arc::new(content);
        *slot = Some(content.clone());
        Ok(content)
    }

    fn set_content(&self, content: Content) -> Result<(), ContentError> {
        content.save(&self.dir.join("content.json"))?;
        *lock(&self.content) = Some(Arc::new(content));
        Ok(())
    }

    /// Where restored files are kept, by SHA-256.
    pub fn blobs_dir(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    /// Ground truth: `domain<TAB>relativePath<TAB>size<TAB>sha256` per file a backup
    /// carries now, sorted: with a backup password, also what only encrypted backups carry.
    pub fn expect(&self) -> Result<Vec<String>, ContentError> {
        Ok(self.content()?.expect(&self.blobs_dir(), self.encryption.will_encrypt())?)
    }

    /// The backup password and the keys it makes.
    pub fn encryption(&self) -> &Encryption {
        &self.encryption
    }

    /// Simulated use: photos, messages and contacts added, app data changed, files deleted;
    /// the summary counts what the next backup carries.
    pub fn simulate_use(&self, fraction: f64, use_seed: u64) -> Result<UseSummary, ContentError> {
        let mut content = (*self.content()?).clone();
        let summary = content.simulate_use_seen(fraction, use_seed, self.encryption.will_encrypt())?;
        self.set_content(content)?;
        Ok(summary)
    }

    /// After a restore: the device holds exactly the restored files.
    pub fn restore_content(&self, files: BTreeMap<FileKey, (String, u64, i64, u32)>) -> Result<(), ContentError> {
        let mut content = (*self.content()?).clone();
        content.replace_with_stored(
            files
                .into_iter()
                .map(|(key, (sha256, size, mtime, mode))| (key, FileEntry::stored(size, mtime, mode, sha256)))
                .collect(),
        );
        self.set_content(content)?;
        lock(&self.stats).restores += 1;
        Ok(())
    }

    /// The app bundles installed (those with an `AppDomain-` container).
    pub fn app_bundles(&self) -> Vec<String> {
        self.content().map(|c| c.app_bundles()).unwrap_or_default()
    }

    pub fn facts(&self) -> DeviceFacts {
        let d = &self.device;
        DeviceFacts {
            udid: d.udid.clone(),
            product_type: d.product_type.clone(),
            product_version: d.ios_version.clone(),
            build_version: d.build_version.clone(),
            serial_number: d.serial_number.clone(),
            device_name: d.name.clone(),
        }
    }

    pub fn afc(&self) -> &afc::Fs {
        &self.afc
    }

    pub fn record_backup(&self, files: u64, bytes: u64) {
        let mut stats = lock(&self.stats);
        stats.backups += 1;
        stats.last_backup_files = files;
        stats.last_backup_bytes = bytes;
    }

    pub fn stats(&self) -> Stats {
        lock(&self.stats).clone()
    }

    /// Uses one grant of `port`; false when no `StartService` opened it.
    pub fn take_grant(&self, port: u16) -> bool {
        let mut grants = lock(&self.grants);
        match grants.get_mut(&port) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

/// The devices of one process, and the host-side state usbmuxd keeps (BUID, pair records).
#[derive(Debug)]
pub struct Registry {
    devices: BTreeMap<u32, Arc<DeviceState>>,
    /// Records hosts saved (`Some`) or deleted (`None`) by UDID; a device with no entry
    /// has its pre-made record.
    pair_records: Mutex<HashMap<String, Option<Vec<u8>>>>,
    events: broadcast::Sender<Event>,
    /// The host's system BUID, as `ReadBUID` returns it.
    pub buid: String,
    /// Keys, certificates and the TLS configuration of every device of the process.
    pub identity: Arc<Identity>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Registry {
    /// `config.devices` devices from the seed, all plugged in, each with a pre-made pair
    /// record; content is generated on first use and kept in the state directory.
    pub fn new(config: Config) -> Result<Self, RegistryError> {
        let Config { seed, devices: count, profile, state_dir, kdf_rounds } = config;
        let identity = Arc::new(Identity::from_seed(seed)?);
        let mut devices = BTreeMap::new();
        for n in 0..count {
            let device = Device::from_seed(seed, n);
            let dir = state_dir.join(&device.udid);
            std::fs::create_dir_all(dir.join("blobs"))
                .map_err(|source| RegistryError::State { path: dir.clone(), source })?;
            let encryption = Encryption::load(&dir, kdf_rounds)
                .map_err(|source| RegistryError::State { path: dir.join("encryption.json"), source })?;
            let state = DeviceState {
                encryption,
                plugged: watch::Sender::new(true),
                faults: Mutex::new(Faults::default()),
                passcode: Mutex::new(Passcode {
                    required: false,
                    entered: false,
                    waiting: false,
                    timeout: Duration::ZERO,
                }),
                passcode_entered: Notify::new(),
                paired_hosts: Mutex::new(HashSet::from([identity.host_id.clone()])),
                grants: Mutex::new(HashMap::new()),
                dir,
                seed,
                profile,
                content: Mutex::new(None),
                afc: afc::Fs::default(),
                stats: Mutex::new(Stats::default()),
                device,
            };
            devices.insert(state.device.device_id, Arc::new(state));
        }
        let (events, _) = broadcast::channel(1024);
        let buid = uuid::Uuid::from_u64_pair(seed, 0x11fe_b0a7).to_string().to_uppercase();
        Ok(Self { devices, pair_records: Mutex::new(HashMap::new()), events, buid, identity })
    }

    /// Detaches a device and attaches it again a moment later, as after a restore.
    pub fn reboot(self: &Arc<Self>, udid: &str) {
        let (registry, udid) = (self.clone(), udid.to_string());
        tokio::spawn(async move {
            registry.set_plugged(&udid, false);
            tokio::time::sleep(REBOOT_TIME).await;
            registry.set_plugged(&udid, true);
            tracing::info!(device.udid = %udid, "device rebooted after the restore");
        });
    }

    /// Plugged-in devices, by device id.
    pub fn attached(&self) -> Vec<Device> {
        self.devices.values().filter(|s| s.is_plugged()).map(|s| s.device.clone()).collect()
    }

    pub fn all(&self) -> Vec<Device> {
        self.devices.values().map(|s| s.device.clone()).collect()
    }

    pub fn by_udid(&self, udid: &str) -> Option<Device> {
        self.state_by_udid(udid).map(|s| s.device.clone())
    }

    pub fn state_by_udid(&self, udid: &str) -> Option<Arc<DeviceState>> {
        self.devices.values().find(|s| s.device.udid == udid).cloned()
    }

    /// The device with this id, if plugged in.
    pub fn attached_by_id(&self, device_id: u32) -> Option<Arc<DeviceState>> {
        self.devices.get(&device_id).filter(|s| s.is_plugged()).cloned()
    }

    /// Plugs a device in or pulls it out; listeners see Attached/Detached and the
    /// device's open connections are cut. Returns false for an unknown UDID.
    pub fn set_plugged(&self, udid: &str, plugged: bool) -> bool {
        let Some(state) = self.state_by_udid(udid) else { return false };
        let changed = state.plugged.send_if_modified(|on| std::mem::replace(on, plugged) != plugged);
        if changed {
            let d = &state.device;
            let _ = self.events.send(if plugged { Event::Attached(d.clone()) } else { Event::Detached(d.device_id) });
        }
        true
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The pair record a host saved for `udid`, else the device's pre-made one.
    pub fn pair_record(&self, udid: &str) -> Option<Vec<u8>> {
        if let Some(saved) = lock(&self.pair_records).get(udid) {
            return saved.clone();
        }
        self.by_udid(udid).map(|d| self.identity.pair_record(&d, &self.buid))
    }

    pub fn save_pair_record(&self, udid: &str, record: Vec<u8>) {
        lock(&self.pair_records).insert(udid.to_string(), Some(record));
    }

    /// Forgets the host's record of `udid` (the pre-made one included).
    pub fn delete_pair_record(&self, udid: &str) {
        lock(&self.pair_records).insert(udid.to_string(), None);
    }

    /// The device has not trusted this computer yet: usbmuxd holds no pair record for it
    /// (as after a new phone is plugged in, before the user taps Trust).
    pub fn untrust(&self, udid: &str) {
        self.delete_pair_record(udid);
    }

    /// The user tapped Trust: usbmuxd's preflight pairing stored the record (the pre-made
    /// one, which the device trusts).
    pub fn trust(&self, udid: &str) {
        lock(&self.pair_records).remove(udid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_deterministic_distinct_and_well_formed() {
        let a: Vec<Device> = (0..50).map(|n| Device::from_seed(7, n)).collect();
        let b: Vec<Device> = (0..50).map(|n| Device::from_seed(7, n)).collect();
        assert_eq!(a, b);
        let udids: HashSet<&str> = a.iter().map(|d| d.udid.as_str()).collect();
        assert_eq!(udids.len(), 50);
        for d in &a {
            assert_eq!(d.udid.len(), 25, "{}", d.udid);
            assert_eq!(&d.udid[8..9], "-");
            assert!(d.udid.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
        }
        assert_ne!(Device::from_seed(8, 0).udid, a[0].udid);
    }
}
