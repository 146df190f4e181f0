DROP TABLE webhook_bundles;
DROP SEQUENCE webhook_delivery_blocks;
