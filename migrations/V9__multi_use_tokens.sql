-- Lifeboat schema, version 9: enrolment tokens that enrol several agents (an MDM rollout
-- to hundreds of workstations uses one), can be revoked, and are remembered by the
-- agents they enrolled.

-- max_uses: how many agents the token may enrol (1 for a one-time token); use_count: how
-- many it has. used_at/used_by keep the last enrolment. A revoked token enrols no more.
ALTER TABLE enrollment_tokens
    ADD COLUMN max_uses   integer     NOT NULL DEFAULT 1 CHECK (max_uses BETWEEN 1 AND 100000),
    ADD COLUMN use_count  integer     NOT NULL DEFAULT 0 CHECK (use_count >= 0),
    ADD COLUMN revoked_at timestamptz,
    ADD CONSTRAINT enrollment_tokens_uses CHECK (use_count <= max_uses);
UPDATE enrollment_tokens SET use_count = 1 WHERE used_at IS NOT NULL;

-- The token an agent enrolled with (NULL for agents enrolled before version 9).
ALTER TABLE agents ADD COLUMN enrollment_token_id uuid;
