//! The virtual usbmuxd: the plist protocol (version 1) over TCP, as libusbmuxd,
//! pymobiledevice3 and idevice speak it through `USBMUXD_SOCKET_ADDRESS=127.0.0.1:PORT`.
//!
//! Frame: `length u32le` (header included) `| version u32le (1) | message u32le (8 = plist)
//! | tag u32le`, then an XML plist. Replies are XML (libusbmuxd parses nothing else) and
//! echo the request's tag (pymobiledevice3 insists). See the reference, section 2.1.

use std::sync::Arc;

use plist::{Dictionary, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::devices::{Device, Event, Registry};

pub const HEADER_BYTES: usize = 16;
pub const PLIST_VERSION: u32 = 1;
pub const PLIST_MESSAGE: u32 = 8;
/// Largest request body accepted (pair records are a few KiB).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// `Result` numbers.
pub const RESULT_OK: u64 = 0;
pub const RESULT_BAD_COMMAND: u64 = 1;
pub const RESULT_BAD_DEVICE: u64 = 2;
pub const RESULT_CONNECTION_REFUSED: u64 = 3;
pub const RESULT_BAD_VERSION: u64 = 6;

#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    #[error("frame length {0} is out of range")]
    BadLength(u32),
    #[error("request is not a plist dictionary: {0}")]
    BadPlist(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One frame's header and plist body.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub version: u32,
    pub message: u32,
    pub tag: u32,
    pub body: Dictionary,
}

/// Encodes a reply (XML body).
pub fn encode(tag: u32, body: &Dictionary) -> Vec<u8> {
    let mut xml = Vec::new();
    // Invariant: writing a dictionary of plain values into a Vec cannot fail.
    plist::to_writer_xml(&mut xml, body).expect("XML plist into Vec");
    let mut out = Vec::with_capacity(HEADER_BYTES + xml.len());
    out.extend_from_slice(&((HEADER_BYTES + xml.len()) as u32).to_le_bytes());
    out.extend_from_slice(&PLIST_VERSION.to_le_bytes());
    out.extend_from_slice(&PLIST_MESSAGE.to_le_bytes());
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&xml);
    out
}

/// Decodes a header; returns (body length, version, message, tag).
pub fn decode_header(h: &[u8; HEADER_BYTES]) -> Result<(usize, u32, u32, u32), MuxError> {
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let len = word(0);
    if (len as usize) < HEADER_BYTES || len as usize > HEADER_BYTES + MAX_BODY_BYTES {
        return Err(MuxError::BadLength(len));
    }
    Ok((len as usize - HEADER_BYTES, word(4), word(8), word(12)))
}

async fn read_frame(s: &mut TcpStream) -> Result<Option<Frame>, MuxError> {
    let mut h = [0u8; HEADER_BYTES];
    match s.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (len, version, message, tag) = decode_header(&h)?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    let body = if version == PLIST_VERSION {
        match plist::from_bytes::<Value>(&body) {
            Ok(Value::Dictionary(d)) => d,
            Ok(other) => return Err(MuxError::BadPlist(format!("{other:?}"))),
            Err(e) => return Err(MuxError::BadPlist(e.to_string())),
        }
    } else {
        Dictionary::new() // legacy binary protocol: answered with BadVersion
    };
    Ok(Some(Frame { version, message, tag, body }))
}

fn result(n: u64) -> Dictionary {
    let mut d = Dictionary::new();
    d.insert("MessageType".into(), "Result".into());
    d.insert("Number".into(), Value::Integer(n.into()));
    d
}

/// A device as ListDevices and Attached present it; every host reads different keys.
pub fn device_entry(d: &Device) -> Dictionary {
    let mut props = Dictionary::new();
    props.insert("ConnectionType".into(), "USB".into());
    props.insert("DeviceID".into(), Value::Integer(u64::from(d.device_id).into()));
    props.insert("SerialNumber".into(), d.udid.clone().into());
    props.insert("USBSerialNumber".into(), d.udid.replace('-', "").into());
    props.insert("ProductID".into(), Value::Integer(0x12a8u64.into()));
    props.insert("LocationID".into(), Value::Integer(0u64.into()));
    props.insert("ConnectionSpeed".into(), Value::Integer(480_000_000u64.into()));
    let mut e = Dictionary::new();
    e.insert("DeviceID".into(), Value::Integer(u64::from(d.device_id).into()));
    e.insert("MessageType".into(), "Attached".into());
    e.insert("Properties".into(), Value::Dictionary(props));
    e
}

fn string<'a>(d: &'a Dictionary, key: &str) -> Option<&'a str> {
    d.get(key).and_then(Value::as_string)
}

fn uint(d: &Dictionary, key: &str) -> Option<u64> {
    d.get(key).and_then(Value::as_unsigned_integer)
}

/// Serves usbmuxd on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Device protocols are chatty request/response exchanges: Nagle's algorithm
                // against the host's delayed ACKs would add 40 ms to each one.
                let _ = stream.set_nodelay(true);
                let registry = registry.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, &registry).await {
                        tracing::debug!(error = %e, "usbmuxd connection ended");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "usbmuxd accept"),
        }
    }
}

