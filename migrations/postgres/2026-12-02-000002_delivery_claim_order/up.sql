-- Due deliveries in the order they are claimed (due time, then acceptance):
-- a claim reads the first rows of this index instead of sorting every due row.
DROP INDEX webhook_deliveries_due;
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at, seq) WHERE dead_at IS NULL;
