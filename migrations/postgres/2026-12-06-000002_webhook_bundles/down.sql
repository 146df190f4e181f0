DROP TABLE webhook_bundles;
