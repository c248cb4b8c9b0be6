//! lockdownd (device port 62078): `QueryType`, `GetValue` (the keys and domains hosts
//! read), pairing (`Pair`, `ValidatePair`, `Unpair`), sessions (`StartSession` switches
//! the same socket to TLS with the device as server, `StopSession` back to plaintext) and
//! `StartService`, which opens a service port for one usbmuxd `Connect`. Framing:
//! `length u32be | plist`; replies are XML and echo `Request`, as libimobiledevice and
//! pymobiledevice3 check. See the reference, section 2.2.

use plist::{Dictionary, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::devices::{Device, DeviceState, Registry};
use crate::framing::{self, FrameError};
use crate::services;

/// The device port usbmuxd `Connect`s to for lockdownd.
pub const PORT: u16 = 62078;

#[derive(Debug, thiserror::Error)]
pub enum LockdownError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Encodes one lockdown message (XML).
pub fn encode(body: &Dictionary) -> Vec<u8> {
    framing::xml_frame(&Value::Dictionary(body.clone()))
}

/// The device's Wi-Fi MAC address, derived from its ECID.
pub fn wifi_address(d: &Device) -> String {
    let ecid = u64::from_str_radix(&d.udid[9..], 16).unwrap_or(0);
    let mac: Vec<String> = ecid.to_be_bytes()[2..].iter().map(|b| format!("{b:02x}")).collect();
    mac.join(":")
}

/// The values of the default domain, as a real device reports them.
pub fn device_values(d: &Device, device_public_key_pem: &str) -> Dictionary {
    let mut v = Dictionary::new();
    let mut put = |k: &str, val: Value| {
        v.insert(k.into(), val);
    };
    put("ProductVersion", d.ios_version.clone().into());
    put("BuildVersion", d.build_version.clone().into());
    put("ProductType", d.product_type.clone().into());
    put("DeviceClass", "iPhone".into());
    put("DeviceName", d.name.clone().into());
    put("UniqueDeviceID", d.udid.clone().into());
    put("SerialNumber", d.serial_number.clone().into());
    let ecid = u64::from_str_radix(&d.udid[9..], 16).unwrap_or(0);
    put("UniqueChipID", Value::Integer(ecid.into()));
    put("WiFiAddress", wifi_address(d).into());
    put("HardwareModel", "D74AP".into());
    put("CPUArchitecture", "arm64e".into());
    put("ActivationState", "Activated".into());
    put("ProtocolVersion", "2".into());
    put("TimeZone", "Europe/Zurich".into());
    put("DevicePublicKey", Value::Data(device_public_key_pem.as_bytes().to_vec()));
    put("TelephonyCapability", Value::Boolean(true));
    put("PasswordProtected", Value::Boolean(true));
    v
}

/// Values of the other domains hosts read.
fn domain_values(domain: &str, state: &DeviceState) -> Option<Dictionary> {
    let mut v = Dictionary::new();
    match domain {
        "com.apple.mobile.backup" => {
            v.insert("WillEncrypt".into(), Value::Boolean(state.encryption().will_encrypt()));
            // Only a phone with a profile that forces encryption says so.
            if state.encryption().mdm_forced() {
                v.insert("RequiresEncrypt".into(), Value::Boolean(true));
            }
        }
        "com.apple.mobile.iTunes" => {
            v.insert("MinITunesVersion".into(), "10.0.1".into());
        }
        "com.apple.iTunes" => {}
        _ => return None,
    }
    Some(v)
}

fn reply(request: &str) -> Dictionary {
    let mut d = Dictionary::new();
    d.insert("Request".into(), request.into());
    d
}

fn error(request: &str, name: &str) -> Dictionary {
    let mut d = reply(request);
    d.insert("Error".into(), name.into());
    d
}

/// What ended one pass of the request loop.
enum Next {
    /// The host hung up or said Goodbye.
    Done,
    /// `StartSession` was answered: TLS starts on the same socket.
    StartTls,
    /// `StopSession` was answered inside TLS: back to plaintext after the close handshake.
    StopTls,
}

/// Serves one lockdown connection of a device until the host hangs up.
pub async fn serve(stream: TcpStream, state: &DeviceState, registry: &Registry) -> Result<(), LockdownError> {
    let mut plain = stream;
    loop {
        match requests(&mut plain, state, registry, false).await? {
            Next::Done | Next::StopTls => return Ok(()),
            Next::StartTls => {}
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(registry.identity.tls());
        let mut tls = acceptor.accept(plain).await.map_err(LockdownError::Tls)?;
        match requests(&mut tls, state, registry, true).await {
            Ok(Next::StopTls) => {}
            // A host that drops the connection without a TLS close (idevice does) is done.
            Ok(_) | Err(LockdownError::Frame(FrameError::Io(_))) => return Ok(()),
            Err(e) => return Err(e),
        }
        // The host sent close_notify after StopSession: answer it, then plaintext again
        // (libimobiledevice waits for the device's close_notify before going on).
        tls.get_mut().1.send_close_notify();
        tls.flush().await?;
        plain = tls.into_inner().0;
    }
}

/// Answers requests until the session state changes or the host is gone.
async fn requests<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    state: &DeviceState,
    registry: &Registry,
    in_session: bool,
) -> Result<Next, LockdownError> {
    let device = &state.device;
    let mut stopped = false;
    loop {
        let Some(req) = framing::read_dict(s).await? else {
            return Ok(if stopped { Next::StopTls } else { Next::Done });
        };
        let verb = req.get("Request").and_then(Value::as_string).unwrap_or_default().to_string();
        tracing::debug!(device.udid = %device.udid, lockdown.request = %verb, lockdown.session = in_session, "lockdown request");
        let mut next = None;
        let out = match verb.as_str() {
            "QueryType" => {
                let mut r = reply(&verb);
                r.insert("Type".into(), "com.apple.mobile.lockdown".into());
                r
            }
            "GetValue" => get_value(&verb, &req, state, &registry.identity.device_public_key_pem),
            "SetValue" | "RemoveValue" => reply(&verb),
            "Goodbye" => {
                let mut r = reply(&verb);
                r.insert("Result".into(), "Success".into());
                next = Some(Next::Done);
                r
            }
            "Pair" => pair(&verb, &req, state),
            "ValidatePair" => match host_id(&req) {
                Some(id) if state.trusts(id) => reply(&verb),
                _ => error(&verb, "InvalidHostID"),
            },
            "Unpair" => match host_id(&req) {
                Some(id) if state.unpair(id) => reply(&verb),
                _ => error(&verb, "InvalidHostID"),
            },
            "StartSession" if in_session => error(&verb, "SessionActive"),
            "StartSession" => match req.get("HostID").and_then(Value::as_string) {
                Some(id) if state.trusts(id) => {
                    let mut r = reply(&verb);
                    r.insert("EnableSessionSSL".into(), Value::Boolean(true));
                    r.insert("SessionID".into(), uuid::Uuid::new_v4().to_string().to_uppercase().into());
                    next = Some(Next::StartTls);
                    r
                }
                _ => error(&verb, "InvalidHostID"),
            },
            "StopSession" if !in_session => error(&verb, "SessionInactive"),
            "StopSession" => {
                stopped = true;
                let mut r = reply(&verb);
                r.insert("Result".into(), "Success".into());
                r
            }
            "StartService" if !in_session => error(&verb, "SessionInactive"),
            "StartService" => start_service(&verb, &req, state),
            "" => error("", "MalformedCommand"),
            _ => error(&verb, "MalformedCommand"),
        };
        framing::write_xml(s, &Value::Dictionary(out)).await?;
        if let Some(next) = next {
            return Ok(next);
        }
    }
}

fn host_id(req: &Dictionary) -> Option<&str> {
    req.get("PairRecord").and_then(Value::as_dictionary).and_then(|r| r.get("HostID")).and_then(Value::as_string)
}

fn get_value(verb: &str, req: &Dictionary, state: &DeviceState, public_key_pem: &str) -> Dictionary {
    let device = &state.device;
    let key = req.get("Key").and_then(Value::as_string);
    let domain = req.get("Domain").and_then(Value::as_string);
    let values = match domain {
        None => Some(device_values(device, public_key_pem)),
        Some(d) => domain_values(d, state),
    };
    let value = match (values, key) {
        (Some(all), None) => Some(Value::Dictionary(all)),
        (Some(all), Some(k)) => all.get(k).cloned(),
        (None, _) => None,
    };
    match value {
        Some(v) => {
            let mut r = reply(verb);
            if let Some(k) = key {
                r.insert("Key".into(), k.into());
            }
            if let Some(d) = domain {
                r.insert("Domain".into(), d.into());
            }
            r.insert("Value".into(), v);
            r
        }
        None => error(verb, "MissingValue"),
    }
}

/// `Pair`: the host brings its own record (certificates it minted over our public key);
/// the device remembers its HostID and hands back the escrow bag.
fn pair(verb: &str, req: &Dictionary, state: &DeviceState) -> Dictionary {
    let record = req.get("PairRecord").and_then(Value::as_dictionary);
    let complete = record.is_some_and(|r| {
        ["DeviceCertificate", "HostCertificate", "RootCertificate"]
            .iter()
            .all(|k| r.get(k).and_then(Value::as_data).is_some())
    });
    match host_id(req) {
        Some(id) if complete => {
            state.pair(id);
            let mut r = reply(verb);
            r.insert("EscrowBag".into(), Value::Data(crate::pairing::escrow_bag(&state.device)));
            r
        }
        _ => error(verb, "InvalidPairRecord"),
    }
}

fn start_service(verb: &str, req: &Dictionary, state: &DeviceState) -> Dictionary {
    let name = req.get("Service").and_then(Value::as_string).unwrap_or_default();
    match services::by_name(name) {
        Some(spec) => {
            state.grant(spec.port);
            let mut r = reply(verb);
            r.insert("Service".into(), name.into());
            r.insert("Port".into(), Value::Integer(u64::from(spec.port).into()));
            r.insert("EnableServiceSSL".into(), Value::Boolean(spec.ssl));
            r
        }
        None => {
            tracing::debug!(device.udid = %state.device.udid, service = name, "unknown service");
            let mut r = error(verb, "InvalidService");
            r.insert("Service".into(), name.into());
            r
        }
    }
}
