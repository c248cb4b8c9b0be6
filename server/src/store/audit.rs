//! `audit_events`: the append-only record of who looked at or changed an employee's data
//! and its secrets. Rows are only ever inserted.

use lifeboat_shared::ids::TenantId;
use tokio_postgres::{Error, GenericClient};

use super::ts;

/// One audited action.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    pub tenant: TenantId,
    pub actor_user: Option<uuid::Uuid>,
    pub actor_agent: Option<uuid::Uuid>,
    /// Who, for people reading the log: `user <id>`, `agent <id>`, `operator (CLI)`.
    pub actor: &'a str,
    /// What, e.g. `backup-password.reveal`.
    pub action: &'a str,
    pub udid: Option<&'a str>,
    pub detail: serde_json::Value,
}

pub async fn record(client: &impl GenericClient, e: &Event<'_>) -> Result<i64, Error> {
    let row = client
        .query_one(
            "INSERT INTO audit_events (tenant_id, actor_user, actor_agent, actor, action, udid, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            &[&e.tenant.0, &e.actor_user, &e.actor_agent, &e.actor, &e.action, &e.udid, &e.detail],
        )
        .await?;
    Ok(row.get(0))
}

/// An audit event as the API lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventRow {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub actor_user: Option<uuid::Uuid>,
    pub actor_agent: Option<uuid::Uuid>,
    pub action: String,
    pub udid: Option<String>,
    pub detail: serde_json::Value,
}

/// The tenant's newest events first, at most `limit`, older than event `before` if given.
pub async fn list(
    client: &impl GenericClient,
    tenant: TenantId,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<EventRow>, Error> {
    let rows = client
        .query(
            concat!(
                "SELECT id, ",
                ts!("at"),
                ", actor, actor_user, actor_agent, action, udid, detail FROM audit_events ",
                "WHERE tenant_id = $1 AND ($3::bigint IS NULL OR id < $3) ORDER BY id DESC LIMIT $2"
            ),
            &[&tenant.0, &limit, &before],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| EventRow {
            id: r.get(0),
            at: r.get(1),
            actor: r.get(2),
            actor_user: r.get(3),
            actor_agent: r.get(4),
            action: r.get(5),
            udid: r.get(6),
            detail: r.get(7),
        })
        .collect())
}
