//! Escrowed iOS backup passwords: the organisation, not a person, holds every phone's
//! backup password, so a lost password never costs a backup.
//!
//! One password per device, sealed with the tenant's secret key (`keys::TenantKeys::
//! seal_secret`, bound to the tenant and the UDID): storage and the database alone never
//! read it; the server with the tenant's key does, and hands it only to the tenant's
//! agents over the authenticated protocol and to admins through the audited reveal
//! (`docs/format.md`, threat model). Every set and every reveal writes an audit event in
//! the same transaction as the change or the read, so no reveal goes unrecorded. The
//! password itself is a `Secret` everywhere and never logged.

use lifeboat_shared::Secret;
use lifeboat_shared::ids::TenantId;
use serde_json::json;
use tokio_postgres::Client;

use crate::keys::{KeyError, TenantKeys};
use crate::store;

/// What the sealed secret is, bound into its associated data.
const PURPOSE: &str = "ios backup password";
const KEYBAG_PURPOSE: &str = "ios backup keybag";
/// Longest password accepted (Finder accepts far shorter ones; any longer is a mistake).
pub const MAX_PASSWORD_CHARS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum EscrowError {
    #[error("backup password refused: {0}")]
    BadPassword(&'static str),
    #[error("no device {0}")]
    NoDevice(String),
    #[error("no backup password is escrowed for device {0}")]
    NotEscrowed(String),
    #[error(
        "backup password refused: it does not unlock the keybag of the backup {udid} made on {reported_at}, so it \
         is not this iPhone's backup password; nothing was stored. The password is the one set in Finder, iTunes or \
         another backup tool; if no one knows it, the user resets it on the iPhone with Settings > General > \
         Transfer or Reset iPhone > Reset > Reset All Settings"
    )]
    WrongPassword { udid: String, reported_at: String },
    #[error("backup keybag refused: {0}")]
    BadKeybag(String),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// Checks an entered password: non-empty, at most [`MAX_PASSWORD_CHARS`], no control
/// characters (a pasted newline would make a password no phone has).
pub fn validate(password: &str) -> Result<(), EscrowError> {
    if password.is_empty() {
        return Err(EscrowError::BadPassword("it is empty"));
    }
    if password.chars().count() > MAX_PASSWORD_CHARS {
        return Err(EscrowError::BadPassword("it is longer than 256 characters"));
    }
    if password.chars().any(char::is_control) {
        return Err(EscrowError::BadPassword("it contains a control character (a pasted newline?)"));
    }
    Ok(())
}

/// Who sets or reveals a password, for the audit log.
#[derive(Debug, Clone, Copy)]
pub enum Actor {
    /// An API user (an admin).
    User(uuid::Uuid),
    /// An enrolled agent (it generated the password and set it on the phone).
    Agent(uuid::Uuid),
    /// The operator at the server's CLI.
    Operator,
}

impl Actor {
    fn describe(self) -> String {
        match self {
            Self::User(id) => format!("user {id}"),
            Self::Agent(id) => format!("agent {id}"),
            Self::Operator => "operator (CLI)".into(),
        }
    }

    fn event<'a>(self, tenant: TenantId, actor: &'a str, action: &'a str, udid: &'a str) -> store::audit::Event<'a> {
        let (actor_user, actor_agent) = match self {
            Self::User(id) => (Some(id), None),
            Self::Agent(id) => (None, Some(id)),
            Self::Operator => (None, None),
        };
        store::audit::Event {
            actor_user,
            actor_agent,
            udid: Some(udid),
            ..store::audit::Event::new(tenant, actor, action)
        }
    }
}

/// An escrowed password, opened.
#[derive(Debug)]
pub struct Escrowed {
    pub password: Secret<String>,
    /// `agent` or `admin`.
    pub source: String,
    pub set_at: String,
}

/// What an entered password was checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// It unlocks the keybag of the phone's backup reported at this time.
    Verified { reported_at: String },
    /// No agent has reported a keybag for the phone yet: it is kept unchecked, and the
    /// next backup says whether it opens the phone's backups.
    Unverified,
}

/// Checks a password a person entered against the keybag an agent reported for the device
/// (seconds of PBKDF2 at a phone's counts, on the blocking pool), before it is stored.
pub async fn check(
    client: &Client,
    keys: &TenantKeys,
    udid: &str,
    password: &Secret<String>,
) -> Result<Checked, EscrowError> {
    validate(password.expose())?;
    let Some(sealed) = store::escrow::get_keybag(client, keys.tenant, udid).await? else {
        return Ok(Checked::Unverified);
    };
    let keybag = keys.open_secret(KEYBAG_PURPOSE, udid, &sealed.sealed)?;
    let p = password.clone();
    let opened = tokio::task::spawn_blocking(move || {
        lifeboat_shared::ios_crypto::Keybag::parse(&keybag).and_then(|bag| bag.open(p.expose()).map(|_| ()))
    })
    .await
    .map_err(|e| EscrowError::BadKeybag(format!("checking the password: {e}")))?;
    match opened {
        Ok(()) => Ok(Checked::Verified { reported_at: sealed.reported_at }),
        Err(lifeboat_shared::ios_crypto::KeybagError::WrongPassword) => {
            Err(EscrowError::WrongPassword { udid: udid.to_string(), reported_at: sealed.reported_at })
        }
        Err(e) => Err(EscrowError::BadKeybag(e.to_string())),
    }
}

