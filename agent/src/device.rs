//! The iPhone side of the agent, through idevice: finding a device on usbmuxd, reading
//! its identity over lockdown, and a MobileBackup2 backup into the local mirror (so the
//! phone can make its own incremental backups next time).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use idevice::provider::IdeviceProvider;
use idevice::services::lockdown::LockdownClient;
use idevice::services::mobilebackup2::{
    BackupDelegate, BackupProgress, DirEntryInfo, FsBackupDelegate, MobileBackup2Client, RestoreOptions,
};
use idevice::usbmuxd::{UsbmuxdAddr, UsbmuxdConnection};
use idevice::{IdeviceError, IdeviceService as _};
use plist::{Dictionary, Value};

const LABEL: &str = "lifeboat-agent";

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("USBMUXD_SOCKET_ADDRESS: {0}")]
    Address(String),
    #[error("cannot reach usbmuxd at {addr}: {cause}")]
    Usbmuxd { addr: String, cause: IdeviceError },
    #[error("no iPhone {0} is attached")]
    NotAttached(String),
    #[error("the iPhone went away or the connection broke: {0}")]
    Disconnected(IdeviceError),
    #[error("the iPhone is locked: enter the passcode on it and try again")]
    Locked,
    #[error("the iPhone refused (error {code}): {description}")]
    Refused { code: u64, description: String },
    #[error("{0}")]
    Failed(String),
}

impl DeviceError {
    /// The run-end reason reported to the server.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Disconnected(_) | Self::NotAttached(_) => "device-disconnected",
            Self::Locked => "needs-passcode",
            Self::Refused { code: 105, .. } => "out-of-space",
            Self::Refused { .. } => "device-error",
            _ => "backup-failed",
        }
    }
}

fn classify(e: IdeviceError) -> DeviceError {
    match e {
        IdeviceError::DeviceLocked => DeviceError::Locked,
        IdeviceError::Socket(_) => DeviceError::Disconnected(e),
        other => DeviceError::Failed(other.to_string()),
    }
}

/// Where usbmuxd is: `USBMUXD_SOCKET_ADDRESS` (`host:port` or a socket path), else the
/// system's socket.
pub fn usbmuxd_addr() -> Result<UsbmuxdAddr, DeviceError> {
    UsbmuxdAddr::from_env_var().map_err(|e| DeviceError::Address(e.to_string()))
}

/// An idevice provider for one device. idevice's own leaves Nagle's algorithm on for TCP
/// usbmuxd and writes each message's length and body separately, so every exchange waits
/// for a delayed ACK (40 ms); this one sets `TCP_NODELAY`.
#[derive(Debug, Clone)]
pub struct Provider {
    addr: UsbmuxdAddr,
    device_id: u32,
    pub udid: String,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, IdeviceError>> + Send>>;

async fn mux(addr: &UsbmuxdAddr) -> Result<UsbmuxdConnection, IdeviceError> {
    match addr {
        UsbmuxdAddr::TcpSocket(a) => {
            let stream = tokio::net::TcpStream::connect(a).await?;
            stream.set_nodelay(true)?;
            Ok(UsbmuxdConnection::new(Box::new(stream), 1))
        }
        other => other.connect(1).await,
    }
}

impl IdeviceProvider for Provider {
    fn connect(&self, port: u16) -> BoxFuture<idevice::Idevice> {
        let (addr, device_id) = (self.addr.clone(), self.device_id);
        Box::pin(async move { mux(&addr).await?.connect_to_device(device_id, port, LABEL).await })
    }

    fn label(&self) -> &str {
        LABEL
    }

    fn get_pairing_file(&self) -> BoxFuture<idevice::pairing_file::PairingFile> {
        let (addr, udid) = (self.addr.clone(), self.udid.clone());
        Box::pin(async move { mux(&addr).await?.get_pair_record(&udid).await })
    }
}

/// The iPhones usbmuxd lists now.
pub async fn attached(addr: &UsbmuxdAddr) -> Result<Vec<Provider>, DeviceError> {
    let mut conn = mux(addr).await.map_err(|cause| DeviceError::Usbmuxd { addr: describe(addr), cause })?;
    let devices = conn.get_devices().await.map_err(|cause| DeviceError::Usbmuxd { addr: describe(addr), cause })?;
    Ok(devices.into_iter().map(|d| Provider { addr: addr.clone(), device_id: d.device_id, udid: d.udid }).collect())
}

fn describe(addr: &UsbmuxdAddr) -> String {
    match addr {
        UsbmuxdAddr::TcpSocket(a) => a.to_string(),
        #[allow(unreachable_patterns)]
        _ => "the system socket".to_string(),
    }
}

impl Provider {
    /// The attached device `udid`.
    pub async fn find(addr: UsbmuxdAddr, udid: &str) -> Result<Self, DeviceError> {
        attached(&addr).await?.into_iter().find(|p| p.udid == udid).ok_or_else(|| DeviceError::NotAttached(udid.into()))
    }

