-- Lifeboat schema, version 10: jobs that read a snapshot are restores onto a phone or
-- exports to a workstation, and every one has a person behind it.
--
-- kind: 'restore' (onto target_udid) or 'export' (no target). A job started at a
-- workstation (`lifeboat-agent restore|export --credential FILE`, protocol StartJob) is
-- created running, already claimed by that agent; one queued through the API is claimed
-- by the agent where its target is attached. requested_by (since version 4) is the
-- help-desk user who created it, in both cases.
ALTER TABLE restore_jobs
    ADD COLUMN kind text NOT NULL DEFAULT 'restore' CHECK (kind IN ('restore', 'export')),
    ALTER COLUMN target_udid DROP NOT NULL,
    ADD CONSTRAINT restore_jobs_target_by_kind CHECK ((kind = 'export') = (target_udid IS NULL));

-- The agent's running jobs, which decide what it may read.
CREATE INDEX restore_jobs_running_by_agent ON restore_jobs (tenant_id, agent_id) WHERE status = 'running';
