//! The domain's plain data: identifiers, instance names, the six event types
//! and an instance's WebSocket configuration. No I/O here.

use serde::{Deserialize, Serialize};

/// Database id of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(pub i64);

/// Database id of an instance. Ids are never reused, so a stale one never
/// names a newer instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(pub i64);

/// Longest instance name, in characters.
pub const MAX_INSTANCE_NAME: usize = 64;

/// An instance name: 1–64 of `A-Z a-z 0-9 _ . -`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceName(String);

impl InstanceName {
    /// Validates `name`; `None` when it breaks the contract's rules.
    pub fn parse(name: &str) -> Option<Self> {
        let mut chars = name.chars();
        let first = chars.next()?;
        let valid = name.len() <= MAX_INSTANCE_NAME
            && first.is_ascii_alphanumeric()
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        valid.then(|| InstanceName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for InstanceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The six event types of the contract, in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "message.exchange")]
    MessageExchange,
    #[serde(rename = "message.status")]
    MessageStatus,
    #[serde(rename = "call.update")]
    CallUpdate,
    #[serde(rename = "group.flow")]
    GroupFlow,
    #[serde(rename = "instance.state")]
    InstanceState,
    #[serde(rename = "label.update")]
    LabelUpdate,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::MessageExchange,
        EventKind::MessageStatus,
        EventKind::CallUpdate,
        EventKind::GroupFlow,
        EventKind::InstanceState,
        EventKind::LabelUpdate,
    ];

    /// The wire name, e.g. `message.exchange`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::MessageExchange => "message.exchange",
            EventKind::MessageStatus => "message.status",
            EventKind::CallUpdate => "call.update",
            EventKind::GroupFlow => "group.flow",
            EventKind::InstanceState => "instance.state",
            EventKind::LabelUpdate => "label.update",
        }
    }

    /// Parses a wire name; `None` for anything but the six.
    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Its position in [`EventKind::ALL`] (the declaration order).
    pub fn index(self) -> usize {
        self as usize
    }

    /// This kind's bit in an `EventSet`.
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of event kinds, as a bit set. The empty set means "no narrowing"
/// wherever the contract says "empty = all".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventSet(u8);

impl EventSet {
    /// Builds a set from kinds.
    pub fn of(kinds: &[EventKind]) -> Self {
        EventSet(kinds.iter().fold(0, |bits, k| bits | k.bit()))
    }

    /// Whether `kind` passes this filter (an empty filter passes everything).
    pub fn allows(self, kind: EventKind) -> bool {
        self.0 == 0 || self.0 & kind.bit() != 0
    }

    /// The set as bits (for the wire between nodes).
    pub fn bits(self) -> u8 {
        self.0
    }

    /// The set of `bits` (from [`EventSet::bits`]).
    pub fn from_bits(bits: u8) -> Self {
        EventSet(bits)
    }
}

/// An instance's WebSocket configuration, as persisted and as replied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WsConfig {
    pub enabled: bool,
    /// Allowed event types in first-seen order, without duplicates; empty = all.
    pub events: Vec<EventKind>,
    #[serde(rename = "mediaBase64")]
    pub media_base64: bool,
}

impl WsConfig {
    /// Builds the stored form: duplicates dropped (first seen kept), and a
    /// disabled configuration with no events and no media.
    pub fn normalized(enabled: bool, events: Vec<EventKind>, media_base64: bool) -> Self {
        if !enabled {
            return WsConfig {
                enabled,
                events: Vec::new(),
                media_base64: false,
            };
        }
        let mut unique = Vec::with_capacity(events.len());
        for kind in events {
            if !unique.contains(&kind) {
                unique.push(kind);
            }
        }
        WsConfig {
            enabled,
            events: unique,
            media_base64,
        }
    }

    /// The instance filter as a set.
    pub fn event_set(&self) -> EventSet {
        EventSet::of(&self.events)
    }
}

/// A stored configuration with its version: later writes have larger versions,
/// so whoever applies updates can drop one that arrives late.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionedConfig {
    pub config: WsConfig,
    pub version: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names() {
        for ok in ["a", "sales-1", "A.b_c-9", &"x".repeat(64)] {
            assert!(InstanceName::parse(ok).is_some(), "{ok}");
        }
        for bad in ["", "-a", ".a", "_a", "a b", "a/b", "é", &"x".repeat(65)] {
            assert!(InstanceName::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn kinds_are_indexed_in_the_order_of_all() {
        for (i, kind) in EventKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), i, "{kind:?}");
        }
    }

    #[test]
    fn event_sets() {
        let empty = EventSet::default();
        assert!(EventKind::ALL.iter().all(|k| empty.allows(*k)));
        let one = EventSet::of(&[EventKind::CallUpdate]);
        assert!(one.allows(EventKind::CallUpdate));
        assert!(!one.allows(EventKind::LabelUpdate));
    }

    #[test]
    fn normalized_config() {
        use EventKind::*;
        let c = WsConfig::normalized(true, vec![CallUpdate, GroupFlow, CallUpdate], true);
        assert_eq!(c.events, vec![CallUpdate, GroupFlow]);
        let off = WsConfig::normalized(false, vec![CallUpdate], true);
        assert!(off.events.is_empty() && !off.media_base64);
    }
}