/// Keeps the keybag of a backup the phone encrypted with a password the server does not
/// know, sealed like a password (with it anyone could guess the password offline).
pub async fn report_keybag(
    client: &Client,
    keys: &TenantKeys,
    udid: &str,
    keybag: &[u8],
    agent: uuid::Uuid,
) -> Result<(), EscrowError> {
    if keybag.len() > lifeboat_shared::wire::MAX_KEYBAG_BYTES {
        return Err(EscrowError::BadKeybag(format!(
            "it is {} bytes, more than {}",
            keybag.len(),
            lifeboat_shared::wire::MAX_KEYBAG_BYTES
        )));
    }
    lifeboat_shared::ios_crypto::Keybag::parse(keybag).map_err(|e| EscrowError::BadKeybag(e.to_string()))?;
    let sealed = keys.seal_secret(KEYBAG_PURPOSE, udid, keybag)?;
    if !store::escrow::put_keybag(client, keys.tenant, udid, &sealed, agent).await? {
        return Err(EscrowError::NoDevice(udid.to_string()));
    }
    tracing::info!(tenant = %keys.tenant, device.udid = udid, agent.id = %agent, "backup keybag of an unknown password reported");
    Ok(())
}

/// Escrows `password` for the device (replacing any), audited as `backup-password.set`.
/// Returns when it was set. A person's password is [`check`]ed first.
pub async fn set(
    client: &mut Client,
    keys: &TenantKeys,
    udid: &str,
    password: &Secret<String>,
    actor: Actor,
) -> Result<String, EscrowError> {
    validate(password.expose())?;
    let sealed = keys.seal_secret(PURPOSE, udid, password.expose().as_bytes())?;
    let (source, user, agent) = match actor {
        Actor::User(id) => ("admin", Some(id), None),
        Actor::Agent(id) => ("agent", None, Some(id)),
        Actor::Operator => ("admin", None, None),
    };
    let who = actor.describe();
    let mut event = actor.event(keys.tenant, &who, "backup-password.set", udid);
    event.detail = json!({ "source": source });
    let row = store::escrow::NewSealed { udid, sealed: &sealed, source, user, agent };
    let Some(set_at) = store::escrow::put_audited(client, keys.tenant, &row, &event).await? else {
        return Err(EscrowError::NoDevice(udid.to_string()));
    };
    tracing::info!(tenant = %keys.tenant, device.udid = udid, actor = %who, "backup password escrowed");
    Ok(set_at)
}

/// Opens the device's escrowed password for a person, audited as `backup-password.reveal`
/// (the event is committed before the password is returned).
pub async fn reveal(client: &mut Client, keys: &TenantKeys, udid: &str, actor: Actor) -> Result<Escrowed, EscrowError> {
    let who = actor.describe();
    let event = actor.event(keys.tenant, &who, "backup-password.reveal", udid);
    let sealed = match store::escrow::get_audited(client, keys.tenant, udid, &event).await? {
        store::escrow::Found::Sealed(sealed) => sealed,
        store::escrow::Found::NoDevice => return Err(EscrowError::NoDevice(udid.to_string())),
        store::escrow::Found::NotEscrowed => return Err(EscrowError::NotEscrowed(udid.to_string())),
    };
    tracing::info!(tenant = %keys.tenant, device.udid = udid, actor = %who, "backup password revealed");
    open(keys, udid, sealed)
}

/// The device's escrowed password for one of the tenant's agents, which needs it for every
/// backup and restore of an encrypted phone: not a person's view, so not audited (the
/// set by an agent is). `None` when nothing is escrowed.
pub async fn for_agent(client: &Client, keys: &TenantKeys, udid: &str) -> Result<Option<Escrowed>, EscrowError> {
    if !store::devices::exists(client, keys.tenant, udid).await? {
        return Err(EscrowError::NoDevice(udid.to_string()));
    }
    match store::escrow::get(client, keys.tenant, udid).await? {
        Some(sealed) => open(keys, udid, sealed).map(Some),
        None => Ok(None),
    }
}

fn open(keys: &TenantKeys, udid: &str, sealed: store::escrow::Sealed) -> Result<Escrowed, EscrowError> {
    let plain = keys.open_secret(PURPOSE, udid, &sealed.sealed)?;
    let password = String::from_utf8(plain).map_err(|_| KeyError::Unwrap(format!("{PURPOSE} of {udid}")))?;
    Ok(Escrowed { password: Secret::new(password), source: sealed.source, set_at: sealed.set_at })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entered_passwords_are_checked() {
        assert!(validate("correct horse").is_ok());
        assert!(validate(&"é".repeat(256)).is_ok());
        for bad in ["", "line\n", "tab\there"] {
            assert!(matches!(validate(bad), Err(EscrowError::BadPassword(_))), "{bad:?}");
        }
        assert!(matches!(validate(&"x".repeat(257)), Err(EscrowError::BadPassword(_))));
    }
}
