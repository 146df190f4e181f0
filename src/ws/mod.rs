//! WebSocket sessions: the handshake's way out of HTTP, the socket each
//! session owns, the session actor, its frame rules and heartbeat, and the
//! close codes of contract §6.

pub mod close;
pub mod close_watch;
pub mod rules;
pub mod session;
pub mod socket;
pub mod upgrade;

pub use session::Session;
