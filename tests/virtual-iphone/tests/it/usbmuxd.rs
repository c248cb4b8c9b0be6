use std::sync::Arc;
use std::time::Duration;

use plist::{Dictionary, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use virtual_iphone::content::Profile;
use virtual_iphone::usbmuxd::{self, HEADER_BYTES};
use virtual_iphone::{Config, Registry};

use crate::host_tool;

async fn start(devices: u32) -> (std::net::SocketAddr, Arc<Registry>, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config =
        Config { seed: 42, devices, profile: Profile::Tiny, state_dir: state.path().to_path_buf(), kdf_rounds: 1000 };
    let registry = Arc::new(Registry::new(config).unwrap());
    tokio::spawn(usbmuxd::serve(listener, registry.clone()));
    (addr, registry, state)
}

fn request(kind: &str, tag: u32, extra: &[(&str, Value)]) -> Vec<u8> {
    let mut d = Dictionary::new();
    d.insert("MessageType".into(), kind.into());
    d.insert("ClientVersionString".into(), "test".into());
    for (k, v) in extra {
        d.insert((*k).into(), v.clone());
    }
    usbmuxd::encode(tag, &d)
}

async fn reply(s: &mut TcpStream) -> (u32, Dictionary) {
    let mut h = [0u8; HEADER_BYTES];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut h)).await.unwrap().unwrap();
    let (len, version, message, tag) = usbmuxd::decode_header(&h).unwrap();
    assert_eq!((version, message), (1, 8));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    assert!(body.starts_with(b"<?xml"), "replies must be XML for libusbmuxd");
    (tag, plist::from_bytes::<Value>(&body).unwrap().into_dictionary().unwrap())
}

fn number(d: &Dictionary) -> Option<u64> {
    d.get("Number").and_then(Value::as_unsigned_integer)
}

#[tokio::test]
async fn lists_devices_in_the_shape_every_host_reads_and_echoes_tags() {
    let (addr, registry, _state) = start(3).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&request("ListDevices", 77, &[])).await.unwrap();
    let (tag, d) = reply(&mut s).await;
    assert_eq!(tag, 77);
    let list = d["DeviceList"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    let first = list[0].as_dictionary().unwrap();
    assert_eq!(first["MessageType"].as_string(), Some("Attached"));
    assert_eq!(first["DeviceID"].as_unsigned_integer(), Some(1));
    let props = first["Properties"].as_dictionary().unwrap();
    assert_eq!(props["DeviceID"].as_unsigned_integer(), Some(1));
    assert_eq!(props["ConnectionType"].as_string(), Some("USB"));
    assert_eq!(props["SerialNumber"].as_string(), Some(registry.all()[0].udid.as_str()));

    s.write_all(&request("ReadBUID", 78, &[])).await.unwrap();
    let (tag, d) = reply(&mut s).await;
    assert_eq!(tag, 78);
    assert_eq!(d["BUID"].as_string(), Some(registry.buid.as_str()));
}

