//! Tenants and their wrapped keys, on a real database.

use lifeboat_server::keys::MasterKey;
use lifeboat_server::store::tenants::{self, TenantError};
use lifeboat_test_support::test_db;

#[tokio::test]
async fn a_tenant_gets_its_own_keys_which_only_the_master_key_opens() {
    let Some(tdb) = test_db().await else { return };
    let mut client = tdb.client().await;
    let dir = tempfile::tempdir().unwrap();
    let (master, _) = MasterKey::load_or_create(&dir.path().join("master.key")).unwrap();

    let a = tenants::create(&mut client, &master, "acme").await.unwrap();
    let b = tenants::create(&mut client, &master, "globex").await.unwrap();
    let ka = tenants::keys(&client, &master, a.id).await.unwrap();
    let kb = tenants::keys(&client, &master, b.id).await.unwrap();
    assert_ne!(ka.id.chunk_id(b"same data"), kb.id.chunk_id(b"same data"), "no cross-tenant dedup");

    // Stored wrapped, never in the clear.
    let row =
        client.query_one("SELECT id_key_wrapped FROM tenant_keys WHERE tenant_id = $1", &[&a.id.0]).await.unwrap();
    let wrapped: Vec<u8> = row.get(0);
    assert!(!wrapped.windows(32).any(|w| w == ka.id.expose()));

    let (other_master, _) = MasterKey::load_or_create(&dir.path().join("other.key")).unwrap();
    let err = tenants::keys(&client, &other_master, a.id).await.unwrap_err().to_string();
    assert!(err.contains("configure the master key this database was created with"), "{err}");

    let names: Vec<String> = tenants::list(&client).await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["acme", "globex"]);
}

#[tokio::test]
async fn duplicate_and_malformed_names_are_refused_and_store_nothing() {
    let Some(tdb) = test_db().await else { return };
    let mut client = tdb.client().await;
    let dir = tempfile::tempdir().unwrap();
    let (master, _) = MasterKey::load_or_create(&dir.path().join("master.key")).unwrap();
    tenants::create(&mut client, &master, "acme").await.unwrap();
    assert!(matches!(tenants::create(&mut client, &master, "acme").await, Err(TenantError::Exists(_))));
    assert!(matches!(tenants::create(&mut client, &master, "Bad Name").await, Err(TenantError::BadName(_))));
    let n: i64 = client.query_one("SELECT count(*) FROM tenant_keys", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    assert!(matches!(tenants::by_name(&client, "nope").await, Err(TenantError::NotFound(_))));
}
