//! The `length u32be | plist` framing lockdownd and the plist services share.

use plist::{Dictionary, Value};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Largest plist message accepted from a host (DeviceLink messages carry paths, not data).
pub const MAX_PLIST_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("message of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("not a plist: {0}")]
    BadPlist(String),
    #[error("expected a plist {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads one framed plist (XML or binary); `None` at a clean end of stream. Reads exactly
/// the frame, so what follows (a TLS handshake, raw file data) stays in the stream.
pub async fn read_plist<S: AsyncRead + Unpin>(s: &mut S) -> Result<Option<Value>, FrameError> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_PLIST_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    plist::from_bytes::<Value>(&body).map(Some).map_err(|e| FrameError::BadPlist(e.to_string()))
}

/// Reads one framed plist dictionary; `None` at a clean end of stream.
pub async fn read_dict<S: AsyncRead + Unpin>(s: &mut S) -> Result<Option<Dictionary>, FrameError> {
    match read_plist(s).await? {
        None => Ok(None),
        Some(Value::Dictionary(d)) => Ok(Some(d)),
        Some(other) => Err(FrameError::Unexpected { expected: "dictionary", got: format!("{other:?}") }),
    }
}

/// Frames a value as an XML plist (what lockdownd and the helper services send).
pub fn xml_frame(value: &Value) -> Vec<u8> {
    let mut xml = Vec::new();
    // Invariant: a plist Value of plain types always serialises into a Vec.
    plist::to_writer_xml(&mut xml, value).expect("XML plist into Vec");
    let mut out = (xml.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&xml);
    out
}

/// Frames a value as a binary plist (what the device sends on DeviceLink services).
pub fn binary_frame(value: &Value) -> Vec<u8> {
    let mut bin = Vec::new();
    // Invariant: as above.
    plist::to_writer_binary(&mut bin, value).expect("binary plist into Vec");
    let mut out = (bin.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&bin);
    out
}

pub async fn write_xml<S: AsyncWrite + Unpin>(s: &mut S, value: &Value) -> std::io::Result<()> {
    s.write_all(&xml_frame(value)).await?;
    s.flush().await
}

pub async fn write_binary<S: AsyncWrite + Unpin>(s: &mut S, value: &Value) -> std::io::Result<()> {
    s.write_all(&binary_frame(value)).await?;
    s.flush().await
}
