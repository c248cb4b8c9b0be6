-- Lifeboat schema, version 12: the help-desk console — console passwords, sessions,
-- failed sign-ins, reason-bound access to a device's content — and an audit log that is
-- hash-chained and append-only.

-- A console user signs in with a name and a password (argon2id, PHC string). Names of
-- console users are unique across tenants: the sign-in page asks for nothing else.
ALTER TABLE users ADD COLUMN password_hash text CHECK (password_hash LIKE '$argon2id$%');
CREATE UNIQUE INDEX users_console_name ON users (lower(name))
    WHERE password_hash IS NOT NULL AND revoked_at IS NULL;

-- A signed-in browser. The cookie holds a 32-byte secret; only its SHA-256 is kept.
CREATE TABLE console_sessions (
    token_hash     bytea       PRIMARY KEY CHECK (length(token_hash) = 32),
    tenant_id      uuid        NOT NULL,
    user_id        uuid        NOT NULL,
    csrf_token     text        NOT NULL CHECK (length(csrf_token) >= 32),
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_seen_at   timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    ip             text,
    user_agent     text,
    FOREIGN KEY (tenant_id, user_id) REFERENCES users (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX console_sessions_by_user ON console_sessions (tenant_id, user_id);

-- Failed sign-ins, shared by every replica: too many for one name or one address in a
-- window and the next attempt is refused before its password is checked.
CREATE TABLE login_failures (
    id             bigserial   PRIMARY KEY,
    name           text        NOT NULL,
    ip             text,
    at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_failures_by_name ON login_failures (lower(name), at);
CREATE INDEX login_failures_by_ip ON login_failures (ip, at);

-- A help-desk user's access to one device's content: given with a reason (a ticket
-- reference), for a limited time.
CREATE TABLE content_grants (
    id             uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id      uuid        NOT NULL,
    user_id        uuid        NOT NULL,
    udid           text        NOT NULL,
    reason         text        NOT NULL CHECK (length(reason) BETWEEN 3 AND 200),
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    FOREIGN KEY (tenant_id, user_id) REFERENCES users (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, udid) REFERENCES devices (tenant_id, udid) ON DELETE CASCADE
);
CREATE INDEX content_grants_by_user ON content_grants (tenant_id, user_id, udid, expires_at);

-- The audit log gains what a reviewer asks — the actor's role, the snapshot, dataset and
-- object looked at (a reference, never content), the reason given, the caller's address
-- and user agent — and a hash chain per tenant: `seq` counts a tenant's events from 1 and
-- `hash` = SHA-256 of the event's canonical text (docs/format.md, "Audit chain"), which
-- ends with the previous event's hash.
ALTER TABLE audit_events
    ADD COLUMN role        text,
    ADD COLUMN snapshot_id uuid,
    ADD COLUMN dataset     text,
    ADD COLUMN object      text,
    ADD COLUMN reason      text,
    ADD COLUMN ip          text,
    ADD COLUMN user_agent  text,
    ADD COLUMN seq         bigint,
    ADD COLUMN prev_hash   bytea,
    ADD COLUMN hash        bytea;

CREATE FUNCTION audit_event_text(e audit_events) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT concat_ws(chr(10),
        'lifeboat-audit-v1',
        e.seq::text,
        e.tenant_id::text,
        (extract(epoch FROM e.at) * 1000000)::bigint::text,
        quote_nullable(e.actor),
        quote_nullable(e.actor_user::text),
        quote_nullable(e.actor_agent::text),
        quote_nullable(e.role),
        quote_nullable(e.action),
        quote_nullable(e.udid),
        quote_nullable(e.snapshot_id::text),
        quote_nullable(e.dataset),
        quote_nullable(e.object),
        quote_nullable(e.reason),
        quote_nullable(e.ip),
        quote_nullable(e.user_agent),
        quote_nullable(e.detail::text),
        encode(e.prev_hash, 'hex'))
$$;

-- The events already written, chained in the order they were written.
DO $$
DECLARE
    r record;
    last_tenant uuid;
    last_seq bigint;
    last_hash bytea;
BEGIN
    FOR r IN SELECT id, tenant_id FROM audit_events ORDER BY tenant_id, id LOOP
        IF last_tenant IS DISTINCT FROM r.tenant_id THEN
            last_tenant := r.tenant_id;
            last_seq := 0;
            last_hash := decode(repeat('00', 32), 'hex');
        END IF;
        last_seq := last_seq + 1;
        UPDATE audit_events SET seq = last_seq, prev_hash = last_hash WHERE id = r.id;
        UPDATE audit_events e SET hash = sha256(convert_to(audit_event_text(e), 'UTF8'))
            WHERE id = r.id RETURNING hash INTO last_hash;
    END LOOP;
END $$;

ALTER TABLE audit_events
    ALTER COLUMN seq SET NOT NULL,
    ALTER COLUMN prev_hash SET NOT NULL,
    ALTER COLUMN hash SET NOT NULL,
    ADD CONSTRAINT audit_events_hash_length CHECK (length(hash) = 32 AND length(prev_hash) = 32),
    ADD CONSTRAINT audit_events_seq UNIQUE (tenant_id, seq);

-- Every insert is chained under a per-tenant lock, so concurrent writers (and replicas)
-- form one chain; the time is taken under the lock, so it never goes backwards.
CREATE FUNCTION audit_events_chain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    last record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('lifeboat.audit.' || NEW.tenant_id::text, 0));
    SELECT seq, hash INTO last FROM audit_events WHERE tenant_id = NEW.tenant_id ORDER BY seq DESC LIMIT 1;
    NEW.seq := COALESCE(last.seq, 0) + 1;
    NEW.prev_hash := COALESCE(last.hash, decode(repeat('00', 32), 'hex'));
    NEW.at := date_trunc('microseconds', clock_timestamp());
    NEW.hash := sha256(convert_to(audit_event_text(NEW), 'UTF8'));
    RETURN NEW;
END $$;
CREATE TRIGGER audit_events_chain BEFORE INSERT ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_chain();

-- Append-only: no update, no delete, no truncate — except the expiry of events older than
-- the retention period, which sets `lifeboat.audit_expiry` for its own transaction.
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('lifeboat.audit_expiry', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'the audit log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
