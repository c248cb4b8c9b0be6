//! `audit_events`: the append-only record of who looked at or changed an employee's data
//! and its secrets. Rows are only ever inserted; the database chains each tenant's events
//! (`seq`, `prev_hash`, `hash`, migration V12) and refuses updates and deletes, except the
//! expiry of events older than the retention period ([`expire`]).

use lifeboat_shared::ids::TenantId;
use tokio_postgres::{Error, GenericClient};

use super::ts;

/// One audited action: who (`actor*`, `role`), what (`action`), on what (`udid`,
/// `snapshot`, `dataset`, `object` — a reference, never content), why (`reason`) and from
/// where (`ip`, `user_agent`).
#[derive(Debug, Clone)]
pub struct Event<'a> {
    pub tenant: TenantId,
    pub actor_user: Option<uuid::Uuid>,
    pub actor_agent: Option<uuid::Uuid>,
    /// Who, for people reading the log: `user <id>` or a console user's name,
    /// `agent <id>`, `operator (CLI)`.
    pub actor: &'a str,
    /// The actor's role (`viewer`, `helpdesk`, `admin`), when a user acts.
    pub role: Option<&'a str>,
    /// What, e.g. `backup-password.reveal`, `messages.view`.
    pub action: &'a str,
    pub udid: Option<&'a str>,
    pub snapshot: Option<uuid::Uuid>,
    /// The kind of data: `messages`, `contacts`, `calls`, `photos`, `files`.
    pub dataset: Option<&'a str>,
    /// Which item (a conversation id, a file's domain and path), never its content.
    pub object: Option<&'a str>,
    /// The reason the actor gave (a ticket reference).
    pub reason: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub detail: serde_json::Value,
}

impl<'a> Event<'a> {
    /// An event with nothing but who and what; set the rest with struct update syntax.
    pub fn new(tenant: TenantId, actor: &'a str, action: &'a str) -> Self {
        Self {
            tenant,
            actor_user: None,
            actor_agent: None,
            actor,
            role: None,
            action,
            udid: None,
            snapshot: None,
            dataset: None,
            object: None,
            reason: None,
            ip: None,
            user_agent: None,
            detail: serde_json::json!({}),
        }
    }
}

pub async fn record(client: &impl GenericClient, e: &Event<'_>) -> Result<i64, Error> {
    let row = client
        .query_one(
            "INSERT INTO audit_events (tenant_id, actor_user, actor_agent, actor, role, action, udid, snapshot_id, \
             dataset, object, reason, ip, user_agent, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING id",
            &[
                &e.tenant.0,
                &e.actor_user,
                &e.actor_agent,
                &e.actor,
                &e.role,
                &e.action,
                &e.udid,
                &e.snapshot,
                &e.dataset,
                &e.object,
                &e.reason,
                &e.ip,
                &e.user_agent,
                &e.detail,
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// An audit event as the API lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventRow {
    pub id: i64,
    /// Position in the tenant's chain, from 1.
    pub seq: i64,
    pub at: String,
    pub actor: String,
    pub actor_user: Option<uuid::Uuid>,
    pub actor_agent: Option<uuid::Uuid>,
    pub role: Option<String>,
    pub action: String,
    /// The device's UDID (also as `udid`, its name before the console).
    pub device: Option<String>,
    pub udid: Option<String>,
    pub snapshot: Option<uuid::Uuid>,
    pub dataset: Option<String>,
    pub object: Option<String>,
    pub reason: Option<String>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub detail: serde_json::Value,
    /// This event's chain hash, hex.
    pub hash: String,
}

/// Which events [`list`] gives.
#[derive(Debug, Clone, Default)]
pub struct Filter<'a> {
    /// Older than this event id (the last `id` of the previous page).
    pub before: Option<i64>,
    pub udid: Option<&'a str>,
    pub actor_user: Option<uuid::Uuid>,
    pub action: Option<&'a str>,
}

/// The tenant's newest events first, at most `limit`.
pub async fn list(
    client: &impl GenericClient,
    tenant: TenantId,
    limit: i64,
    filter: &Filter<'_>,
) -> Result<Vec<EventRow>, Error> {
    let rows = client
        .query(
            concat!(
                "SELECT id, seq, ",
                ts!("at"),
                ", actor, actor_user, actor_agent, role, action, udid, snapshot_id, dataset, object, reason, ip, ",
                "user_agent, detail, encode(hash, 'hex') FROM audit_events ",
                "WHERE tenant_id = $1 AND ($3::bigint IS NULL OR id < $3) AND ($4::text IS NULL OR udid = $4) ",
                "AND ($5::uuid IS NULL OR actor_user = $5) AND ($6::text IS NULL OR action = $6) ",
                "ORDER BY id DESC LIMIT $2"
            ),
            &[&tenant.0, &limit, &filter.before, &filter.udid, &filter.actor_user, &filter.action],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| EventRow {
            id: r.get(0),
            seq: r.get(1),
            at: r.get(2),
            actor: r.get(3),
            actor_user: r.get(4),
            actor_agent: r.get(5),
            role: r.get(6),
            action: r.get(7),
            device: r.get(8),
            udid: r.get(8),
            snapshot: r.get(9),
            dataset: r.get(10),
            object: r.get(11),
            reason: r.get(12),
            ip: r.get(13),
            user_agent: r.get(14),
            detail: r.get(15),
            hash: r.get(16),
        })
        .collect())
}

/// An event's fields as the chain hashes them, read as the database holds them.
#[derive(Debug, Clone)]
pub struct ChainRow {
    pub id: i64,
    pub seq: i64,
    pub tenant: uuid::Uuid,
    /// Microseconds since the Unix epoch.
    pub at_micros: i64,
    pub at: String,
    /// Nullable text fields in the chain's order: actor, actor_user, actor_agent, role,
    /// action, udid, snapshot, dataset, object, reason, ip, user_agent, detail.
    pub fields: [Option<String>; 13],
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// A tenant's events in chain order, `page` at a time after `after_seq`.
pub async fn chain_page(
    client: &impl GenericClient,
    tenant: TenantId,
    after_seq: i64,
    page: i64,
) -> Result<Vec<ChainRow>, Error> {
    let rows = client
        .query(
            concat!(
                "SELECT id, seq, tenant_id, (extract(epoch FROM at) * 1000000)::bigint, ",
                ts!("at"),
                ", actor, actor_user::text, actor_agent::text, role, action, udid, snapshot_id::text, dataset, ",
                "object, reason, ip, user_agent, detail::text, prev_hash, hash FROM audit_events ",
                "WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
            ),
            &[&tenant.0, &after_seq, &page],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ChainRow {
            id: r.get(0),
            seq: r.get(1),
            tenant: r.get(2),
            at_micros: r.get(3),
            at: r.get(4),
            fields: std::array::from_fn(|i| r.get(5 + i)),
            prev_hash: r.get(18),
            hash: r.get(19),
        })
        .collect())
}

/// Deletes the tenant's events older than `days` days (the retention period), the only
/// deletion the log allows. The newest event always stays, so the chain goes on from it.
/// The number deleted.
pub async fn expire(client: &mut tokio_postgres::Client, tenant: TenantId, days: i32) -> Result<u64, Error> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL lifeboat.audit_expiry = 'on'").await?;
    let n = tx
        .execute(
            "DELETE FROM audit_events WHERE tenant_id = $1 AND at < now() - make_interval(days => $2) \
             AND seq < (SELECT max(seq) FROM audit_events WHERE tenant_id = $1)",
            &[&tenant.0, &days],
        )
        .await?;
    tx.commit().await?;
    Ok(n)
}
