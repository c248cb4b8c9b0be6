//! Schema migrations: applied once, recorded, safe when several servers start at once.

use std::time::Duration;

use lifeboat_server::platform::db::{self, MIGRATION_TABLE};
use lifeboat_test_support::{cluster, test_db};
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn the_template_database_has_the_whole_schema() {
    let Some(tdb) = test_db().await else { return };
    let client = tdb.client().await;
    let tables: Vec<String> = client
        .query("SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        tables,
        [
            "agents",
            "audit_events",
            "backup_runs",
            "chunks",
            "chunks_p0",
            "chunks_p1",
            "chunks_p2",
            "chunks_p3",
            "chunks_p4",
            "chunks_p5",
            "chunks_p6",
            "chunks_p7",
            "console_sessions",
            "content_grants",
            "device_backup_keybags",
            "device_backup_passwords",
            "devices",
            "enrollment_tokens",
            MIGRATION_TABLE,
            "login_failures",
            "packs",
            "restore_jobs",
            "restore_tests",
            "server_secrets",
            "snapshots",
            "tenant_keys",
            "tenants",
            "users",
        ]
    );
    let versions: Vec<i32> = client
        .query(&format!("SELECT version FROM {MIGRATION_TABLE} ORDER BY version"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known: Vec<i32> = db::known_migrations().iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, known);
    assert_eq!(known.first(), Some(&1));
}

#[tokio::test]
async fn migrating_again_applies_nothing() {
    let Some(tdb) = test_db().await else { return };
    let mut client = tdb.client().await;
    let report = db::migrate(&mut client).await.unwrap();
    assert!(report.applied.is_empty(), "{report:?}");
    assert_eq!(report.current, db::known_migrations().last().map(|(v, _)| *v));
}

#[tokio::test]
async fn concurrent_servers_migrate_an_empty_database_exactly_once() {
    let Some(cluster) = cluster() else { return };
    let admin = db::connect(&cluster.config("postgres"), Duration::from_secs(10)).await.unwrap();
    let name = format!("empty_{}", std::process::id());
    db::ensure_database(&admin, &name).await.unwrap();
    let config = cluster.config(&name);

    let mut tasks = Vec::new();
    for _ in 0..4 {
        let config = config.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = db::connect(&config, Duration::from_secs(10)).await.unwrap();
            db::migrate(&mut client).await.unwrap()
        }));
    }
    let mut applied = Vec::new();
    for t in tasks {
        applied.push(t.await.unwrap().applied);
    }
    let known: Vec<i32> = db::known_migrations().iter().map(|(v, _)| *v).collect();
    assert_eq!(applied.iter().filter(|a| !a.is_empty()).count(), 1, "{applied:?}");
    assert!(applied.contains(&known), "{applied:?}");

    let client = db::connect(&config, Duration::from_secs(10)).await.unwrap();
    let rows: i64 = client.query_one(&format!("SELECT count(*) FROM {MIGRATION_TABLE}"), &[]).await.unwrap().get(0);
    assert_eq!(rows, known.len() as i64);
}

#[tokio::test]
async fn a_database_whose_applied_migration_differs_is_refused() {
    let Some(tdb) = test_db().await else { return };
    let mut client = tdb.client().await;
    client.execute(&format!("UPDATE {MIGRATION_TABLE} SET checksum = '1' WHERE version = 1"), &[]).await.unwrap();
    let err = db::migrate(&mut client).await.unwrap_err().to_string();
    assert!(err.contains("migrating the database schema"), "{err}");
    assert!(err.contains("applied migration V1__initial is different"), "{err}");
    // The lock was released: another migrate call does not hang.
    let again = tokio::time::timeout(Duration::from_secs(10), db::migrate(&mut client)).await;
    assert!(again.is_ok(), "advisory lock still held");
}

/// The SQLSTATE of a statement's failure and the constraint it names.
fn violation(result: Result<u64, tokio_postgres::Error>) -> (SqlState, String) {
    let e = result.expect_err("a row that breaks a rule of the schema was accepted");
    let db = e.as_db_error().unwrap_or_else(|| panic!("not an error of the database: {e}"));
    (db.code().clone(), db.constraint().unwrap_or_default().to_string())
}

#[tokio::test]
async fn the_schema_refuses_rows_that_break_its_rules() {
    let Some(tdb) = test_db().await else { return };
    let client = tdb.client().await;
    let bad_name = client.execute("INSERT INTO tenants (name) VALUES ('Has Spaces')", &[]).await;
    assert_eq!(violation(bad_name), (SqlState::CHECK_VIOLATION, "tenants_name_check".into()));
    client.execute("INSERT INTO tenants (name) VALUES ('acme')", &[]).await.unwrap();
    let dup = client.execute("INSERT INTO tenants (name) VALUES ('acme')", &[]).await;
    assert_eq!(violation(dup), (SqlState::UNIQUE_VIOLATION, "tenants_name_key".into()));
    let bad_state = client
        .execute(
            "INSERT INTO devices (tenant_id, udid, state) SELECT id, '00008030-001A2B3C4D5E6F70', 'sleeping' FROM tenants",
            &[],
        )
        .await;
    assert_eq!(violation(bad_state), (SqlState::CHECK_VIOLATION, "devices_state_check".into()));

    // A running restore job holds a lease (V5). A job needs a snapshot, which needs its
    // device and the run that made it, which needs an agent.
    client
        .batch_execute(
            "INSERT INTO agents (tenant_id, hostname) SELECT id, 'ws' FROM tenants; \
             INSERT INTO devices (tenant_id, udid) SELECT id, '00008030-001A2B3C4D5E6F70' FROM tenants; \
             INSERT INTO backup_runs (tenant_id, udid, agent_id, status, lease_expires_at, finished_at) \
               SELECT tenant_id, '00008030-001A2B3C4D5E6F70', id, 'succeeded', now(), now() FROM agents; \
             INSERT INTO snapshots (tenant_id, udid, run_id, manifest_key, file_count, logical_bytes) \
               SELECT tenant_id, udid, id, 'tenants/t/snapshots/s', 0, 0 FROM backup_runs;",
        )
        .await
        .unwrap();
    let job = |lease: &str| {
        format!(
            "INSERT INTO restore_jobs (tenant_id, snapshot_id, target_udid, status, started_at, lease_expires_at) \
             SELECT tenant_id, id, '00008110-000C1D2E3F405162', 'running', now(), {lease} FROM snapshots"
        )
    };
    let unleased = client.execute(&job("NULL::timestamptz"), &[]).await;
    assert_eq!(violation(unleased), (SqlState::CHECK_VIOLATION, "restore_jobs_running_has_lease".into()));
    assert_eq!(client.execute(&job("now() + interval '1 hour'"), &[]).await.unwrap(), 1, "with a lease it is one");
}
