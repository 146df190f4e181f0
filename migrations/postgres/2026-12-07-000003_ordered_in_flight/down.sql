DROP TABLE webhook_in_flight;