    /// The device's lockdown values (inside a session, as hosts read them).
    pub async fn values(&self) -> Result<Dictionary, DeviceError> {
        let pairing = self.get_pairing_file().await.map_err(classify)?;
        let mut lockdown = LockdownClient::connect(self).await.map_err(classify)?;
        lockdown.start_session(&pairing).await.map_err(classify)?;
        match lockdown.get_value(None, None).await.map_err(classify)? {
            Value::Dictionary(d) => Ok(d),
            other => Err(DeviceError::Failed(format!("lockdown values are not a dictionary: {other:?}"))),
        }
    }

    /// Backs the device up into `mirror/<udid>` (incremental when the mirror holds the
    /// previous backup), checks the device's verdict and Status.plist, and writes the
    /// Info.plist hosts write. Returns the backup directory. `started` is signalled when
    /// the device begins (on iOS 16.1 and later it first waits for its passcode).
    pub async fn backup(
        &self,
        mirror: &Path,
        values: &Dictionary,
        started: tokio::sync::watch::Sender<bool>,
    ) -> Result<PathBuf, DeviceError> {
        std::fs::create_dir_all(mirror).map_err(|e| DeviceError::Failed(format!("{}: {e}", mirror.display())))?;
        let mut client = MobileBackup2Client::connect(self).await.map_err(classify)?;
        let delegate = Watched { started };
        let reply = client.backup_from_path(mirror, Some(&self.udid), None, &delegate).await.map_err(classify)?;
        let _ = client.disconnect().await;
        let reply = reply.ok_or_else(|| DeviceError::Failed("the iPhone ended the backup without a verdict".into()))?;
        let code = reply.get("ErrorCode").and_then(Value::as_unsigned_integer).unwrap_or(0);
        if code == 208 {
            return Err(DeviceError::Locked);
        }
        if code != 0 {
            let description =
                reply.get("ErrorDescription").and_then(Value::as_string).unwrap_or("no description").to_string();
            return Err(DeviceError::Refused { code, description });
        }
        let dir = mirror.join(&self.udid);
        let status: Dictionary = plist::from_file(dir.join("Status.plist"))
            .map_err(|e| DeviceError::Failed(format!("the backup has no readable Status.plist: {e}")))?;
        if status.get("SnapshotState").and_then(Value::as_string) != Some("finished") {
            return Err(DeviceError::Failed("the backup's Status.plist does not say finished".into()));
        }
        plist::to_file_xml(dir.join("Info.plist"), &info_plist(&self.udid, values))
            .map_err(|e| DeviceError::Failed(format!("writing Info.plist: {e}")))?;
        Ok(dir)
    }
}

impl Provider {
    /// Restores the backup in `root/<source>` onto this device (which may be another
    /// model), as a MobileBackup2 Restore with `source` as SourceIdentifier. With `reboot`
    /// the device restarts afterwards; see [`wait_for_reboot`].
    pub async fn restore(&self, root: &Path, source: &str, reboot: bool) -> Result<(), DeviceError> {
        let mut client = MobileBackup2Client::connect(self).await.map_err(classify)?;
        let options = RestoreOptions::new().with_reboot(reboot).with_system_files(true);
        let reply =
            client.restore_from_path(root, Some(source), Some(options), &FsBackupDelegate).await.map_err(classify)?;
        let _ = client.disconnect().await;
        let reply =
            reply.ok_or_else(|| DeviceError::Failed("the iPhone ended the restore without a verdict".into()))?;
        match reply.get("ErrorCode").and_then(Value::as_unsigned_integer).unwrap_or(0) {
            0 => Ok(()),
            208 => Err(DeviceError::Locked),
            code => Err(DeviceError::Refused {
                code,
                description: reply
                    .get("ErrorDescription")
                    .and_then(Value::as_string)
                    .unwrap_or("no description")
                    .into(),
            }),
        }
    }
}

/// idevice's file-system delegate, noting the device's first request: until then a
/// device on iOS 16.1 or later is waiting for its passcode.
struct Watched {
    started: tokio::sync::watch::Sender<bool>,
}

type DelegateFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl Watched {
    fn seen(&self) {
        self.started.send_if_modified(|s| !std::mem::replace(s, true));
    }
}

impl BackupDelegate for Watched {
    fn get_free_disk_space(&self, path: &Path) -> u64 {
        self.seen();
        FsBackupDelegate.get_free_disk_space(path)
    }
    fn open_file_read<'a>(
        &'a self,
        path: &'a Path,
    ) -> DelegateFuture<'a, Result<Box<dyn std::io::Read + Send>, IdeviceError>> {
        self.seen();
        FsBackupDelegate.open_file_read(path)
    }
    fn create_file_write<'a>(
        &'a self,
        path: &'a Path,
    ) -> DelegateFuture<'a, Result<Box<dyn std::io::Write + Send>, IdeviceError>> {
        self.seen();
        FsBackupDelegate.create_file_write(path)
    }
    fn create_dir_all<'a>(&'a self, path: &'a Path) -> DelegateFuture<'a, Result<(), IdeviceError>> {
        // Not a sign of the device: idevice creates the backup directory before it asks.
        FsBackupDelegate.create_dir_all(path)
    }
    fn remove<'a>(&'a self, path: &'a Path) -> DelegateFuture<'a, Result<(), IdeviceError>> {
        FsBackupDelegate.remove(path)
    }
    fn rename<'a>(&'a self, from: &'a Path, to: &'a Path) -> DelegateFuture<'a, Result<(), IdeviceError>> {
        FsBackupDelegate.rename(from, to)
    }
    fn copy<'a>(&'a self, src: &'a Path, dst: &'a Path) -> DelegateFuture<'a, Result<(), IdeviceError>> {
        FsBackupDelegate.copy(src, dst)
    }
    fn exists<'a>(&'a self, path: &'a Path) -> DelegateFuture<'a, bool> {
        FsBackupDelegate.exists(path)
    }
    fn is_dir<'a>(&'a self, path: &'a Path) -> DelegateFuture<'a, bool> {
        FsBackupDelegate.is_dir(path)
    }
    fn list_dir<'a>(&'a self, path: &'a Path) -> DelegateFuture<'a, Result<Vec<DirEntryInfo>, IdeviceError>> {
        FsBackupDelegate.list_dir(path)
    }
    fn on_file_received(&self, path: &str, count: u32) {
        FsBackupDelegate.on_file_received(path, count);
    }
    fn on_progress(&self, progress: BackupProgress) {
        FsBackupDelegate.on_progress(progress);
    }
}

