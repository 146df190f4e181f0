DROP TABLE webhook_requeued;
