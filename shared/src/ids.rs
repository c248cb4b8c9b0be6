//! Identifiers as types, parsed at the edge: chunk ids, pack ids, UDIDs, and the uuids of
//! tenants, agents, runs and snapshots.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("not a {what}: {value:?} (expected {expected})")]
    Malformed { what: &'static str, value: String, expected: &'static str },
}

fn hex32(s: &str, what: &'static str) -> Result<[u8; 32], IdError> {
    let bad = || IdError::Malformed { what, value: s.chars().take(80).collect(), expected: "64 hex digits" };
    if s.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16).ok_or_else(bad)?;
        let lo = (pair[1] as char).to_digit(16).ok_or_else(bad)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Ok(out)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

macro_rules! hash_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "("))?;
                write_hex(f, &self.0[..8])?;
                write!(f, "…)")
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                hex32(s, $what).map(Self)
            }
        }
    };
}

hash_id!(
    /// Keyed BLAKE3 of a chunk's plaintext under the tenant's id key.
    ChunkId,
    "chunk id"
);
hash_id!(
    /// BLAKE3 of a pack object's bytes: its name in storage.
    PackId,
    "pack id"
);

/// An iPhone's unique device id: 40 hex digits (before iPhone XS) or `XXXXXXXX-XXXXXXXXXXXXXXXX`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Udid(String);

impl Udid {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Udid {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let bytes = s.as_bytes();
        let hex = |b: &[u8]| b.iter().all(u8::is_ascii_hexdigit);
        let ok = (bytes.len() == 40 && hex(bytes))
            || (bytes.len() == 25 && bytes[8] == b'-' && hex(&bytes[..8]) && hex(&bytes[9..]));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(IdError::Malformed {
                what: "UDID",
                value: s.chars().take(80).collect(),
                expected: "40 hex digits or 8-16 hex digits separated by a dash",
            })
        }
    }
}

impl TryFrom<String> for Udid {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<Udid> for String {
    fn from(u: Udid) -> String {
        u.0
    }
}

impl fmt::Display for Udid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Udid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Udid({})", self.0)
    }
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
        #[serde(transparent)]
        pub struct $name(pub uuid::Uuid);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                uuid::Uuid::parse_str(s).map(Self).map_err(|_| IdError::Malformed {
                    what: stringify!($name),
                    value: s.chars().take(80).collect(),
                    expected: "a UUID",
                })
            }
        }
    };
}

uuid_id!(
    /// A tenant (organisation).
    TenantId
);
uuid_id!(
    /// An enrolled agent.
    AgentId
);
uuid_id!(
    /// One backup run.
    RunId
);
uuid_id!(
    /// A committed snapshot.
    SnapshotId
);
uuid_id!(
    /// A restore job: a snapshot to be put onto an iPhone.
    RestoreJobId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ids_round_trip_through_hex() {
        let id = ChunkId([0xab; 32]);
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<ChunkId>().unwrap(), id);
        assert_eq!(format!("{id:?}"), "ChunkId(abababababababab…)");
        assert!("zz".repeat(32).parse::<ChunkId>().is_err());
        assert!("ab".parse::<ChunkId>().is_err());
        assert!("é".repeat(32).parse::<ChunkId>().is_err());
    }

    #[test]
    fn udids_of_both_generations_parse_and_others_do_not() {
        assert!("00008030-001A2B3C4D5E6F70".parse::<Udid>().is_ok());
        assert!("0123456789abcdef0123456789abcdef01234567".parse::<Udid>().is_ok());
        for bad in ["", "../../etc/passwd", "00008030_001A2B3C4D5E6F70", "0123456789abcdef0123456789abcdef0123456g"] {
            assert!(bad.parse::<Udid>().is_err(), "{bad}");
        }
    }
}
