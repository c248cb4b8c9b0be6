//! `agents`, `enrollment_tokens` and `server_secrets`: enrolled workstations, the tokens
//! that enrol them, and the wrapped access-token signing key.

use lifeboat_shared::ids::{AgentId, TenantId};
use tokio_postgres::{Client, Error};

use super::ts;

/// A wrapped server secret: (master key id, wrapped bytes).
pub async fn secret(client: &Client, name: &str) -> Result<Option<(String, Vec<u8>)>, Error> {
    Ok(client
        .query_opt("SELECT master_key_id, wrapped FROM server_secrets WHERE name = $1", &[&name])
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// Stores a wrapped server secret unless another replica stored one first.
pub async fn put_secret_once(client: &Client, name: &str, master_key_id: &str, wrapped: &[u8]) -> Result<(), Error> {
    client
        .execute(
            "INSERT INTO server_secrets (name, master_key_id, wrapped) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
            &[&name, &master_key_id, &wrapped],
        )
        .await?;
    Ok(())
}

pub async fn create_enroll_token(
    client: &Client,
    tenant: TenantId,
    secret_hash: &[u8],
    ttl_seconds: f64,
    max_uses: i32,
) -> Result<uuid::Uuid, Error> {
    Ok(client
        .query_one(
            "INSERT INTO enrollment_tokens (tenant_id, secret_hash, expires_at, max_uses) \
             VALUES ($1, $2, now() + make_interval(secs => $3), $4) RETURNING id",
            &[&tenant.0, &secret_hash, &ttl_seconds, &max_uses],
        )
        .await?
        .get(0))
}

/// An enrolment token as `token list` shows it (never its secret, which is not stored).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenRow {
    pub id: uuid::Uuid,
    pub created_at: String,
    pub expires_at: String,
    pub max_uses: i32,
    pub use_count: i32,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
    /// `active`, `spent`, `expired` or `revoked`.
    pub state: &'static str,
}

/// The tenant's enrolment tokens, newest first.
pub async fn list_enroll_tokens(client: &Client, tenant: TenantId) -> Result<Vec<TokenRow>, Error> {
    let rows = client
        .query(
            concat!(
                "SELECT id, ",
                ts!("created_at"),
                ", ",
                ts!("expires_at"),
                ", max_uses, use_count, ",
                ts!("used_at"),
                ", ",
                ts!("revoked_at"),
                ", revoked_at IS NOT NULL, use_count >= max_uses, expires_at < now() \
                 FROM enrollment_tokens WHERE tenant_id = $1 ORDER BY created_at DESC, id"
            ),
            &[&tenant.0],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TokenRow {
            id: r.get(0),
            created_at: r.get(1),
            expires_at: r.get(2),
            max_uses: r.get(3),
            use_count: r.get(4),
            last_used_at: r.get(5),
            revoked_at: r.get(6),
            state: match (r.get(7), r.get(8), r.get(9)) {
                (true, _, _) => "revoked",
                (_, true, _) => "spent",
                (_, _, true) => "expired",
                _ => "active",
            },
        })
        .collect())
}

/// Revokes an enrolment token (of `tenant`, if given): it enrols no more agents (those
/// it enrolled stay). Its tenant, or `None` if there is no such token or it was already
/// revoked.
pub async fn revoke_enroll_token(
    client: &Client,
    tenant: Option<TenantId>,
    token: uuid::Uuid,
) -> Result<Option<TenantId>, Error> {
    super::revoke_row(client, super::Credentials::EnrollmentTokens, tenant, token).await
}

/// What redeeming an enrolment token found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enrolment {
    Enrolled {
        agent: AgentId,
        tenant: TenantId,
    },
    UnknownToken,
    /// Every use is spent: `max_uses` agents enrolled with it.
    AlreadyUsed {
        max_uses: i32,
    },
    Expired,
    Revoked,
}

