//! Direct writes: the instance's fan-out writing a session's frames to its
//! socket itself, on the instance's thread, while the connection's writer
//! (`socket::Outgoing`) has nothing queued (so its socket took all it was
//! given) and nothing waits in the session's mailbox. The frame is on the wire
//! at once, with no message, no wake-up of the session's task and no
//! encoding per session; otherwise deliveries take the mailbox as before.
//! Only with `server.direct_writes` (on by default), and only while the
//! node is quiet (`instance::actor::fan_out`): at full speed a write per
//! publish and session would cost more than the writers' gathering of
//! several publishes into one write. The instance's
//! heartbeat pings ([`PING`]) take the same way always, setting or not
//! (`instance::actor::take_heartbeat_turns`).
//!
//! A direct write goes to the socket's descriptor, kept beside it: a
//! fan-out to 1000 sessions that reads tokio's stream and its readiness
//! state first waits on two cache misses per socket (BENCHMARKS, "Fan-out
//! in join order"). tokio's readiness is only a hint, so a write past it is
//! sound: a write the socket refuses leaves the kernel to signal when it
//! takes bytes again, and the writer waits for that as before.
//!
//! The writer and the fan-out take turns under one lock: the writer closes
//! the way in (`busy`) each time it runs and opens it (`idle`) when it stops
//! with nothing left to write; the fan-out writes only while it is open. So
//! bytes never interleave and never overtake what the writer holds. A write
//! the socket takes only in part closes the way; its rest is the writer's
//! to send first. Once the session closes (or its connection ends), the way
//! stays closed: nothing follows a close frame.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use actix_rt::net::TcpStream;
use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;
use parking_lot::Mutex;

/// An empty ping frame, unmasked (RFC 6455 §5.5.2): a heartbeat's ping.
pub static PING: Bytes = Bytes::from_static(&[0x89, 0x00]);

/// What became of a direct write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direct {
    /// The socket took all of it.
    Written,
    /// The socket took part of it, possibly nothing; the writer sends the
    /// rest once woken (the caller wakes it with a message to the session).
    Partly,
    /// Not written: the caller delivers through the mailbox.
    Refused,
}

/// One session's way in for direct writes.
#[derive(Debug, Default)]
pub struct DirectWay {
    inner: Mutex<Way>,
}

#[derive(Debug, Default)]
struct Way {
    /// The connection's socket and its descriptor (written to directly),
    /// from the connection's start until the session closes.
    socket: Option<(Arc<TcpStream>, RawFd)>,
    /// Whether the writer is stopped with nothing to write.
    open: bool,
    /// What a direct write left unwritten, for the writer to send first.
    rest: Bytes,
}

impl DirectWay {
    /// The connection's socket is here (the way stays closed until `idle`).
    pub fn attach(&self, socket: Arc<TcpStream>) {
        let fd = socket.as_raw_fd();
        self.inner.lock().socket = Some((socket, fd));
    }

    /// Closes the way for good: the session is closing or its connection ended.
    pub fn end(&self) {
        let mut way = self.inner.lock();
        way.socket = None;
        way.open = false;
    }

    /// The writer runs: the way closes; returns what a direct write left.
    pub fn busy(&self) -> Bytes {
        let mut way = self.inner.lock();
        way.open = false;
        std::mem::take(&mut way.rest)
    }

    /// The writer stopped with nothing left to write: the way opens.
    pub fn idle(&self) {
        let mut way = self.inner.lock();
        way.open = way.socket.is_some() && way.rest.is_empty();
    }

    /// Writes `wire` (encoded frames) if the way is open.
    pub fn write(&self, wire: &Bytes) -> Direct {
        let mut way = self.inner.lock();
        let Some(&(_, fd)) = way.socket.as_ref().filter(|_| way.open) else {
            return Direct::Refused;
        };
        // SAFETY: `fd` is the descriptor of the socket beside it, which this
        // locked way holds, so it stays open until this borrow ends.
        #[allow(unsafe_code)] // One of the crate's unsafe calls (see `lib.rs`).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sent = socket2::SockRef::from(&fd).send_with_flags(wire, libc::MSG_NOSIGNAL);
        let written = match sent {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => {
                // The connection failed; its writer finds out on its own.
                way.open = false;
                return Direct::Refused;
            }
        };
        if written == wire.len() {
            return Direct::Written;
        }
        way.open = false;
        way.rest = wire.slice(written..);
        Direct::Partly
    }
}

/// `texts` as unmasked, unfragmented WebSocket text frames (RFC 6455 §5.2),
/// one after the other.
pub fn encode_texts(texts: &[ByteString]) -> Bytes {
    let size = texts.iter().map(|t| t.len() + 10).sum();
    let mut out = BytesMut::with_capacity(size);
    for text in texts {
        out.put_u8(0x81);
        let len = text.len();
        if len < 126 {
            out.put_u8(len as u8);
        } else if let Ok(len) = u16::try_from(len) {
            out.put_u8(126);
            out.put_u16(len);
        } else {
            out.put_u8(127);
            out.put_u64(len as u64);
        }
        out.put_slice(text.as_bytes());
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_codec::Decoder;
    use actix_http::ws::{Codec, Frame};

    #[test]
    fn encoded_texts_are_what_the_codec_reads() {
        let texts: Vec<ByteString> = [0usize, 1, 125, 126, 65535, 65536, 70000]
            .iter()
            .map(|&n| "x".repeat(n).into())
            .collect();
        let mut wire = BytesMut::from(&encode_texts(&texts)[..]);
        // The client side of the codec reads unmasked frames.
        let mut codec = Codec::new().client_mode().max_size(1 << 20);
        for text in &texts {
            match codec.decode(&mut wire).unwrap() {
                Some(Frame::Text(got)) => assert_eq!(&got[..], text.as_bytes()),
                other => panic!("{other:?}"),
            }
        }
        assert!(wire.is_empty());
    }
}
