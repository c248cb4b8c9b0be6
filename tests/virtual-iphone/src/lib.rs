//! The virtual iPhone: the device side of the protocols a host uses to back up and
//! restore an iPhone, so the agent and real host tools (libimobiledevice, pymobiledevice3,
//! idevice) can be tested where no iPhone exists.
//!
//! Built so far: the usbmuxd endpoint (`usbmuxd`) over TCP — device list, attach/detach
//! events, the host's BUID, pair records, and `Connect` to device ports — the device
//! registry (`devices`), and the plaintext part of lockdownd (`lockdownd`: QueryType,
//! GetValue, Goodbye). Sessions with TLS, pairing, the helper services and MobileBackup2
//! come next; `Connect` to any other port is refused the way usbmuxd refuses a closed port.

pub mod devices;
pub mod lockdownd;
pub mod usbmuxd;

pub use devices::{Device, Registry};