async fn connection(mut s: TcpStream, registry: &Arc<Registry>) -> Result<(), MuxError> {
    while let Some(req) = read_frame(&mut s).await? {
        if req.version != PLIST_VERSION || req.message != PLIST_MESSAGE {
            s.write_all(&encode(req.tag, &result(RESULT_BAD_VERSION))).await?;
            continue;
        }
        let kind = string(&req.body, "MessageType").unwrap_or_default().to_string();
        tracing::debug!(usbmuxd.request = %kind, usbmuxd.tag = req.tag, "usbmuxd request");
        let reply = match kind.as_str() {
            "ListDevices" => {
                let list: Vec<Value> = registry.attached().iter().map(|d| Value::Dictionary(device_entry(d))).collect();
                let mut r = Dictionary::new();
                r.insert("DeviceList".into(), Value::Array(list));
                r
            }
            "ReadBUID" => {
                let mut r = Dictionary::new();
                r.insert("BUID".into(), registry.buid.clone().into());
                r
            }
            "ReadPairRecord" => match string(&req.body, "PairRecordID").and_then(|id| registry.pair_record(id)) {
                Some(data) => {
                    let mut r = Dictionary::new();
                    r.insert("PairRecordData".into(), Value::Data(data));
                    r
                }
                None => result(RESULT_BAD_DEVICE),
            },
            "SavePairRecord" => match (string(&req.body, "PairRecordID"), req.body.get("PairRecordData")) {
                (Some(id), Some(Value::Data(data))) if !data.is_empty() => {
                    registry.save_pair_record(id, data.clone());
                    result(RESULT_OK)
                }
                _ => result(RESULT_BAD_COMMAND),
            },
            "DeletePairRecord" => match string(&req.body, "PairRecordID") {
                Some(id) => {
                    registry.delete_pair_record(id);
                    result(RESULT_OK)
                }
                None => result(RESULT_BAD_COMMAND),
            },
            "Listen" => {
                s.write_all(&encode(req.tag, &result(RESULT_OK))).await?;
                return listen(s, registry).await;
            }
            "Connect" => {
                // The port arrives in network byte order inside the integer (62078 as 32498).
                let device = uint(&req.body, "DeviceID").and_then(|id| u32::try_from(id).ok());
                let port = uint(&req.body, "PortNumber").map(|p| u16::from_be(p as u16));
                match (device.and_then(|id| registry.attached_by_id(id)), port) {
                    (None, _) => result(RESULT_BAD_DEVICE),
                    (Some(state), Some(port)) if port == crate::lockdownd::PORT || state.take_grant(port) => {
                        // From here on the same socket is a raw stream to the device's port;
                        // pulling the device out cuts it.
                        s.write_all(&encode(req.tag, &result(RESULT_OK))).await?;
                        let udid = state.device.udid.clone();
                        let served = async {
                            match crate::services::by_port(port) {
                                None => crate::lockdownd::serve(s, &state, registry).await.map_err(|e| e.to_string()),
                                Some(spec) => crate::services::serve(s, spec, state.clone(), registry.clone())
                                    .await
                                    .map_err(|e| e.to_string()),
                            }
                        };
                        tokio::select! {
                            r = served => if let Err(e) = r {
                                tracing::debug!(device.udid = %udid, port, error = %e, "device connection ended");
                            },
                            () = state.unplugged() => {
                                tracing::info!(device.udid = %udid, port, "device unplugged: connection cut");
                            }
                        }
                        return Ok(());
                    }
                    (Some(state), Some(port)) => {
                        tracing::debug!(device.udid = %state.device.udid, port, "connect refused: no service on the port");
                        result(RESULT_CONNECTION_REFUSED)
                    }
                    (Some(_), None) => result(RESULT_BAD_COMMAND),
                }
            }
            _ => result(RESULT_BAD_COMMAND),
        };
        s.write_all(&encode(req.tag, &reply)).await?;
    }
    Ok(())
}

/// After `Listen`: Attached for every plugged-in device, then each change, tag 0.
async fn listen(mut s: TcpStream, registry: &Registry) -> Result<(), MuxError> {
    let mut events = registry.subscribe();
    for d in registry.attached() {
        s.write_all(&encode(0, &device_entry(&d))).await?;
    }
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        };
        let body = match event {
            Event::Attached(d) => device_entry(&d),
            Event::Detached(id) => {
                let mut d = Dictionary::new();
                d.insert("MessageType".into(), "Detached".into());
                d.insert("DeviceID".into(), Value::Integer(u64::from(id).into()));
                d
            }
        };
        s.write_all(&encode(0, &body)).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_lengths_are_refused() {
        let mut d = Dictionary::new();
        d.insert("BUID".into(), "X".into());
        let f = encode(7, &d);
        let mut h = [0u8; HEADER_BYTES];
        h.copy_from_slice(&f[..HEADER_BYTES]);
        let (len, version, message, tag) = decode_header(&h).unwrap();
        assert_eq!((len, version, message, tag), (f.len() - HEADER_BYTES, 1, 8, 7));
        let body: Value = plist::from_bytes(&f[HEADER_BYTES..]).unwrap();
        assert_eq!(body.as_dictionary().unwrap().get("BUID").unwrap().as_string(), Some("X"));
        assert!(std::str::from_utf8(&f[HEADER_BYTES..]).unwrap().starts_with("<?xml"), "replies are XML");
        let mut bad = h;
        bad[..4].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(decode_header(&bad), Err(MuxError::BadLength(3))));
        bad[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_header(&bad), Err(MuxError::BadLength(_))));
    }
}
