//! The virtual iPhone: the device side of the protocols a host uses to back up and
//! restore an iPhone, so the agent and real host tools (libimobiledevice, pymobiledevice3,
//! idevice) can be tested where no iPhone exists.
//!
//! - `usbmuxd`: the usbmuxd endpoint over TCP — device list, attach/detach events, the
//!   host's BUID, pair records (pre-made ones served), `Connect` to device ports.
//! - `lockdownd`: values, pairing, TLS sessions, `StartService`.
//! - `services`: the service ports, notification_proxy, installation_proxy and
//!   springboardservices; `afc` and `mobilebackup2` (backup, incremental backup, restore).
//! - `content` and `manifest`: each device's deterministic synthetic content, and the
//!   backup metadata (Manifest.db, Manifest.plist, Status.plist) it writes.
//! - `encryption`: the device's backup password, MDM-forced encryption and the keys of
//!   encrypted backups.
//! - `devices`: the registry of devices and their live state (plugged, passcode, faults);
//!   `control`: the same operations over a socket for `virtual-iphone ctl`.

pub mod afc;
pub mod content;
pub mod control;
pub mod devices;
pub mod encryption;
pub mod framing;
pub mod lockdownd;
pub mod manifest;
pub mod mobilebackup2;
pub mod pairing;
pub mod services;
pub mod usbmuxd;

pub use devices::{Config, Device, DeviceState, Registry};
