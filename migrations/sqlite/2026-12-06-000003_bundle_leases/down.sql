ALTER TABLE webhook_bundles DROP COLUMN lease_until;