/// Redeems a token: creates the agent and counts the use, in one transaction (the row
/// lock makes concurrent enrolments with one token queue, so none overspends it).
pub async fn enroll(
    client: &mut Client,
    token_hash: &[u8],
    hostname: &str,
    version: &str,
    refresh_hash: &[u8],
) -> Result<Enrolment, Error> {
    let tx = client.transaction().await?;
    let Some(row) = tx
        .query_opt(
            "SELECT tenant_id, id, expires_at < now(), use_count >= max_uses, max_uses, revoked_at IS NOT NULL \
             FROM enrollment_tokens WHERE secret_hash = $1 FOR UPDATE",
            &[&token_hash],
        )
        .await?
    else {
        return Ok(Enrolment::UnknownToken);
    };
    let tenant = TenantId(row.get(0));
    let token_id: uuid::Uuid = row.get(1);
    if row.get::<_, bool>(5) {
        return Ok(Enrolment::Revoked);
    }
    if row.get::<_, bool>(3) {
        return Ok(Enrolment::AlreadyUsed { max_uses: row.get(4) });
    }
    if row.get::<_, bool>(2) {
        return Ok(Enrolment::Expired);
    }
    let agent: uuid::Uuid = tx
        .query_one(
            "INSERT INTO agents (tenant_id, hostname, version, refresh_hash, last_seen_at, enrollment_token_id) \
             VALUES ($1, $2, $3, $4, now(), $5) RETURNING id",
            &[&tenant.0, &hostname, &version, &refresh_hash, &token_id],
        )
        .await?
        .get(0);
    tx.execute(
        "UPDATE enrollment_tokens SET used_at = now(), used_by = $3, use_count = use_count + 1 \
         WHERE tenant_id = $1 AND id = $2",
        &[&tenant.0, &token_id, &agent],
    )
    .await?;
    tx.commit().await?;
    Ok(Enrolment::Enrolled { agent: AgentId(agent), tenant })
}

/// Notes the agent was seen; `Some(revoked)` if it exists in the tenant.
pub async fn seen(client: &Client, tenant: TenantId, agent: AgentId) -> Result<Option<bool>, Error> {
    Ok(client
        .query_opt(
            "UPDATE agents SET last_seen_at = now() WHERE tenant_id = $1 AND id = $2 RETURNING revoked_at IS NOT NULL",
            &[&tenant.0, &agent.0],
        )
        .await?
        .map(|r| r.get(0)))
}

/// The tenant of the agent whose refresh secret hashes to `refresh_hash`.
pub async fn by_refresh(client: &Client, agent: AgentId, refresh_hash: &[u8]) -> Result<Option<TenantId>, Error> {
    Ok(client
        .query_opt("SELECT tenant_id FROM agents WHERE id = $1 AND refresh_hash = $2", &[&agent.0, &refresh_hash])
        .await?
        .map(|r| TenantId(r.get(0))))
}

/// Revokes an agent; its tenant, or `None` if it was unknown or already revoked.
pub async fn revoke(client: &Client, agent: AgentId) -> Result<Option<TenantId>, Error> {
    super::revoke_row(client, super::Credentials::Agents, None, agent.0).await
}

/// An agent as the API lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentRow {
    pub id: uuid::Uuid,
    pub hostname: String,
    pub version: Option<String>,
    pub enrolled_at: String,
    pub last_seen_at: Option<String>,
    pub revoked: bool,
    /// The enrolment token it enrolled with (none for agents enrolled before schema 9).
    pub enrollment_token: Option<uuid::Uuid>,
}

pub async fn list(client: &Client, tenant: TenantId) -> Result<Vec<AgentRow>, Error> {
    let rows = client
        .query(
            concat!(
                "SELECT id, hostname, version, ",
                ts!("enrolled_at"),
                ", ",
                ts!("last_seen_at"),
                ", revoked_at IS NOT NULL, enrollment_token_id FROM agents WHERE tenant_id = $1 ORDER BY hostname, id"
            ),
            &[&tenant.0],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| AgentRow {
            id: r.get(0),
            hostname: r.get(1),
            version: r.get(2),
            enrolled_at: r.get(3),
            last_seen_at: r.get(4),
            revoked: r.get(5),
            enrollment_token: r.get(6),
        })
        .collect())
}