/// Waits until `udid` has left usbmuxd's list and come back (a reboot), at most `timeout`.
pub async fn wait_for_reboot(addr: &UsbmuxdAddr, udid: &str, timeout: std::time::Duration) -> Result<(), DeviceError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut gone = false;
    while tokio::time::Instant::now() < deadline {
        let present = attached(addr).await?.iter().any(|p| p.udid == udid);
        if !present {
            gone = true;
        } else if gone {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Err(DeviceError::Failed(format!(
        "the iPhone did not come back within {} s after the restore; check it",
        timeout.as_secs()
    )))
}

/// Whether dotted version `a` is older than `b` ("17.5.1" < "17.6").
pub fn version_older(a: &str, b: &str) -> bool {
    let parse = |v: &str| v.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
    let (mut a, mut b) = (parse(a), parse(b));
    let n = a.len().max(b.len());
    a.resize(n, 0);
    b.resize(n, 0);
    a < b
}

/// Info.plist as libimobiledevice and pymobiledevice3 write it (restores read it).
pub fn info_plist(udid: &str, values: &Dictionary) -> Dictionary {
    let text = |k: &str| values.get(k).and_then(Value::as_string).unwrap_or_default().to_string();
    let mut info = Dictionary::new();
    info.insert("Build Version".into(), text("BuildVersion").into());
    info.insert("Device Name".into(), text("DeviceName").into());
    info.insert("Display Name".into(), text("DeviceName").into());
    info.insert("GUID".into(), uuid::Uuid::new_v4().simple().to_string().to_uppercase().into());
    info.insert("Product Type".into(), text("ProductType").into());
    info.insert("Product Version".into(), text("ProductVersion").into());
    info.insert("Serial Number".into(), text("SerialNumber").into());
    info.insert("Target Identifier".into(), udid.into());
    info.insert("Target Type".into(), "Device".into());
    info.insert("Unique Identifier".into(), udid.to_uppercase().into());
    info.insert("Last Backup Date".into(), Value::Date(std::time::SystemTime::now().into()));
    info.insert("Installed Applications".into(), Value::Array(Vec::new()));
    info.insert("Applications".into(), Value::Dictionary(Dictionary::new()));
    info.insert("iTunes Version".into(), "12.13".into());
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(version_older("17.5.1", "17.6"));
        assert!(version_older("9.3", "17.0"));
        assert!(!version_older("17.10", "17.9"));
        assert!(!version_older("17.5", "17.5.0"));
    }
}
