//! Agent authentication: one-time enrolment tokens, refresh secrets, and short-lived
//! EdDSA-signed access tokens (JWT).
//!
//! - An enrolment token (`lbe1_…`) carries the server's address, its certificate
//!   fingerprint and a 32-byte secret; the database keeps only the secret's SHA-256, with
//!   the tenant, expiry and whether it was used.
//! - Enrolling turns it into an agent row, a refresh secret (hash stored) and the
//!   tenant's keys (sent once over TLS).
//! - Access tokens are JWTs signed with an Ed25519 key that all replicas share
//!   (`server_secrets`, wrapped by the master key), valid for [`ACCESS_TTL`]. Revocation
//!   is checked in the database on every connect and refresh.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use lifeboat_shared::ids::{AgentId, TenantId};
use lifeboat_shared::wire::ErrorCode;
use ring::signature::KeyPair as _;
use serde::{Deserialize, Serialize};

use crate::keys::{KeyError, MasterKey, random_32};
use crate::store;
use crate::store::agents::Enrolment;

pub const ACCESS_TTL: Duration = Duration::from_secs(15 * 60);
const AUDIENCE: &str = "lifeboat-agent";
const SIGNING_SECRET: &str = "access-token-signing-key";

pub use lifeboat_shared::token::{EnrollToken, TokenError};

/// SHA-256, for secrets the database must recognise without holding.
pub fn secret_hash(secret: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, secret).as_ref().to_vec()
}

/// Why a credential was refused, with the wire code the agent sees.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

impl AuthError {
    pub fn refused(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Refused { code, message: message.into() }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Refused { code, .. } => *code,
            _ => ErrorCode::Internal,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    tid: String,
    aud: String,
    iat: u64,
    exp: u64,
}

/// Issues and checks access tokens.
pub struct Signer {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(***)")
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Signer {
    /// Loads the shared signing key from the database, creating it on first use.
    pub async fn load_or_create(client: &tokio_postgres::Client, master: &MasterKey) -> Result<Self, AuthError> {
        let pkcs8 = match store::agents::secret(client, SIGNING_SECRET).await? {
            Some((mk, wrapped)) => {
                if mk != master.id() {
                    return Err(KeyError::WrongMasterKey {
                        what: "the access-token signing key".into(),
                        stored: mk,
                        ours: master.id().into(),
                    }
                    .into());
                }
                master.unwrap("server secret", SIGNING_SECRET.as_bytes(), &wrapped)?
            }
            None => {
                let rng = ring::rand::SystemRandom::new();
                let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Random)?;
                let wrapped = master.wrap("server secret", SIGNING_SECRET.as_bytes(), doc.as_ref())?;
                // Another replica may win the race; then use its key.
                store::agents::put_secret_once(client, SIGNING_SECRET, master.id(), &wrapped).await?;
                return Box::pin(Self::load_or_create(client, master)).await;
            }
        };
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|_| KeyError::Unwrap("the access-token signing key".into()))?;
        Ok(Self {
            encoding: EncodingKey::from_ed_der(&pkcs8),
            decoding: DecodingKey::from_ed_der(pair.public_key().as_ref()),
        })
    }

    /// A new access token for `agent` of `tenant`.
    pub fn issue(&self, agent: AgentId, tenant: TenantId) -> Result<String, AuthError> {
        let iat = now_unix();
        let claims = Claims {
            sub: agent.to_string(),
            tid: tenant.to_string(),
            aud: AUDIENCE.into(),
            iat,
            exp: iat + ACCESS_TTL.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.encoding)
            .map_err(|e| AuthError::refused(ErrorCode::Internal, format!("signing an access token: {e}")))
    }

    /// Checks signature, audience and expiry; returns the agent and tenant it names.
    pub fn verify(&self, token: &str) -> Result<(AgentId, TenantId), AuthError> {
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_audience(&[AUDIENCE]);
        v.leeway = 30;
        v.set_required_spec_claims(&["exp", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &v).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                AuthError::refused(ErrorCode::Expired, "access token expired; refresh it")
            }
            _ => AuthError::refused(ErrorCode::BadCredential, "access token is not valid for this server"),
        })?;
        let bad = || AuthError::refused(ErrorCode::BadCredential, "access token names no valid agent");
        Ok((data.claims.sub.parse().map_err(|_| bad())?, data.claims.tid.parse().map_err(|_| bad())?))
    }
}

