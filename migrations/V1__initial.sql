-- Lifeboat schema, version 1: tenants, agents, devices, backup runs and snapshots.
-- Applied by lifeboat-server at start (refinery, under an advisory lock); never edit a
-- released migration, add the next numbered file instead.
--
-- Every table that holds tenant data has tenant_id as the first column of its primary key
-- and of every index, so that each query is tenant-scoped and later hash partitioning by
-- tenant needs no key change.

CREATE TABLE tenants (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text        NOT NULL UNIQUE
                            CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A workstation agent, enrolled into exactly one tenant.
CREATE TABLE agents (
    tenant_id     uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id            uuid        NOT NULL DEFAULT gen_random_uuid(),
    hostname      text        NOT NULL,
    version       text,
    enrolled_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz,
    revoked_at    timestamptz,
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX agents_id ON agents (id);

-- An iPhone, identified by its UDID within a tenant.
CREATE TABLE devices (
    tenant_id         uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    udid              text        NOT NULL CHECK (udid ~ '^[0-9A-Fa-f-]{24,40}$'),
    name              text,
    product_type      text,       -- e.g. iPhone15,2
    ios_version       text,
    serial_number     text,
    state             text        NOT NULL DEFAULT 'idle'
                                  CHECK (state IN ('idle', 'backing-up', 'needs-trust', 'needs-passcode', 'failing')),
    state_changed_at  timestamptz NOT NULL DEFAULT now(),
    last_agent_id     uuid,
    first_seen_at     timestamptz NOT NULL DEFAULT now(),
    last_seen_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, udid),
    FOREIGN KEY (tenant_id, last_agent_id) REFERENCES agents (tenant_id, id)
);
CREATE INDEX devices_state ON devices (tenant_id, state);

-- One attempt to back up one device. While 'running', the agent holds a lease on the
-- device until lease_expires_at; at most one running run per device.
CREATE TABLE backup_runs (
    tenant_id         uuid        NOT NULL,
    id                uuid        NOT NULL DEFAULT gen_random_uuid(),
    udid              text        NOT NULL,
    agent_id          uuid        NOT NULL,
    status            text        NOT NULL DEFAULT 'running'
                                  CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    reason            text,       -- machine-readable reason code when not succeeded, e.g. device-disconnected
    message           text,       -- what a person should know or do
    started_at        timestamptz NOT NULL DEFAULT now(),
    lease_expires_at  timestamptz NOT NULL,
    finished_at       timestamptz,
    files_total       bigint      NOT NULL DEFAULT 0 CHECK (files_total >= 0),
    bytes_total       bigint      NOT NULL DEFAULT 0 CHECK (bytes_total >= 0),
    bytes_sent        bigint      NOT NULL DEFAULT 0 CHECK (bytes_sent >= 0),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, udid) REFERENCES devices (tenant_id, udid) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, agent_id) REFERENCES agents (tenant_id, id),
    CHECK ((status = 'running') = (finished_at IS NULL)),
    CHECK (status IN ('running', 'succeeded') OR reason IS NOT NULL)
);
CREATE UNIQUE INDEX backup_runs_one_running ON backup_runs (tenant_id, udid) WHERE status = 'running';
CREATE INDEX backup_runs_by_device ON backup_runs (tenant_id, udid, started_at DESC);
CREATE INDEX backup_runs_failed ON backup_runs (tenant_id, finished_at DESC) WHERE status = 'failed';

-- A committed, immutable snapshot of one device's backup directory. A row exists only
-- once every pack and the manifest object are durable in storage (see docs/format.md),
-- so a visible snapshot is never partial.
CREATE TABLE snapshots (
    tenant_id      uuid        NOT NULL,
    id             uuid        NOT NULL DEFAULT gen_random_uuid(),
    udid           text        NOT NULL,
    run_id         uuid        NOT NULL,
    manifest_key   text        NOT NULL,     -- object path of the encrypted manifest
    ios_version    text,
    product_type   text,
    file_count     bigint      NOT NULL CHECK (file_count >= 0),
    logical_bytes  bigint      NOT NULL CHECK (logical_bytes >= 0),
    committed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, run_id),
    FOREIGN KEY (tenant_id, udid) REFERENCES devices (tenant_id, udid) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, run_id) REFERENCES backup_runs (tenant_id, id)
);
CREATE INDEX snapshots_by_device ON snapshots (tenant_id, udid, committed_at DESC);
