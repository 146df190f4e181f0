-- A delivery's webhook is no longer checked by a foreign key: the check
-- took a share lock on the webhook's row for every stored delivery, a
-- twelfth of the database's time while a publish stream was stored. The
-- gateway deletes a webhook's deliveries with it (and an instance's with
-- its webhooks), and housekeeping removes those of a webhook deleted while
-- a publish was being stored.
ALTER TABLE webhook_deliveries DROP CONSTRAINT IF EXISTS webhook_deliveries_webhook_id_fkey;
