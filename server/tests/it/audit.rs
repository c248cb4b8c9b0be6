//! The audit log is a hash chain the database writes and refuses to rewrite, and that
//! `audit::verify` recomputes on its own: any altered or removed row is named.

use lifeboat_server::audit::{self, VerifyError};
use lifeboat_server::keys::MasterKey;
use lifeboat_server::store::audit::{Event, record};
use lifeboat_server::store::tenants;
use lifeboat_test_support::test_db;

#[tokio::test]
async fn the_chain_verifies_refuses_rewrites_and_names_an_altered_row() {
    let Some(tdb) = test_db().await else { return };
    let mut client = tdb.client().await;
    let dir = tempfile::tempdir().unwrap();
    let (master, _) = MasterKey::load_or_create(&dir.path().join("master.key")).unwrap();
    let a = tenants::create(&mut client, &master, "acme").await.unwrap();
    let b = tenants::create(&mut client, &master, "globex").await.unwrap();
    let snapshot = uuid::Uuid::new_v4();
    // Text PostgreSQL quotes in its own ways: quotes, backslashes, newlines, non-ASCII.
    let reasons = ["INC-1", "it's \\ odd\nreally", "ünïcödé ✓"];
    for (i, reason) in reasons.iter().enumerate() {
        let object = format!("chat {i}");
        let e = Event {
            role: Some("helpdesk"),
            udid: Some("00008030-0000000000000001"),
            snapshot: Some(snapshot),
            dataset: Some("messages"),
            object: Some(&object),
            reason: Some(reason),
            ip: Some("127.0.0.1"),
            user_agent: Some("Mozilla/5.0 \"test\""),
            detail: serde_json::json!({"n": i, "q": "a'b"}),
            ..Event::new(a.id, "anna", "messages.view")
        };
        record(&client, &e).await.unwrap();
        record(&client, &Event::new(b.id, "operator (CLI)", "user.create")).await.unwrap();
    }
    let v = audit::verify(&client, a.id).await.unwrap();
    assert_eq!((v.events, v.first_seq, v.last_seq), (3, Some(1), Some(3)));
    assert_eq!(audit::verify(&client, b.id).await.unwrap().events, 3, "each tenant has a chain of its own");

    // The database's canonical text and ours are the same text.
    let db_text: Vec<String> = client
        .query("SELECT audit_event_text(e) FROM audit_events e WHERE tenant_id = $1 ORDER BY seq", &[&a.id.0])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let rows = lifeboat_server::store::audit::chain_page(&client, a.id, 0, 10).await.unwrap();
    let ours: Vec<String> = rows.iter().map(audit::canonical_text).collect();
    assert_eq!(ours, db_text);

    // The application cannot rewrite or remove an event.
    for sql in [
        "UPDATE audit_events SET reason = 'nothing to see' WHERE seq = 2",
        "DELETE FROM audit_events WHERE seq = 2",
        "TRUNCATE audit_events",
    ] {
        let e = client.batch_execute(sql).await.unwrap_err();
        let e = e.as_db_error().unwrap();
        assert!(e.message().starts_with("the audit log is append-only"), "{sql}: {}", e.message());
    }

    // Someone with the database's superuser goes around the triggers: verification names
    // the altered row, and then the removed one.
    client
        .batch_execute(&format!(
            "SET session_replication_role = replica; \
             UPDATE audit_events SET reason = 'nothing to see' WHERE tenant_id = '{}' AND seq = 2; \
             SET session_replication_role = DEFAULT;",
            a.id.0
        ))
        .await
        .unwrap();
    let Err(VerifyError::Broken(broken)) = audit::verify(&client, a.id).await else {
        panic!("an altered row verified")
    };
    assert_eq!(broken.seq, 2);
    assert_eq!(broken.id, rows[1].id);
    assert!(broken.why.contains("altered after it was written"), "{broken}");
    client
        .batch_execute(&format!(
            "SET session_replication_role = replica; \
             DELETE FROM audit_events WHERE tenant_id = '{}' AND seq = 2; \
             SET session_replication_role = DEFAULT;",
            a.id.0
        ))
        .await
        .unwrap();
    let Err(VerifyError::Broken(broken)) = audit::verify(&client, a.id).await else { panic!("a gap verified") };
    assert_eq!(
        broken.to_string(),
        format!("audit event 3 (id {}, {}): follows event 1: events 2 to 2 are missing", rows[2].id, rows[2].at)
    );
    assert_eq!(audit::verify(&client, b.id).await.unwrap().events, 3, "the other tenant's chain is untouched");

    // Expiry removes old events — all but the newest, from which the chain goes on.
    let expired = lifeboat_server::store::audit::expire(&mut client, b.id, 0).await.unwrap();
    assert_eq!(expired, 2);
    record(&client, &Event::new(b.id, "operator (CLI)", "user.revoke")).await.unwrap();
    let v = audit::verify(&client, b.id).await.unwrap();
    assert_eq!((v.events, v.first_seq, v.last_seq), (2, Some(3), Some(4)));
}
