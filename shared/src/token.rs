//! Enrolment tokens (`lbe1_…`): what `lifeboat-server token create` prints and
//! `lifeboat-agent enroll` takes — the server's QUIC address, the SHA-256 of its
//! certificate (pinned by the agent) and a one-time 32-byte secret.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

const TOKEN_PREFIX: &str = "lbe1_";

/// What an enrolment token carries. `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollToken {
    /// `host:port` of the server's QUIC endpoint.
    pub server: String,
    pub cert_sha256: [u8; 32],
    pub secret: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("not a Lifeboat enrolment token (it starts with `{TOKEN_PREFIX}`)")]
    Malformed,
}

impl EnrollToken {
    pub fn encode(&self) -> String {
        // Invariant: serialising this plain struct into a Vec cannot fail.
        let bytes = postcard::to_stdvec(self).expect("postcard into Vec");
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    pub fn decode(s: &str) -> Result<Self, TokenError> {
        let b64 = s.trim().strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Malformed)?;
        let bytes = URL_SAFE_NO_PAD.decode(b64).map_err(|_| TokenError::Malformed)?;
        postcard::from_bytes(&bytes).map_err(|_| TokenError::Malformed)
    }
}

impl std::fmt::Debug for EnrollToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollToken").field("server", &self.server).field("secret", &"***").finish_non_exhaustive()
    }
}

impl std::fmt::Display for EnrollToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "enrolment token for {}", self.server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrolment_tokens_round_trip_and_junk_is_refused() {
        let t = EnrollToken { server: "backup.example:4433".into(), cert_sha256: [1; 32], secret: [2; 32] };
        let s = t.encode();
        assert!(s.starts_with("lbe1_"));
        assert_eq!(EnrollToken::decode(&s).unwrap(), t);
        assert_eq!(t.to_string(), "enrolment token for backup.example:4433");
        assert!(!format!("{t:?}").contains("2, 2"), "Debug shows no secret: {t:?}");
        for bad in ["", "lbe1_", "lbe1_!!!", "xyz", &s[..s.len() - 4]] {
            assert!(EnrollToken::decode(bad).is_err(), "{bad}");
        }
    }
}
