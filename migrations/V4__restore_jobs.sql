-- Lifeboat schema, version 4: restore jobs. The help desk asks (through the API) for a
-- snapshot to be restored onto an iPhone; the agent of the workstation where that iPhone
-- is attached claims the job, restores, and reports how it ended.
CREATE TABLE restore_jobs (
    tenant_id     uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id            uuid        NOT NULL DEFAULT gen_random_uuid(),
    snapshot_id   uuid        NOT NULL,
    target_udid   text        NOT NULL CHECK (target_udid ~ '^[0-9A-Fa-f-]{24,40}$'),
    status        text        NOT NULL DEFAULT 'queued'
                              CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    agent_id      uuid,       -- the agent that claimed it
    requested_by  uuid,       -- the API user who asked
    reason        text,       -- machine-readable reason code when failed
    message       text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, snapshot_id) REFERENCES snapshots (tenant_id, id) ON DELETE CASCADE
);
-- One open job per target iPhone.
CREATE UNIQUE INDEX restore_jobs_one_open_per_target ON restore_jobs (tenant_id, target_udid)
    WHERE status IN ('queued', 'running');
