-- Lifeboat schema, version 6: escrowed iOS backup passwords, the audit log, and the
-- device state of a phone whose backup password the server does not know.

-- One escrowed backup password per device: nonce | AES-256-GCM(tenant escrow key,
-- password) | tag, the escrow key derived from the tenant's data key (docs/format.md).
-- source: 'agent' (generated and set on the phone by an agent) or 'admin' (entered
-- through the API or the CLI).
CREATE TABLE device_backup_passwords (
    tenant_id      uuid        NOT NULL,
    udid           text        NOT NULL,
    sealed         bytea       NOT NULL CHECK (length(sealed) > 28),
    source         text        NOT NULL CHECK (source IN ('agent', 'admin')),
    set_by_user    uuid,
    set_by_agent   uuid,
    set_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, udid),
    FOREIGN KEY (tenant_id, udid) REFERENCES devices (tenant_id, udid) ON DELETE CASCADE
);

-- Who looked at or changed what: every reveal of a password and every view of an
-- employee's data. Append-only for the server (it never updates or deletes a row).
CREATE TABLE audit_events (
    id             bigserial   PRIMARY KEY,
    tenant_id      uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    at             timestamptz NOT NULL DEFAULT now(),
    actor_user     uuid,
    actor_agent    uuid,
    actor          text        NOT NULL,
    action         text        NOT NULL,
    udid           text,
    detail         jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_events_by_time ON audit_events (tenant_id, at DESC, id DESC);

ALTER TABLE devices DROP CONSTRAINT devices_state_check;
ALTER TABLE devices ADD CONSTRAINT devices_state_check
    CHECK (state IN ('idle', 'backing-up', 'needs-trust', 'needs-passcode', 'needs-backup-password', 'failing'));
