-- Where each dead letter put back by /retry stood (contract §11: a /failed
-- cursor is a dead letter's id; once that letter is delivered its row is
-- gone, and the next page resumes after the position kept here). Kept as
-- long as dead letters are (EVENTGATE_WEBHOOK_DEAD_LETTER_HOURS).
CREATE TABLE webhook_requeued (
    id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL
);

CREATE INDEX webhook_requeued_at ON webhook_requeued (at);
