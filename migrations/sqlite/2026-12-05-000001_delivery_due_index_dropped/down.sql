CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at, seq) WHERE dead_at IS NULL;