/// Creates a one-time enrolment token for `tenant`, valid for `ttl`.
pub async fn create_enroll_token(
    client: &tokio_postgres::Client,
    tenant: TenantId,
    ttl: Duration,
    server: String,
    cert_sha256: [u8; 32],
) -> Result<EnrollToken, AuthError> {
    Ok(create_multi_use_token(client, tenant, ttl, 1, server, cert_sha256).await?.1)
}

/// The most agents one enrolment token may enrol.
pub const MAX_TOKEN_USES: u32 = 100_000;

/// Creates an enrolment token for `tenant` that enrols up to `uses` agents within `ttl`
/// (an MDM rollout hands one to every workstation); returns its id and the token.
pub async fn create_multi_use_token(
    client: &tokio_postgres::Client,
    tenant: TenantId,
    ttl: Duration,
    uses: u32,
    server: String,
    cert_sha256: [u8; 32],
) -> Result<(uuid::Uuid, EnrollToken), AuthError> {
    if !(1..=MAX_TOKEN_USES).contains(&uses) {
        return Err(AuthError::refused(
            ErrorCode::Malformed,
            format!("a token enrols 1 to {MAX_TOKEN_USES} agents, not {uses}"),
        ));
    }
    let secret = random_32()?;
    let id = store::agents::create_enroll_token(client, tenant, &secret_hash(&secret), ttl.as_secs_f64(), uses as i32)
        .await?;
    Ok((id, EnrollToken { server, cert_sha256, secret }))
}

/// Redeems an enrolment secret: creates the agent, marks the token used, returns the
/// agent, its tenant and a new refresh secret. One transaction; a token works as many
/// times as it was made for.
pub async fn enroll(
    client: &mut tokio_postgres::Client,
    token_secret: &[u8],
    hostname: &str,
    agent_version: &str,
) -> Result<(AgentId, TenantId, [u8; 32]), AuthError> {
    if hostname.is_empty() || hostname.len() > 255 || agent_version.len() > 64 {
        return Err(AuthError::refused(ErrorCode::Malformed, "hostname or agent version missing or too long"));
    }
    let refresh = random_32()?;
    match store::agents::enroll(client, &secret_hash(token_secret), hostname, agent_version, &secret_hash(&refresh))
        .await?
    {
        Enrolment::Enrolled { agent, tenant } => Ok((agent, tenant, refresh)),
        Enrolment::UnknownToken => Err(AuthError::refused(ErrorCode::BadCredential, "unknown enrolment token")),
        Enrolment::AlreadyUsed { max_uses: 1 } => {
            Err(AuthError::refused(ErrorCode::AlreadyUsed, "this enrolment token was already used; create a new one"))
        }
        Enrolment::AlreadyUsed { max_uses } => Err(AuthError::refused(
            ErrorCode::AlreadyUsed,
            format!("this enrolment token has enrolled all the {max_uses} agents it was made for; create a new one"),
        )),
        Enrolment::Revoked => {
            Err(AuthError::refused(ErrorCode::Revoked, "this enrolment token was revoked; create a new one"))
        }
        Enrolment::Expired => {
            Err(AuthError::refused(ErrorCode::Expired, "this enrolment token has expired; create a new one"))
        }
    }
}

/// Checks an agent still exists, belongs to `tenant` and is not revoked; notes it was seen.
pub async fn check_agent(client: &tokio_postgres::Client, agent: AgentId, tenant: TenantId) -> Result<(), AuthError> {
    match store::agents::seen(client, tenant, agent).await? {
        None => Err(AuthError::refused(ErrorCode::BadCredential, "unknown agent")),
        Some(true) => Err(AuthError::refused(ErrorCode::Revoked, "this agent was revoked; enrol it again")),
        Some(false) => Ok(()),
    }
}

/// Checks a refresh secret; returns the agent's tenant.
pub async fn refresh(client: &tokio_postgres::Client, agent: AgentId, secret: &[u8]) -> Result<TenantId, AuthError> {
    let tenant = store::agents::by_refresh(client, agent, &secret_hash(secret))
        .await?
        .ok_or_else(|| AuthError::refused(ErrorCode::BadCredential, "unknown agent or refresh secret"))?;
    check_agent(client, agent, tenant).await?;
    Ok(tenant)
}

/// Revokes an agent: it is refused on its next connect or refresh. Returns its tenant, or
/// `None` if it was unknown or already revoked.
pub async fn revoke(client: &tokio_postgres::Client, agent: AgentId) -> Result<Option<TenantId>, AuthError> {
    Ok(store::agents::revoke(client, agent).await?)
}
