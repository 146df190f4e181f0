-- A bundle can be leased whole to the node that attempts its deliveries
-- (until lease_until, Unix ms; 0: never leased). The node closes it once
-- each delivery has an outcome: it deletes the bundle and stores as rows
-- only the deliveries that did not succeed, so a delivery that succeeds
-- at once costs no row. A bundle whose lease ran out (its node died) is
-- unpacked into due rows, their first attempt counted.
ALTER TABLE webhook_bundles ADD COLUMN lease_until BIGINT NOT NULL DEFAULT 0;