#[tokio::test]
async fn pair_records_are_saved_read_and_deleted() {
    let (addr, registry, _state) = start(1).await;
    let udid = registry.all()[0].udid.clone();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let id = ("PairRecordID", Value::String(udid.clone()));
    // Every device comes with a pre-made record, so hosts need not pair.
    s.write_all(&request("ReadPairRecord", 1, std::slice::from_ref(&id))).await.unwrap();
    let premade = reply(&mut s).await.1["PairRecordData"].as_data().unwrap().to_vec();
    let record: Dictionary = plist::from_bytes(&premade).unwrap();
    assert_eq!(record["HostID"].as_string(), Some(registry.identity.host_id.as_str()));
    assert_eq!(record["SystemBUID"].as_string(), Some(registry.buid.as_str()));
    let data = ("PairRecordData", Value::Data(b"<plist>record</plist>".to_vec()));
    s.write_all(&request("SavePairRecord", 2, &[id.clone(), data])).await.unwrap();
    assert_eq!(number(&reply(&mut s).await.1), Some(0));
    s.write_all(&request("ReadPairRecord", 3, std::slice::from_ref(&id))).await.unwrap();
    assert_eq!(reply(&mut s).await.1["PairRecordData"].as_data(), Some(&b"<plist>record</plist>"[..]));
    s.write_all(&request("DeletePairRecord", 4, std::slice::from_ref(&id))).await.unwrap();
    assert_eq!(number(&reply(&mut s).await.1), Some(0));
    s.write_all(&request("ReadPairRecord", 5, &[id])).await.unwrap();
    assert_eq!(number(&reply(&mut s).await.1), Some(usbmuxd::RESULT_BAD_DEVICE), "deleted, the pre-made one too");
    let unknown = ("PairRecordID", Value::String("00000000-0000000000000000".into()));
    s.write_all(&request("ReadPairRecord", 7, &[unknown])).await.unwrap();
    assert_eq!(number(&reply(&mut s).await.1), Some(usbmuxd::RESULT_BAD_DEVICE));
    // A save without data is refused.
    s.write_all(&request("SavePairRecord", 6, &[("PairRecordID", Value::String(udid.clone()))])).await.unwrap();
    assert_eq!(number(&reply(&mut s).await.1), Some(usbmuxd::RESULT_BAD_COMMAND));
}

#[tokio::test]
async fn connect_answers_like_usbmuxd_for_unknown_devices_and_closed_ports() {
    let (addr, registry, _state) = start(1).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let port = Value::Integer(u64::from(1234u16.to_be()).into());
    s.write_all(&request("Connect", 1, &[("DeviceID", Value::Integer(99u64.into())), ("PortNumber", port.clone())]))
        .await
        .unwrap();
    assert_eq!(number(&reply(&mut s).await.1), Some(usbmuxd::RESULT_BAD_DEVICE));
    s.write_all(&request("Connect", 2, &[("DeviceID", Value::Integer(1u64.into())), ("PortNumber", port.clone())]))
        .await
        .unwrap();
    assert_eq!(number(&reply(&mut s).await.1), Some(usbmuxd::RESULT_CONNECTION_REFUSED));
    registry.set_plugged(&registry.all()[0].udid, false);
    let port = Value::Integer(u64::from(62078u16.to_be()).into());
    s.write_all(&request("Connect", 3, &[("DeviceID", Value::Integer(1u64.into())), ("PortNumber", port)]))
        .await
        .unwrap();
    assert_eq!(number(&reply(&mut s).await.1), Some(usbmuxd::RESULT_BAD_DEVICE), "an unplugged device is gone");
    s.write_all(&request("Frobnicate", 4, &[])).await.unwrap();
    assert_eq!(number(&reply(&mut s).await.1), Some(usbmuxd::RESULT_BAD_COMMAND));
}

#[tokio::test]
async fn listeners_see_attached_devices_then_unplug_and_replug() {
    let (addr, registry, _state) = start(2).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&request("Listen", 5, &[])).await.unwrap();
    let (tag, ok) = reply(&mut s).await;
    assert_eq!((tag, number(&ok)), (5, Some(0)));
    for id in [1, 2] {
        let (tag, d) = reply(&mut s).await;
        assert_eq!(tag, 0);
        assert_eq!(d["MessageType"].as_string(), Some("Attached"));
        assert_eq!(d["DeviceID"].as_unsigned_integer(), Some(id));
    }
    let udid = registry.all()[1].udid.clone();
    assert!(registry.set_plugged(&udid, false));
    let (_, d) = reply(&mut s).await;
    assert_eq!((d["MessageType"].as_string(), d["DeviceID"].as_unsigned_integer()), (Some("Detached"), Some(2)));
    assert!(registry.set_plugged(&udid, true));
    let (_, d) = reply(&mut s).await;
    assert_eq!((d["MessageType"].as_string(), d["DeviceID"].as_unsigned_integer()), (Some("Attached"), Some(2)));
    assert!(!registry.set_plugged("00000000-0000000000000000", false));
}

