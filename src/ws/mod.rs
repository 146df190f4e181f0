//! WebSocket sessions: the handshake's way out of HTTP, the socket each
//! session owns, the session actor, its frame rules and heartbeat, and the
//! close codes of contract §6.
//!
//! ```text
//!  client ── GET /ws/:instance, Upgrade: websocket ──► actix-http (h1)
//!                                                        │ hands the request and its
//!                                                        │ connection to the upgrade service
//!  upgrade::service ── same actix-web app: rate limit → token → instance → Origin
//!        │             → ?events= → enabled (http/connect.rs); the handler builds a
//!        │             Session and upgrade::accept() returns the 101 carrying it
//!        ▼
//!  101 written, then the TcpStream leaves HTTP ──► socket::serve(io, early bytes, session, …)
//!        │   Incoming: reads through a stack buffer (frame_watch looks at frame headers)
//!        │   WebsocketContext<Session>: decodes frames, runs the actor, encodes frames
//!        │   Outgoing: writes encoded frames straight out (writev), stops polling the
//!        │             session above socket::HIGH_WATER unwritten bytes
//!        ▼
//!  Session actor (session.rs) ── started(): mailbox raised, Join ──► InstanceActor
//!        ◄── try_send(Batch) on its one stored Recipient; Full ⇒ 4008 (instance side)
//!
//!  With `server.direct_writes`, while Outgoing has nothing to write and the
//!  mailbox is empty, the fan-out writes the encoded frames itself (direct.rs).
//! ```
//!
//! Why the connection leaves actix-http's dispatcher: the dispatcher keeps an
//! 8 KiB read and an 8 KiB write buffer for every connection for as long as
//! it lives (`HW_BUFFER_SIZE`, fixed at compile time). An idle WebSocket then
//! cost about 12 KiB of RSS; with its own pump holding no buffer while idle,
//! about 2.7 KiB (19,000 idle connections, BENCHMARKS.md). The pump also lets
//! a stalled client's session stop being polled without freezing anything
//! else, and lets the close handshake end with a FIN rather than a reset.

pub mod close;
pub mod direct;
pub mod frame_watch;
pub mod rules;
pub mod session;
pub mod socket;
pub mod upgrade;

pub use session::Session;
