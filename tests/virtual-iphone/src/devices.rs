//! The virtual devices one process serves: identity derived from a seed, plugged in or
//! not, and the events usbmuxd listeners see when that changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use tokio::sync::broadcast;

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

/// The devices of one process, and the host-side state usbmuxd keeps (BUID, pair records).
#[derive(Debug)]
pub struct Registry {
    devices: Mutex<BTreeMap<u32, (Device, bool)>>,
    pair_records: Mutex<HashMap<String, Vec<u8>>>,
    events: broadcast::Sender<Event>,
    /// The host's system BUID, as `ReadBUID` returns it.
    pub buid: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Registry {
    /// `count` devices from `seed`, all plugged in.
    pub fn new(seed: u64, count: u32) -> Self {
        let devices = (0..count).map(|n| {
            let d = Device::from_seed(seed, n);
            (d.device_id, (d, true))
        });
        let (events, _) = broadcast::channel(1024);
        let buid = uuid::Uuid::from_u64_pair(seed, 0x11fe_b0a7).to_string().to_uppercase();
        Self { devices: Mutex::new(devices.collect()), pair_records: Mutex::new(HashMap::new()), events, buid }
    }

    /// Plugged-in devices, by device id.
    pub fn attached(&self) -> Vec<Device> {
        lock(&self.devices).values().filter(|(_, on)| *on).map(|(d, _)| d.clone()).collect()
    }

    pub fn all(&self) -> Vec<Device> {
        lock(&self.devices).values().map(|(d, _)| d.clone()).collect()
    }

    pub fn by_udid(&self, udid: &str) -> Option<Device> {
        lock(&self.devices).values().find(|(d, _)| d.udid == udid).map(|(d, _)| d.clone())
    }

    /// The device with this id, if plugged in.
    pub fn attached_by_id(&self, device_id: u32) -> Option<Device> {
        lock(&self.devices).get(&device_id).filter(|(_, on)| *on).map(|(d, _)| d.clone())
    }

    /// Plugs a device in or pulls it out; listeners see Attached/Detached. Returns false
    /// for an unknown UDID.
    pub fn set_plugged(&self, udid: &str, plugged: bool) -> bool {
        let mut devices = lock(&self.devices);
        let Some((d, on)) = devices.values_mut().find(|(d, _)| d.udid == udid) else { return false };
        if *on != plugged {
            *on = plugged;
            let _ = self.events.send(if plugged { Event::Attached(d.clone()) } else { Event::Detached(d.device_id) });
        }
        true
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn pair_record(&self, udid: &str) -> Option<Vec<u8>> {
        lock(&self.pair_records).get(udid).cloned()
    }

    pub fn save_pair_record(&self, udid: &str, record: Vec<u8>) {
        lock(&self.pair_records).insert(udid.to_string(), record);
    }

    pub fn delete_pair_record(&self, udid: &str) -> bool {
        lock(&self.pair_records).remove(udid).is_some()
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
        let udids: std::collections::HashSet<&str> = a.iter().map(|d| d.udid.as_str()).collect();
        assert_eq!(udids.len(), 50);
        for d in &a {
            assert_eq!(d.udid.len(), 25, "{}", d.udid);
            assert_eq!(&d.udid[8..9], "-");
            assert!(d.udid.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
        }
        assert_ne!(Device::from_seed(8, 0).udid, a[0].udid);
    }
}
