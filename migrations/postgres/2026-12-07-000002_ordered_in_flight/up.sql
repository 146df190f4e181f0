-- Pending deliveries that are (or were) leased: an `ordered` webhook's next
-- claim waits while one of its deliveries is in flight, also when the
-- oldest pending one is a dead letter put back by /retry meanwhile. Rows
-- stored for a claim, and those whose outcome was recorded, have
-- lease_until 0 and stay out of it.
CREATE INDEX webhook_deliveries_leased ON webhook_deliveries (webhook_id, lease_until)
    WHERE dead_at IS NULL AND lease_until > 0;
