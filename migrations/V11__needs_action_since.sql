-- Lifeboat schema, version 11: when a device began to wait for a person (Trust, its
-- passcode, its backup password). It is kept across the agent's retries — whose
-- backing-up / needs-passcode flips move state_changed_at — and cleared by the next
-- successful backup, so an alert can measure how long the phone has really waited.
ALTER TABLE devices ADD COLUMN needs_action_since timestamptz;
UPDATE devices SET needs_action_since = state_changed_at
    WHERE state IN ('needs-trust', 'needs-passcode', 'needs-backup-password');
