//! Queries on `ws_settings`: one WebSocket configuration per instance, with a
//! version that grows on every write.

use diesel::prelude::*;
use diesel::upsert::excluded;

use super::schema::ws_settings;
use super::{now_millis, with_conn, write_tx, DbConn, StorageError};
use crate::domain::{EventKind, InstanceId, VersionedConfig, WsConfig};

/// The stored columns of one configuration.
pub(super) type ConfigRow = (bool, String, bool, i64);

/// Encodes an event list as stored (a WebSocket configuration's or a
/// webhook's): a JSON array of wire names.
pub(super) fn encode_events(events: &[EventKind]) -> String {
    let names: Vec<&str> = events.iter().map(|k| k.as_str()).collect();
    serde_json::Value::from(names).to_string()
}

/// Decodes a stored row.
pub(super) fn decode(row: ConfigRow) -> Result<VersionedConfig, StorageError> {
    let (enabled, events, media_base64, version) = row;
    let names: Vec<String> = serde_json::from_str(&events)
        .map_err(|e| StorageError::Corrupt(format!("ws_settings.events: {e}")))?;
    let events = names
        .iter()
        .map(|n| {
            EventKind::parse(n)
                .ok_or_else(|| StorageError::Corrupt(format!("ws_settings.events: unknown `{n}`")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VersionedConfig {
        config: WsConfig {
            enabled,
            events,
            media_base64,
        },
        version,
    })
}

/// Stores `config` for the instance (insert or replace) and returns it as
/// persisted, with its new version.
pub fn upsert(
    conn: &mut DbConn,
    instance: InstanceId,
    config: &WsConfig,
) -> Result<VersionedConfig, StorageError> {
    let events = encode_events(&config.events);
    let now = now_millis();
    let row: ConfigRow = write_tx!(conn, c => diesel::insert_into(ws_settings::table)
        .values((
            ws_settings::instance_id.eq(instance.0),
            ws_settings::enabled.eq(config.enabled),
            ws_settings::events.eq(&events),
            ws_settings::media_base64.eq(config.media_base64),
            ws_settings::version.eq(1_i64),
            ws_settings::updated_at.eq(now),
        ))
        .on_conflict(ws_settings::instance_id)
        .do_update()
        .set((
            ws_settings::enabled.eq(excluded(ws_settings::enabled)),
            ws_settings::events.eq(excluded(ws_settings::events)),
            ws_settings::media_base64.eq(excluded(ws_settings::media_base64)),
            ws_settings::version.eq(ws_settings::version + 1_i64),
            ws_settings::updated_at.eq(excluded(ws_settings::updated_at)),
        ))
        .returning((
            ws_settings::enabled,
            ws_settings::events,
            ws_settings::media_base64,
            ws_settings::version,
        ))
        .get_result(c))?;
    decode(row)
}

/// The instance's configuration, if it was ever set.
pub fn get(
    conn: &mut DbConn,
    instance: InstanceId,
) -> Result<Option<VersionedConfig>, StorageError> {
    let row: Option<ConfigRow> = with_conn!(conn, c => ws_settings::table
        .find(instance.0)
        .select((
            ws_settings::enabled,
            ws_settings::events,
            ws_settings::media_base64,
            ws_settings::version,
        ))
        .first(c)
        .optional())?;
    row.map(decode).transpose()
}