#[tokio::test]
async fn garbage_is_refused_without_taking_the_server_down() {
    let (addr, _, _state) = start(1).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0xff; 16]).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(n, 0, "an impossible frame length closes the connection");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&request("ListDevices", 1, &[])).await.unwrap();
    assert_eq!(reply(&mut s).await.1["DeviceList"].as_array().unwrap().len(), 1);
}

/// libimobiledevice's `idevice_id -l`, a real host tool, lists the virtual devices.
#[tokio::test]
async fn libimobiledevice_idevice_id_lists_the_devices() {
    if !host_tool("idevice_id") {
        return;
    }
    let (addr, registry, _state) = start(3).await;
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("idevice_id").arg("-l").env("USBMUXD_SOCKET_ADDRESS", addr.to_string()).output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut listed: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    listed.sort();
    let mut expected: Vec<String> = registry.all().into_iter().map(|d| d.udid).collect();
    expected.sort();
    assert_eq!(listed, expected);
}

async fn lockdown_request(s: &mut TcpStream, body: &[(&str, Value)]) -> Dictionary {
    let mut d = Dictionary::new();
    d.insert("Label".into(), "test".into());
    for (k, v) in body {
        d.insert((*k).into(), v.clone());
    }
    s.write_all(&virtual_iphone::lockdownd::encode(&d)).await.unwrap();
    let mut len = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut len)).await.unwrap().unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    assert!(body.starts_with(b"<?xml"));
    plist::from_bytes::<Value>(&body).unwrap().into_dictionary().unwrap()
}

#[tokio::test]
async fn connect_to_lockdownd_answers_queries_in_plaintext() {
    let (addr, registry, _state) = start(2).await;
    let device = registry.all()[1].clone();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let port = Value::Integer(u64::from(62078u16.to_be()).into());
    s.write_all(&request("Connect", 9, &[("DeviceID", Value::Integer(2u64.into())), ("PortNumber", port)]))
        .await
        .unwrap();
    let (tag, ok) = reply(&mut s).await;
    assert_eq!((tag, number(&ok)), (9, Some(0)));

    let r = lockdown_request(&mut s, &[("Request", "QueryType".into())]).await;
    assert_eq!(r["Request"].as_string(), Some("QueryType"));
    assert_eq!(r["Type"].as_string(), Some("com.apple.mobile.lockdown"));
    let r = lockdown_request(&mut s, &[("Request", "GetValue".into()), ("Key", "UniqueDeviceID".into())]).await;
    assert_eq!((r["Request"].as_string(), r["Value"].as_string()), (Some("GetValue"), Some(device.udid.as_str())));
    let r = lockdown_request(
        &mut s,
        &[("Request", "GetValue".into()), ("Domain", "com.apple.mobile.backup".into()), ("Key", "WillEncrypt".into())],
    )
    .await;
    assert_eq!(r["Value"].as_boolean(), Some(false));
    let r = lockdown_request(&mut s, &[("Request", "GetValue".into())]).await;
    let all = r["Value"].as_dictionary().unwrap();
    assert_eq!(all["ProductType"].as_string(), Some(device.product_type.as_str()));
    assert_eq!(all["ProductVersion"].as_string(), Some(device.ios_version.as_str()));
    let r = lockdown_request(&mut s, &[("Request", "GetValue".into()), ("Key", "NoSuchKey".into())]).await;
    assert_eq!(r["Error"].as_string(), Some("MissingValue"));
    let r = lockdown_request(&mut s, &[("Request", "StartSession".into()), ("HostID", "X".into())]).await;
    assert_eq!((r["Request"].as_string(), r["Error"].as_string()), (Some("StartSession"), Some("InvalidHostID")));
    let r = lockdown_request(&mut s, &[("Request", "StartService".into()), ("Service", "com.apple.afc".into())]).await;
    assert_eq!(r["Error"].as_string(), Some("SessionInactive"), "services need a session");
    let r = lockdown_request(&mut s, &[("Request", "Goodbye".into())]).await;
    assert_eq!(r["Result"].as_string(), Some("Success"));
    let mut buf = [0u8; 1];
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap(), 0);
}

