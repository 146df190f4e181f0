-- A publish's deliveries for a claim to take are stored as one row per
-- webhook (a bundle), not one row each: the 202 waits for this write, and
-- a row per delivery made it four times longer. A claim unpacks a
-- webhook's oldest bundles into webhook_deliveries when its due rows do
-- not fill its room, so everything after the first attempt (leases,
-- retries, dead letters, paging) works on delivery rows as before.
-- deliveries is a JSON array of [id, event, accepted at (Unix ms), data].
CREATE TABLE webhook_bundles (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id BIGINT NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    count BIGINT NOT NULL,
    deliveries TEXT NOT NULL
);

CREATE INDEX webhook_bundles_by_webhook ON webhook_bundles (webhook_id, seq);
