//! lockdownd (device port 62078), the plaintext part: `QueryType`, `GetValue` (the keys
//! and domains hosts read), `Goodbye`. Framing: `length u32be | plist`; replies are XML
//! and echo `Request`, as libimobiledevice and pymobiledevice3 check.
//!
//! Not built yet: `StartSession` with TLS (the device as TLS server), pairing and
//! `StartService`; `StartSession` answers `InvalidHostID` until then, so hosts fail with
//! a clear lockdown error instead of hanging.

use plist::{Dictionary, Value};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::devices::Device;

/// The device port usbmuxd `Connect`s to for lockdownd.
pub const PORT: u16 = 62078;
/// Largest request accepted.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LockdownError {
    #[error("message of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("request is not a plist dictionary: {0}")]
    BadPlist(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Encodes one lockdown message (XML).
pub fn encode(body: &Dictionary) -> Vec<u8> {
    let mut xml = Vec::new();
    // Invariant: writing a dictionary of plain values into a Vec cannot fail.
    plist::to_writer_xml(&mut xml, body).expect("XML plist into Vec");
    let mut out = (xml.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&xml);
    out
}

async fn read_message<S: AsyncRead + Unpin>(s: &mut S) -> Result<Option<Dictionary>, LockdownError> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(LockdownError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    match plist::from_bytes::<Value>(&body) {
        Ok(Value::Dictionary(d)) => Ok(Some(d)),
        Ok(other) => Err(LockdownError::BadPlist(format!("{other:?}"))),
        Err(e) => Err(LockdownError::BadPlist(e.to_string())),
    }
}

/// The values of the default domain, as a real device reports them.
pub fn device_values(d: &Device) -> Dictionary {
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
    let mac: Vec<String> = ecid.to_be_bytes()[2..].iter().map(|b| format!("{b:02x}")).collect();
    put("WiFiAddress", mac.join(":").into());
    put("HardwareModel", "D74AP".into());
    put("CPUArchitecture", "arm64e".into());
    put("ActivationState", "Activated".into());
    put("ProtocolVersion", "2".into());
    put("TimeZone", "Europe/Zurich".into());
    v
}

/// Values of the other domains hosts read.
fn domain_values(domain: &str) -> Option<Dictionary> {
    let mut v = Dictionary::new();
    match domain {
        "com.apple.mobile.backup" => {
            v.insert("WillEncrypt".into(), Value::Boolean(false));
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

/// Serves one lockdown connection of `device` until the host hangs up.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, device: &Device) -> Result<(), LockdownError> {
    while let Some(req) = read_message(&mut s).await? {
        let verb = req.get("Request").and_then(Value::as_string).unwrap_or_default().to_string();
        tracing::debug!(device.udid = %device.udid, lockdown.request = %verb, "lockdown request");
        let out = match verb.as_str() {
            "QueryType" => {
                let mut r = reply(&verb);
                r.insert("Type".into(), "com.apple.mobile.lockdown".into());
                r
            }
            "GetValue" => {
                let key = req.get("Key").and_then(Value::as_string);
                let domain = req.get("Domain").and_then(Value::as_string);
                let values = match domain {
                    None => Some(device_values(device)),
                    Some(d) => domain_values(d),
                };
                let value = match (values, key) {
                    (Some(all), None) => Some(Value::Dictionary(all)),
                    (Some(all), Some(k)) => all.get(k).cloned(),
                    (None, _) => None,
                };
                match value {
                    Some(v) => {
                        let mut r = reply(&verb);
                        if let Some(k) = key {
                            r.insert("Key".into(), k.into());
                        }
                        if let Some(d) = domain {
                            r.insert("Domain".into(), d.into());
                        }
                        r.insert("Value".into(), v);
                        r
                    }
                    None => error(&verb, "MissingValue"),
                }
            }
            "Goodbye" => {
                let mut r = reply(&verb);
                r.insert("Result".into(), "Success".into());
                s.write_all(&encode(&r)).await?;
                return Ok(());
            }
            // Sessions (TLS), pairing and services are not built yet.
            "StartSession" => error(&verb, "InvalidHostID"),
            "" => error("", "MalformedCommand"),
            _ => error(&verb, "MalformedCommand"),
        };
        s.write_all(&encode(&out)).await?;
    }
    Ok(())
}
