-- Lifeboat schema, version 2: tenant keys, enrolment tokens, API users, server secrets,
-- packs and the chunk index.

-- Each tenant's id key and data key, wrapped (AES-256-GCM) by the server's master key.
-- master_key_id names the master key that wrapped them (first 8 bytes of its BLAKE3, hex).
CREATE TABLE tenant_keys (
    tenant_id         uuid        PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    master_key_id     text        NOT NULL,
    id_key_wrapped    bytea       NOT NULL,
    data_key_wrapped  bytea       NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);

-- Secrets shared by all server replicas (the access-token signing key), wrapped likewise.
CREATE TABLE server_secrets (
    name           text        PRIMARY KEY,
    master_key_id  text        NOT NULL,
    wrapped        bytea       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- One-time, expiring agent enrolment tokens. Only a hash of the secret is kept.
CREATE TABLE enrollment_tokens (
    tenant_id    uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id           uuid        NOT NULL DEFAULT gen_random_uuid(),
    secret_hash  bytea       NOT NULL CHECK (length(secret_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    used_at      timestamptz,
    used_by      uuid,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (secret_hash)
);

-- The agent's long-lived refresh credential (hash only).
ALTER TABLE agents ADD COLUMN refresh_hash bytea CHECK (length(refresh_hash) = 32);
CREATE UNIQUE INDEX agents_refresh_hash ON agents (refresh_hash);

-- People and scripts using the HTTP API.
CREATE TABLE users (
    tenant_id        uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id               uuid        NOT NULL DEFAULT gen_random_uuid(),
    name             text        NOT NULL,
    role             text        NOT NULL CHECK (role IN ('admin', 'helpdesk', 'viewer')),
    credential_hash  bytea       NOT NULL CHECK (length(credential_hash) = 32),
    created_at       timestamptz NOT NULL DEFAULT now(),
    revoked_at       timestamptz,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (credential_hash)
);

-- A pack object, durable in storage before its row exists.
CREATE TABLE packs (
    tenant_id   uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          bytea       NOT NULL CHECK (length(id) = 32),
    size_bytes  bigint      NOT NULL CHECK (size_bytes > 0),
    blob_count  integer     NOT NULL CHECK (blob_count >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

-- The chunk index: which pack holds each chunk. Grows with the fleet (~10^9 rows), so it
-- is hash-partitioned by tenant and keyed by compact 32-byte ids. A row is written only
-- after its pack is durable and the chunk was decrypted and re-hashed by the server.
CREATE TABLE chunks (
    tenant_id     uuid    NOT NULL,
    id            bytea   NOT NULL CHECK (length(id) = 32),
    pack_id       bytea   NOT NULL,
    offset_bytes  bigint  NOT NULL CHECK (offset_bytes >= 0),
    length_bytes  integer NOT NULL CHECK (length_bytes > 0),
    plain_bytes   integer NOT NULL CHECK (plain_bytes >= 0),
    PRIMARY KEY (tenant_id, id)
) PARTITION BY HASH (tenant_id);

CREATE TABLE chunks_p0 PARTITION OF chunks FOR VALUES WITH (MODULUS 8, REMAINDER 0);
CREATE TABLE chunks_p1 PARTITION OF chunks FOR VALUES WITH (MODULUS 8, REMAINDER 1);
CREATE TABLE chunks_p2 PARTITION OF chunks FOR VALUES WITH (MODULUS 8, REMAINDER 2);
CREATE TABLE chunks_p3 PARTITION OF chunks FOR VALUES WITH (MODULUS 8, REMAINDER 3);
CREATE TABLE chunks_p4 PARTITION OF chunks FOR VALUES WITH (MODULUS 8, REMAINDER 4);
CREATE TABLE chunks_p5 PARTITION OF chunks FOR VALUES WITH (MODULUS 8, REMAINDER 5);
CREATE TABLE chunks_p6 PARTITION OF chunks FOR VALUES WITH (MODULUS 8, REMAINDER 6);
CREATE TABLE chunks_p7 PARTITION OF chunks FOR VALUES WITH (MODULUS 8, REMAINDER 7);

-- The id a run's snapshot will have once committed: fixed when the run opens, so the
-- agent can seal the manifest for it and a resumed run keeps it.
ALTER TABLE backup_runs ADD COLUMN snapshot_id uuid NOT NULL DEFAULT gen_random_uuid();
CREATE UNIQUE INDEX backup_runs_snapshot ON backup_runs (tenant_id, snapshot_id);
