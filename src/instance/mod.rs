//! Instances at run time: one actor per instance holding its WebSocket
//! settings and its connected sessions, found through the `Registry`.
//!
//! The instance actor never touches the database: HTTP handlers persist first
//! and then tell it what was persisted, as a [`Change`] applied through
//! [`Registry::apply`] — the one way a change reaches a node.
//!
//! Recovery on reconnect (contract §12) lives here too: the bounded history
//! each actor keeps beside its sessions (`history`), how a session joins
//! with its replay (`recovery.rs`, part of `actor`), and in a cluster the JetStream
//! history every node mirrors (`shared_history`; `mirror.rs`, part of `actor`).

pub mod actor;
pub mod change;
pub mod history;
pub mod inbox;
pub mod messages;
pub mod registry;
pub mod shared_history;

pub use actor::InstanceActor;
pub use change::Change;
pub use inbox::{Inbox, SharedAddr};
pub use registry::Registry;

use crate::domain::{AccountId, InstanceId};

/// What an instance actor knows of its instance besides its settings.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    pub id: InstanceId,
    pub account: AccountId,
    pub name: String,
    /// The TokenInstance, for envelopes.
    pub token: String,
}

impl From<&crate::storage::instances::InstanceRecord> for InstanceInfo {
    fn from(record: &crate::storage::instances::InstanceRecord) -> Self {
        InstanceInfo {
            id: record.id,
            account: record.account,
            name: record.name.clone(),
            token: record.token.clone(),
        }
    }
}
