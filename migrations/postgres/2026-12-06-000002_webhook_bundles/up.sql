-- A publish's deliveries for a claim to take are stored as one row per
-- webhook (a bundle), not one row each: the 202 waits for this write, and
-- a row per delivery made it four times longer. A claim unpacks a
-- webhook's oldest bundles into webhook_deliveries when its due rows do
-- not fill its room, so everything after the first attempt (leases,
-- retries, dead letters, paging) works on delivery rows as before.
-- deliveries is a JSON array of [id, event, accepted at (Unix ms), data].
-- No foreign key, as for webhook_deliveries: the gateway deletes a
-- webhook's bundles with it, under the same advisory lock.
CREATE TABLE webhook_bundles (
    seq BIGSERIAL PRIMARY KEY,
    webhook_id BIGINT NOT NULL,
    count BIGINT NOT NULL,
    deliveries TEXT NOT NULL
);

CREATE INDEX webhook_bundles_by_webhook ON webhook_bundles (webhook_id, seq);

-- Acceptance positions (webhook_deliveries.seq) are reserved when a
-- publish's deliveries are stored, bundled or not, a block of 65,536 at a
-- time: a block number from this sequence, shifted left by 16 bits, is the
-- first position of the block (one nextval per intake transaction instead
-- of one per delivery). Blocks start past every position already used.
CREATE SEQUENCE webhook_delivery_blocks;
SELECT setval('webhook_delivery_blocks', (SELECT COALESCE(MAX(seq), 0) FROM webhook_deliveries) / 65536 + 1);
