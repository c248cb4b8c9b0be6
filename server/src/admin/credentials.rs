//! The operator's commands on credentials: enrolment tokens, API users and agents —
//! listed (never their secrets, which are not stored) and revoked, each change audited.

use crate::store::tenants;

/// `--tenant T` as a tenant id, or `None` for every tenant.
pub async fn tenant_filter(
    client: &tokio_postgres::Client,
    tenant: Option<&str>,
) -> anyhow::Result<Option<lifeboat_shared::ids::TenantId>> {
    Ok(match tenant {
        Some(name) => Some(tenants::by_name(client, name).await?.id),
        None => None,
    })
}

/// The rows `list` gives for each tenant `--tenant T` names (that one, or every one),
/// each with its tenant's name.
async fn per_tenant<T>(
    client: &tokio_postgres::Client,
    tenant: Option<&str>,
    list: impl AsyncFn(lifeboat_shared::ids::TenantId) -> Result<Vec<T>, tokio_postgres::Error>,
) -> anyhow::Result<Vec<(String, T)>> {
    let tenants = match tenant {
        Some(name) => vec![tenants::by_name(client, name).await?],
        None => tenants::list(client).await?,
    };
    let mut rows = Vec::new();
    for t in tenants {
        rows.extend(list(t.id).await?.into_iter().map(|r| (t.name.clone(), r)));
    }
    Ok(rows)
}

/// Prints `rows` as one JSON array, each object with its tenant's name added.
fn print_json_with_tenant<T: serde::Serialize>(rows: &[(String, T)]) {
    let with_tenant = |(tenant, row): &(String, T)| {
        let mut v = serde_json::to_value(row).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("tenant".into(), tenant.as_str().into());
        }
        v
    };
    println!("{}", serde_json::Value::Array(rows.iter().map(with_tenant).collect()));
}

pub async fn token_list(client: &tokio_postgres::Client, tenant: String, json: bool) -> anyhow::Result<()> {
    let t = tenants::by_name(client, &tenant).await?;
    let list = crate::store::agents::list_enroll_tokens(client, t.id).await?;
    if json {
        println!("{}", serde_json::json!(list));
    } else {
        println!("{:<36}  {:<7}  {:>13}  EXPIRES", "ID", "STATE", "USED");
        for r in list {
            println!("{}  {:<7}  {:>13}  {}", r.id, r.state, format!("{}/{}", r.use_count, r.max_uses), r.expires_at);
        }
    }
    Ok(())
}

pub async fn token_revoke(
    client: &tokio_postgres::Client,
    id: uuid::Uuid,
    tenant: Option<String>,
) -> anyhow::Result<()> {
    let scope = tenant_filter(client, tenant.as_deref()).await?;
    let Some(t) = crate::store::agents::revoke_enroll_token(client, scope, id).await? else {
        anyhow::bail!("no unrevoked enrolment token {id}{}", in_tenant(tenant.as_deref()));
    };
    super::audit_operator(client, t, "enrollment-token.revoke", serde_json::json!({ "token": id })).await?;
    println!("revoked enrolment token {id}: it enrols no more agents");
    Ok(())
}

fn in_tenant(tenant: Option<&str>) -> String {
    tenant.map(|t| format!(" in tenant {t}")).unwrap_or_default()
}

pub async fn user_list(client: &tokio_postgres::Client, tenant: Option<String>, json: bool) -> anyhow::Result<()> {
    let rows = per_tenant(client, tenant.as_deref(), async |t| crate::store::users::list(client, t).await).await?;
    if json {
        print_json_with_tenant(&rows);
    } else {
        println!("{:<36}  {:<16}  {:<8}  {:<24}  REVOKED", "ID", "TENANT", "ROLE", "NAME");
        for (t, u) in rows {
            println!("{}  {t:<16}  {:<8}  {:<24}  {}", u.id, u.role, u.name, u.revoked_at.as_deref().unwrap_or("-"));
        }
    }
    Ok(())
}

pub async fn user_revoke(
    client: &tokio_postgres::Client,
    id: uuid::Uuid,
    tenant: Option<String>,
) -> anyhow::Result<()> {
    let scope = tenant_filter(client, tenant.as_deref()).await?;
    let Some(t) = crate::store::users::revoke(client, scope, id).await? else {
        anyhow::bail!("no unrevoked API user {id}{}", in_tenant(tenant.as_deref()));
    };
    super::audit_operator(client, t, "user.revoke", serde_json::json!({ "user": id })).await?;
    println!("revoked API user {id}: its credential is refused from now on");
    Ok(())
}

pub async fn agent_list(client: &tokio_postgres::Client, tenant: Option<String>, json: bool) -> anyhow::Result<()> {
    let rows = per_tenant(client, tenant.as_deref(), async |t| crate::store::agents::list(client, t).await).await?;
    if json {
        print_json_with_tenant(&rows);
    } else {
        println!("{:<36}  {:<16}  {:<24}  {:<10}  {:<24}  REVOKED", "ID", "TENANT", "HOSTNAME", "VERSION", "LAST SEEN");
        for (t, a) in rows {
            println!(
                "{}  {t:<16}  {:<24}  {:<10}  {:<24}  {}",
                a.id,
                a.hostname,
                a.version.as_deref().unwrap_or("-"),
                a.last_seen_at.as_deref().unwrap_or("never"),
                if a.revoked { "yes" } else { "no" }
            );
        }
    }
    Ok(())
}

pub async fn agent_revoke(client: &tokio_postgres::Client, id: lifeboat_shared::ids::AgentId) -> anyhow::Result<()> {
    let Some(t) = crate::auth::revoke(client, id).await? else {
        anyhow::bail!("no active agent {id}");
    };
    super::audit_operator(client, t, "agent.revoke", serde_json::json!({ "agent": id.0 })).await?;
    println!("revoked agent {id}");
    Ok(())
}
