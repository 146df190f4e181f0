//! WebSocket sessions: the session actor, its frame rules and heartbeat, and
//! the close codes of contract §6.

pub mod close;
pub mod rules;
pub mod session;

pub use session::Session;
