//! Job locks: PostgreSQL session advisory locks that elect one replica to run a job.
//!
//! The lock lives on a connection taken out of the pool for that purpose alone and closed
//! when the [`JobLock`] is dropped — after the job returns, fails, panics or is cancelled —
//! so PostgreSQL releases it with the session. A lock taken on a pooled connection would
//! go back to the pool still held if the job never reached its unlock.

/// A held job lock. Dropping it closes its connection, which releases the lock.
#[derive(Debug)]
pub struct JobLock {
    _client: deadpool_postgres::ClientWrapper,
}

/// Takes the lock `key` if no other session holds it.
pub async fn try_lock(pool: &deadpool_postgres::Pool, key: i64) -> Result<Option<JobLock>, String> {
    // A pooled connection whose server session ended (a restarted PostgreSQL, a killed
    // backend) may be handed out before the pool notices: then the next one is tried.
    let mut last = String::new();
    for _ in 0..3 {
        let object = pool.get().await.map_err(|e| e.to_string())?;
        // Out of the pool for good: this connection is closed with the lock, never reused.
        let client = deadpool_postgres::Object::take(object);
        match client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await {
            Ok(row) => return Ok(row.get::<_, bool>(0).then_some(JobLock { _client: client })),
            Err(e) if client.is_closed() => last = e.to_string(),
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(last)
}

/// Whether any session holds the lock `key` (tests and diagnostics).
pub async fn held(client: &tokio_postgres::Client, key: i64) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND ((classid::bigint << 32) | objid::bigint) = $1",
            &[&key],
        )
        .await?;
    Ok(row.get(0))
}
