-- Lifeboat schema, version 3: restore tests — proof that a snapshot can really be restored.

CREATE TABLE restore_tests (
    tenant_id       uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    snapshot_id     uuid        NOT NULL,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz NOT NULL DEFAULT now(),
    passed          boolean     NOT NULL,
    files_checked   bigint      NOT NULL CHECK (files_checked >= 0),
    bytes_checked   bigint      NOT NULL CHECK (bytes_checked >= 0),
    -- What failed, for people: "HomeDomain/Library/SMS/sms.db: chunk … does not open".
    problems        text[]      NOT NULL DEFAULT '{}',
    -- What the backup holds, to compare with the previous snapshot; NULL when not found.
    messages        bigint,
    contacts        bigint,
    photos          bigint,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, snapshot_id) REFERENCES snapshots (tenant_id, id) ON DELETE CASCADE,
    CHECK (passed = (cardinality(problems) = 0))
);
CREATE INDEX restore_tests_by_snapshot ON restore_tests (tenant_id, snapshot_id, finished_at DESC);
CREATE INDEX restore_tests_failed ON restore_tests (tenant_id, finished_at DESC) WHERE NOT passed;
