//! A phone's backup encryption: whether it encrypts (lockdown `WillEncrypt`), and turning
//! it on, changing or turning off its password with MobileBackup2 `ChangePassword`.
//!
//! idevice's `change_password_from_path` discards the phone's answer — a wrong old
//! password looks like success — and logs the request, password included, at debug
//! level. So the request is written here as raw bytes and the phone's final `Response` is
//! read and checked: `ErrorCode` 0 is success, 207 a wrong password, anything else a
//! refusal with the phone's description. The password never reaches a log line.

use idevice::IdeviceService as _;
use idevice::services::lockdown::LockdownClient;
use idevice::services::mobilebackup2::MobileBackup2Client;
use lifeboat_shared::Secret;
use plist::{Dictionary, Value};

use super::{DeviceError, Provider, classify};

/// MBErrorDomain 207: the old password (or the one given for a restore) is wrong.
pub const WRONG_PASSWORD: u64 = 207;
/// MBErrorDomain 208: the passcode was not entered on the phone in time.
const LOCKED: u64 = 208;

impl Provider {
    /// Whether the phone encrypts its backups (`com.apple.mobile.backup` `WillEncrypt`).
    pub async fn will_encrypt(&self) -> Result<bool, DeviceError> {
        let pairing = self.get_pairing_file_checked().await?;
        let mut lockdown = LockdownClient::connect(self).await.map_err(classify)?;
        lockdown.start_session(&pairing).await.map_err(classify)?;
        match lockdown.get_value(Some("WillEncrypt"), Some("com.apple.mobile.backup")).await {
            Ok(Value::Boolean(b)) => Ok(b),
            Ok(other) => Err(DeviceError::Failed(format!("WillEncrypt is not a boolean: {other:?}"))),
            // A phone that never had a password may not have the key at all.
            Err(idevice::IdeviceError::UnexpectedResponse(_)) => Ok(false),
            Err(e) => Err(classify(e)),
        }
    }

    /// `ChangePassword`: `new` alone turns encryption on, `old` and `new` change the
    /// password, `old` alone turns encryption off. A wrong `old` is
    /// [`DeviceError::WrongBackupPassword`].
    pub async fn change_password(
        &self,
        old: Option<&Secret<String>>,
        new: Option<&Secret<String>>,
    ) -> Result<(), DeviceError> {
        let mut client = MobileBackup2Client::connect(self).await.map_err(classify)?;
        let mut message = Dictionary::new();
        message.insert("MessageName".into(), "ChangePassword".into());
        message.insert("TargetIdentifier".into(), self.udid.clone().into());
        if let Some(old) = old {
            message.insert("OldPassword".into(), old.expose().clone().into());
        }
        if let Some(new) = new {
            message.insert("NewPassword".into(), new.expose().clone().into());
        }
        let frame = Value::Array(vec!["DLMessageProcessMessage".into(), Value::Dictionary(message)]);
        let mut body = Vec::new();
        frame.to_writer_binary(&mut body).map_err(|e| DeviceError::Failed(format!("encoding ChangePassword: {e}")))?;
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        client.idevice.send_raw(&bytes).await.map_err(classify)?;
        // The phone answers with its final Response and nothing else (it asks the host
        // for no files while it changes the password).
        let (tag, reply) = client.receive_dl_message().await.map_err(classify)?;
        match tag.as_str() {
            "DLMessageProcessMessage" => {}
            "DLMessageDisconnect" => {
                return Err(DeviceError::Failed("the iPhone disconnected before answering ChangePassword".into()));
            }
            other => return Err(DeviceError::Failed(format!("the iPhone sent {other} while changing its password"))),
        }
        let _ = client.disconnect().await;
        let reply =
            reply.as_array().and_then(|a| a.get(1)).and_then(Value::as_dictionary).ok_or_else(|| {
                DeviceError::Failed("the iPhone's answer to ChangePassword is not a dictionary".into())
            })?;
        let code = reply.get("ErrorCode").and_then(Value::as_unsigned_integer);
        let description = reply.get("ErrorDescription").and_then(Value::as_string).unwrap_or("no description");
        match code {
            Some(0) => Ok(()),
            Some(WRONG_PASSWORD) => Err(DeviceError::WrongBackupPassword(description.to_string())),
            Some(LOCKED) => Err(DeviceError::Locked),
            Some(code) => Err(DeviceError::Refused { code, description: description.to_string() }),
            None => Err(DeviceError::Failed("the iPhone's answer to ChangePassword has no ErrorCode".into())),
        }
    }
}

/// A strong random backup password for a phone: 24 characters of an unambiguous
/// alphabet (about 139 bits), in groups of four for an admin who must type it.
pub fn generate_password() -> Result<Secret<String>, DeviceError> {
    const ALPHABET: &[u8] = b"23456789abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ";
    // Bytes of 224 and above are dropped, so each of the 56 characters is equally likely
    // (224 = 4 × 56): 24 characters of log2(56) bits, 139 bits in all.
    let limit = 256 - 256 % ALPHABET.len();
    let rng = ring::rand::SystemRandom::new();
    let mut chars = Vec::with_capacity(24);
    while chars.len() < 24 {
        let mut random = [0u8; 32];
        ring::rand::SecureRandom::fill(&rng, &mut random)
            .map_err(|_| DeviceError::Failed("the system random number generator failed".into()))?;
        chars.extend(
            random.iter().filter(|b| usize::from(**b) < limit).map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()]),
        );
    }
    let mut out = String::with_capacity(29);
    for (i, c) in chars[..24].iter().enumerate() {
        if i > 0 && i % 4 == 0 {
            out.push('-');
        }
        out.push(char::from(*c));
    }
    Ok(Secret::new(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passwords_are_long_grouped_and_different() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 29);
        assert!(a.expose().split('-').all(|g| g.len() == 4 && g.bytes().all(|c| c.is_ascii_alphanumeric())));
        assert_eq!(format!("{a:?}"), "***");
    }
}