/// libimobiledevice's `ideviceinfo -s` (no session) reads values from the virtual lockdownd.
#[tokio::test]
async fn libimobiledevice_ideviceinfo_reads_device_values() {
    if !host_tool("ideviceinfo") {
        return;
    }
    let (addr, registry, _state) = start(2).await;
    let device = registry.all()[1].clone();
    let run = move |args: Vec<String>| {
        let out = std::process::Command::new("ideviceinfo")
            .args(args)
            .env("USBMUXD_SOCKET_ADDRESS", addr.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let udid = device.udid.clone();
    let product = tokio::task::spawn_blocking({
        let udid = udid.clone();
        move || run(vec!["-s".into(), "-u".into(), udid, "-k".into(), "ProductType".into()])
    })
    .await
    .unwrap();
    assert_eq!(product, device.product_type);
    let encrypt = tokio::task::spawn_blocking(move || {
        run(vec![
            "-s".into(),
            "-u".into(),
            udid,
            "-q".into(),
            "com.apple.mobile.backup".into(),
            "-k".into(),
            "WillEncrypt".into(),
        ])
    })
    .await
    .unwrap();
    assert_eq!(encrypt, "false");
}

/// `ideviceinfo` without `-s` starts a lockdown session: TLS with OpenSSL on the host side,
/// the pre-made pair record's root certificate as its client certificate.
#[tokio::test]
async fn libimobiledevice_reads_values_inside_a_tls_session() {
    if !host_tool("ideviceinfo") {
        return;
    }
    let (addr, registry, _state) = start(1).await;
    let device = registry.all()[0].clone();
    let udid = device.udid.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("ideviceinfo")
            .args(["-u", &udid, "-k", "SerialNumber"])
            .env("USBMUXD_SOCKET_ADDRESS", addr.to_string())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), device.serial_number);
}

/// idevice pairs with its own certificates (the `Pair` request), saves the record through
/// usbmuxd, and starts a session with it; a forgotten HostID is refused.
#[tokio::test]
async fn idevice_pairs_then_starts_a_session_with_its_own_record() {
    use idevice::IdeviceService as _;
    use idevice::services::lockdown::LockdownClient;
    use idevice::usbmuxd::UsbmuxdAddr;
    let (addr, registry, _state) = start(1).await;
    let udid = registry.all()[0].udid.clone();
    let mux_addr = UsbmuxdAddr::TcpSocket(addr);
    let mut mux = mux_addr.connect(1).await.unwrap();
    let device = mux.get_device(&udid).await.unwrap();
    let provider = device.to_provider(mux_addr.clone(), "pair-test");
    let mut lockdown = LockdownClient::connect(&provider).await.unwrap();
    let buid = mux.get_buid().await.unwrap();
    let host_id = uuid::Uuid::new_v4().to_string().to_uppercase();
    let record = lockdown.pair(host_id.clone(), buid, Some("test-host")).await.unwrap();
    assert!(record.escrow_bag.is_some(), "the device hands out an escrow bag");
    mux.save_pair_record(&udid, record.clone().serialize().unwrap()).await.unwrap();
    assert!(registry.state_by_udid(&udid).unwrap().trusts(&host_id));

    let mut lockdown = LockdownClient::connect(&provider).await.unwrap();
    lockdown.start_session(&record).await.unwrap();
    let name = lockdown.get_value(Some("DeviceName"), None).await.unwrap();
    assert_eq!(name.as_string(), Some(registry.all()[0].name.as_str()));

    registry.state_by_udid(&udid).unwrap().unpair(&host_id);
    let mut lockdown = LockdownClient::connect(&provider).await.unwrap();
    assert!(lockdown.start_session(&record).await.is_err(), "an unpaired host is refused");
}
