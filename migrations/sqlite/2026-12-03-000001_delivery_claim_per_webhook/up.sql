-- Each webhook's due deliveries in claim order: a claim reads the first due
-- rows of each webhook that has room, however many deliveries are waiting
-- for webhooks that have none (a slow or dead receiver's backlog).
CREATE INDEX webhook_deliveries_due_by_webhook ON webhook_deliveries (webhook_id, next_attempt_at, seq) WHERE dead_at IS NULL;
