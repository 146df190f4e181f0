-- Accounts hold only a hash of their TokenAccount.
CREATE TABLE accounts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

-- Instance names are unique per account; tokens are unique everywhere.
CREATE TABLE instances (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id BIGINT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    token TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    UNIQUE (account_id, name)
);

-- One WebSocket configuration per instance; version orders concurrent writes.
CREATE TABLE ws_settings (
    instance_id BIGINT PRIMARY KEY NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    enabled BOOLEAN NOT NULL,
    events TEXT NOT NULL,
    media_base64 BOOLEAN NOT NULL,
    version BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
