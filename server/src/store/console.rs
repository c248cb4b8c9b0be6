//! The console's rows: signed-in sessions (`console_sessions`, only the SHA-256 of the
//! cookie's secret), failed sign-ins (`login_failures`, shared by every replica) and a
//! help-desk user's reason-bound access to one device's content (`content_grants`).

use lifeboat_shared::ids::TenantId;
use tokio_postgres::{Client, Error};

use super::ts;

/// A live session and who it belongs to.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub tenant: TenantId,
    pub user: uuid::Uuid,
    pub name: String,
    pub role: String,
    pub csrf: String,
}

#[derive(Debug)]
pub struct NewSession<'a> {
    pub token_hash: &'a [u8],
    pub tenant: TenantId,
    pub user: uuid::Uuid,
    pub csrf: &'a str,
    pub absolute_secs: i64,
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
}

pub async fn create_session(client: &Client, s: &NewSession<'_>) -> Result<(), Error> {
    client
        .execute(
            "INSERT INTO console_sessions (token_hash, tenant_id, user_id, csrf_token, expires_at, ip, user_agent) \
             VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5), $6, $7)",
            &[&s.token_hash, &s.tenant.0, &s.user, &s.csrf, &(s.absolute_secs as f64), &s.ip, &s.user_agent],
        )
        .await?;
    Ok(())
}

/// The session of a cookie, if it is live: not past its absolute expiry, used within the
/// last `idle_secs`, and its user not revoked. Touches `last_seen_at`.
pub async fn session(client: &Client, token_hash: &[u8], idle_secs: i64) -> Result<Option<SessionRow>, Error> {
    let row = client
        .query_opt(
            "UPDATE console_sessions s SET last_seen_at = now() FROM users u \
             WHERE s.token_hash = $1 AND s.expires_at > now() \
               AND s.last_seen_at > now() - make_interval(secs => $2) \
               AND u.tenant_id = s.tenant_id AND u.id = s.user_id AND u.revoked_at IS NULL \
             RETURNING s.tenant_id, s.user_id, u.name, u.role, s.csrf_token",
            &[&token_hash, &(idle_secs as f64)],
        )
        .await?;
    Ok(row.map(|r| SessionRow {
        tenant: TenantId(r.get(0)),
        user: r.get(1),
        name: r.get(2),
        role: r.get(3),
        csrf: r.get(4),
    }))
}

pub async fn end_session(client: &Client, token_hash: &[u8]) -> Result<(), Error> {
    client.execute("DELETE FROM console_sessions WHERE token_hash = $1", &[&token_hash]).await?;
    Ok(())
}

/// Removes sessions past their absolute expiry or idle for longer than `idle_secs`, and
/// failed sign-ins older than a day.
pub async fn sweep(client: &Client, idle_secs: i64) -> Result<u64, Error> {
    let n = client
        .execute(
            "DELETE FROM console_sessions WHERE expires_at <= now() OR last_seen_at <= now() - make_interval(secs => $1)",
            &[&(idle_secs as f64)],
        )
        .await?;
    client.execute("DELETE FROM login_failures WHERE at < now() - interval '1 day'", &[]).await?;
    Ok(n)
}

/// Failed sign-ins within the last `window_secs`: for this name, and from this address.
pub async fn recent_failures(
    client: &Client,
    name: &str,
    ip: Option<&str>,
    window_secs: i64,
) -> Result<(i64, i64), Error> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE lower(name) = lower($1)), count(*) FILTER (WHERE ip = $2) \
             FROM login_failures WHERE at > now() - make_interval(secs => $3) \
               AND (lower(name) = lower($1) OR ip = $2)",
            &[&name, &ip, &(window_secs as f64)],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Records a sign-in attempt as failed until [`forget_attempt`] says it succeeded; its id.
pub async fn record_failure(client: &Client, name: &str, ip: Option<&str>) -> Result<i64, Error> {
    Ok(client
        .query_one("INSERT INTO login_failures (name, ip) VALUES ($1, $2) RETURNING id", &[&name, &ip])
        .await?
        .get(0))
}

/// A recorded attempt that turned out right.
pub async fn forget_attempt(client: &Client, id: i64) -> Result<(), Error> {
    client.execute("DELETE FROM login_failures WHERE id = $1", &[&id]).await?;
    Ok(())
}

/// A user's live access to a device's content.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Grant {
    pub id: uuid::Uuid,
    pub udid: String,
    pub reason: String,
    pub expires_at: String,
}

/// Gives `user` access to the device's content for `minutes`, recording `event` (which
/// names the grant `id`) in the same transaction.
#[allow(clippy::too_many_arguments)]
pub async fn grant(
    client: &mut Client,
    id: uuid::Uuid,
    tenant: TenantId,
    user: uuid::Uuid,
    udid: &str,
    reason: &str,
    minutes: i32,
    event: &super::audit::Event<'_>,
) -> Result<Grant, Error> {
    let tx = client.transaction().await?;
    let r = tx
        .query_one(
            concat!(
                "INSERT INTO content_grants (id, tenant_id, user_id, udid, reason, expires_at) ",
                "VALUES ($1, $2, $3, $4, $5, now() + make_interval(mins => $6)) RETURNING id, udid, reason, ",
                ts!("expires_at")
            ),
            &[&id, &tenant.0, &user, &udid, &reason, &minutes],
        )
        .await?;
    super::audit::record(&tx, event).await?;
    tx.commit().await?;
    Ok(Grant { id: r.get(0), udid: r.get(1), reason: r.get(2), expires_at: r.get(3) })
}

/// The user's newest live grant for the device.
pub async fn live_grant(
    client: &Client,
    tenant: TenantId,
    user: uuid::Uuid,
    udid: &str,
) -> Result<Option<Grant>, Error> {
    let r = client
        .query_opt(
            concat!(
                "SELECT id, udid, reason, ",
                ts!("expires_at"),
                " FROM content_grants WHERE tenant_id = $1 AND user_id = $2 AND udid = $3 AND expires_at > now() ",
                "ORDER BY expires_at DESC LIMIT 1"
            ),
            &[&tenant.0, &user, &udid],
        )
        .await?;
    Ok(r.map(|r| Grant { id: r.get(0), udid: r.get(1), reason: r.get(2), expires_at: r.get(3) }))
}
