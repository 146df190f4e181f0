-- Claims read each webhook's due deliveries from
-- webhook_deliveries_due_by_webhook; the cluster-wide due index only cost
-- every stored and every deleted delivery one more index entry.
DROP INDEX webhook_deliveries_due;
