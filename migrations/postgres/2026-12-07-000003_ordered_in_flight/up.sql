-- What holds back an `ordered` webhook's next delivery (contract §11: one
-- in flight on all nodes together), found by one key instead of a look at
-- every pending row of the webhook: `seq`, its delivery claimed last (it
-- holds the webhook back while it is pending and leased), and `until`
-- (Unix ms): set when a webhook is made ordered, the end of the leases of
-- its deliveries then; until then any of its deliveries leased holds it
-- back. No foreign key: a row left by a deleted webhook holds nothing back.
CREATE TABLE webhook_in_flight (
    webhook_id BIGINT PRIMARY KEY,
    seq BIGINT NOT NULL,
    until BIGINT NOT NULL
);

-- Webhooks already ordered: a delivery of theirs leased now (by a node of
-- the earlier version) holds them back until its lease ends.
INSERT INTO webhook_in_flight (webhook_id, seq, until)
SELECT w.id, 0, COALESCE((SELECT MAX(d.lease_until) FROM webhook_deliveries d
                          WHERE d.webhook_id = w.id AND d.dead_at IS NULL), 0)
FROM webhooks w WHERE w.ordered;

-- A partial index on leased rows briefly made by an earlier build under the
-- version 2026-12-07-000002 (its migration is gone): any index holding
-- lease_until turns a claim's lease into a non-HOT update on PostgreSQL.
DROP INDEX IF EXISTS webhook_deliveries_leased;
