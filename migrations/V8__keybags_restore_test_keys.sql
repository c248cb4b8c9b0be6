-- Lifeboat schema, version 8: the backup keybag of a phone whose backup password the
-- server does not know, and what a restore test of an encrypted snapshot found.

-- The BackupKeyBag of the last backup a phone encrypted with a password the server does
-- not know (none escrowed, or the escrowed one no longer opens it), as its agent read it
-- from Manifest.plist. An admin's password is checked against it before it is kept.
-- Sealed like the passwords (docs/format.md): with it, anyone could guess the password
-- offline.
CREATE TABLE device_backup_keybags (
    tenant_id         uuid        NOT NULL,
    udid              text        NOT NULL,
    sealed            bytea       NOT NULL CHECK (length(sealed) > 28),
    reported_by_agent uuid,
    reported_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, udid),
    FOREIGN KEY (tenant_id, udid) REFERENCES devices (tenant_id, udid) ON DELETE CASCADE
);

-- encrypted: the phone encrypted the backup, and the test also unlocked its keybag with
-- the escrowed password and unwrapped every file's key. keychain: Manifest.db lists
-- KeychainDomain/keychain-backup.plist (NULL when Manifest.db could not be read).
ALTER TABLE restore_tests
    ADD COLUMN encrypted boolean NOT NULL DEFAULT false,
    ADD COLUMN keychain  boolean;
