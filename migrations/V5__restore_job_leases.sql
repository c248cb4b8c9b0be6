-- Lifeboat schema, version 5: a restore job claimed by an agent holds a lease, like a
-- backup run. A job whose agent died or gave up stays 'running' with an expired lease:
-- the API shows it as stuck, the next NextRestore for that iPhone claims it again, and a
-- new restore queued for the iPhone ends it (failed, lease-expired) instead of being
-- refused for ever by restore_jobs_one_open_per_target.
ALTER TABLE restore_jobs ADD COLUMN lease_expires_at timestamptz;
UPDATE restore_jobs SET lease_expires_at = coalesce(started_at, now()) + interval '1 hour' WHERE status = 'running';
ALTER TABLE restore_jobs ADD CONSTRAINT restore_jobs_running_has_lease
    CHECK (status <> 'running' OR lease_expires_at IS NOT NULL);
