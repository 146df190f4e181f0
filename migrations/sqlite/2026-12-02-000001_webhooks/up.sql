-- Webhooks (contract §11): one row per instance and label.
CREATE TABLE webhooks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id BIGINT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    label TEXT NOT NULL,
    enabled BOOLEAN NOT NULL,
    url TEXT,
    auth_header TEXT,
    by_events BOOLEAN NOT NULL,
    events TEXT NOT NULL,
    media_base64 BOOLEAN NOT NULL,
    ordered BOOLEAN NOT NULL,
    secret TEXT NOT NULL,
    previous_secret TEXT,
    rotated_at BIGINT,
    delivered BIGINT NOT NULL DEFAULT 0,
    last_success_at BIGINT,
    last_failure_at BIGINT,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (instance_id, label)
);

-- Deliveries: pending while dead_at is NULL, dead letters after. seq is
-- the acceptance order; id is the webhook-id (msg_…).
CREATE TABLE webhook_deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    webhook_id BIGINT NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    event TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until BIGINT NOT NULL DEFAULT 0,
    last_status BIGINT,
    last_error TEXT,
    last_attempt_at BIGINT,
    dead_at BIGINT
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE dead_at IS NULL;
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, dead_at, seq);
CREATE INDEX webhook_deliveries_dead ON webhook_deliveries (dead_at) WHERE dead_at IS NOT NULL;
