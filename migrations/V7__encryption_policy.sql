-- Lifeboat schema, version 7: each tenant's backup encryption policy, and whether a
-- snapshot is of a backup the phone encrypted.

-- 'required' (the default): an agent turns a phone's backup encryption on, with a
-- generated password it escrows first, before it backs the phone up. 'off': phones are
-- backed up as they are (an encrypting phone still needs its escrowed password).
ALTER TABLE tenants
    ADD COLUMN backup_encryption text NOT NULL DEFAULT 'required'
        CHECK (backup_encryption IN ('required', 'off'));

-- The phone encrypted this backup: the snapshot holds the plaintext and each file's key
-- record, and a restore or an encrypted export needs the escrowed password.
ALTER TABLE snapshots ADD COLUMN ios_encrypted boolean NOT NULL DEFAULT false;
