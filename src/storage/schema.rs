//! Table definitions shared by the SQLite and PostgreSQL backends. Written by
//! hand: only types both backends share (BigInt, Text, Bool).

diesel::table! {
    accounts (id) {
        id -> BigInt,
        name -> Text,
        token_hash -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    instances (id) {
        id -> BigInt,
        account_id -> BigInt,
        name -> Text,
        token -> Text,
        token_hash -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    ws_settings (instance_id) {
        instance_id -> BigInt,
        enabled -> Bool,
        events -> Text,
        media_base64 -> Bool,
        version -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::joinable!(instances -> accounts (account_id));
diesel::joinable!(ws_settings -> instances (instance_id));
diesel::allow_tables_to_appear_in_same_query!(accounts, instances, ws_settings);

// `webhooks` has more columns than diesel's table! takes by default: its
// queries are SQL text (see `storage::webhooks`).

diesel::table! {
    webhook_deliveries (seq) {
        seq -> BigInt,
        id -> Text,
        webhook_id -> BigInt,
        event -> Text,
        data -> Text,
        created_at -> BigInt,
        attempts -> BigInt,
        next_attempt_at -> BigInt,
        lease_until -> BigInt,
        last_status -> Nullable<BigInt>,
        last_error -> Nullable<Text>,
        last_attempt_at -> Nullable<BigInt>,
        dead_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    webhook_bundles (seq) {
        seq -> BigInt,
        webhook_id -> BigInt,
        count -> BigInt,
        deliveries -> Text,
        lease_until -> BigInt,
    }
}

diesel::table! {
    webhook_requeued (id) {
        id -> Text,
        seq -> BigInt,
        at -> BigInt,
    }
}
