-- A delivery's webhook is no longer checked by a foreign key: the check
-- took a share lock on the webhook's row for every stored delivery, a
-- twelfth of the database's time while a publish stream was stored. The
-- gateway deletes a webhook's deliveries with it (and an instance's with
-- its webhooks), and an advisory lock per webhook keeps a delete from
-- missing the rows of a publish being stored (storage::webhooks::hook_locks).
ALTER TABLE webhook_deliveries DROP CONSTRAINT IF EXISTS webhook_deliveries_webhook_id_fkey;

-- Half of each new page is left free, so that a claim's lease (not an
-- indexed column) is written beside its row (a HOT update) instead of as a
-- new row version with an entry in every index; claims took twice as long.
ALTER TABLE webhook_deliveries SET (fillfactor = 50);
