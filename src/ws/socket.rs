//! A WebSocket connection after its handshake: the socket, owned here rather
//! than by actix-http's HTTP/1 dispatcher, driven by the session actor's
//! `WebsocketContext`.
//!
//! An idle connection holds no buffer of its own: bytes are read through a
//! stack buffer into exactly-sized chunks, and the frames the session encodes
//! are written straight out, kept only while the kernel will not take them.
//! While more than [`HIGH_WATER`] bytes wait for the socket, the session is
//! not polled, so its mailbox fills and the instance closes it with 4008
//! (contract §6); `TCP_USER_TIMEOUT` ends a socket that never drains. While
//! the socket refuses bytes, the session's `socket_full` says so: a session
//! whose client is late is never counted as the node being late
//! (`instance::inbox`).
//!
//! After the session stops, its last frames (the close frame) are flushed,
//! the write side is shut down and the peer gets [`LINGER`] to finish the
//! close handshake, so its close frame never meets a reset.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use actix_http::error::PayloadError;
use actix_http::ws::Codec;
use actix_rt::net::TcpStream;
use actix_web_actors::ws::WebsocketContext;
use bytes::{Buf, Bytes};
use futures_util::{FutureExt, Stream};

use super::frame_watch::{Finding, FrameWatch, FRAME_TOO_BIG, INVALID_CLOSE_REASON};
use super::session::Session;
use crate::instance::messages::SessionShared;

/// Encoded bytes waiting for the socket beyond which the session is not polled.
pub const HIGH_WATER: usize = 32 * 1024;

/// How long a closing connection (WebSocket or HTTP) gives the peer to close its side.
pub const LINGER: Duration = Duration::from_secs(1);

/// The largest read taken at once (a stack buffer; larger messages take several reads).
const READ_CHUNK: usize = 8 * 1024;

/// Buffers written in one `writev`.
const MAX_IOVECS: usize = 32;

/// Runs `session` on `io` until the session stops and the socket is closed.
/// `early` holds bytes the client sent right behind its handshake.
///
/// Not an `async fn`: its arguments would be kept in the connection's task
/// for as long as it lives (the session alone is 72 bytes), beside the
/// context they were moved into. Everything is built here; the future keeps
/// only what it uses.
pub fn serve(
    io: TcpStream,
    early: Bytes,
    session: Session,
    max_frame: usize,
) -> impl Future<Output = ()> {
    let shared = session.shared();
    let io = Arc::new(io);
    shared.direct.attach(io.clone());
    let incoming = Incoming {
        io: io.clone(),
        early: (!early.is_empty()).then(|| Box::new(early)),
        eof: false,
        max_frame: u32::try_from(max_frame).unwrap_or(u32::MAX),
        watch: FrameWatch::default(),
    };
    let frames = WebsocketContext::with_codec(session, incoming, Codec::new().max_size(max_frame));
    // A combinator, not an `async` block: the block would keep the writer
    // twice, once captured and once where it is awaited.
    Outgoing::new(io, frames, shared).then(|outcome| {
        async move {
            match outcome {
                // Boxed: its buffer and timer are not carried by every idle connection.
                Ok(io) => Box::pin(close_gracefully(&io)).await,
                Err(e) => log::debug!("websocket connection ended: {e}"),
            }
        }
    })
}

/// Shuts the write side down and reads (discarding) until the peer closes
/// or [`LINGER`] passes.
async fn close_gracefully(io: &TcpStream) {
    if socket2::SockRef::from(io)
        .shutdown(std::net::Shutdown::Write)
        .is_err()
    {
        return;
    }
    let drain = async {
        let mut buf = [0u8; 512];
        loop {
            if io.readable().await.is_err() {
                return;
            }
            match io.try_read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// The client's bytes, as the session's frame decoder reads them.
struct Incoming {
    io: Arc<TcpStream>,
    /// Bytes sent right behind the handshake (boxed: rare, and this struct
    /// is in every connection).
    early: Option<Box<Bytes>>,
    eof: bool,
    /// The longest data frame taken (the message limit).
    max_frame: u32,
    /// Finds a close frame whose reason is not UTF-8 (1007, not 1002), and
    /// a data frame longer than `max_frame` at its header (1009).
    watch: FrameWatch,
}

impl Incoming {
    /// The chunk as read, or the error that makes the session close with
    /// 1007 when it completes a close frame with an invalid reason, or with
    /// 1009 when it holds the header of a data frame over the limit (nothing
    /// more is read: its payload is never buffered).
    fn checked(&mut self, chunk: Bytes) -> Result<Bytes, PayloadError> {
        let refused = match self.watch.read(&chunk, self.max_frame) {
            Finding::Nothing => return Ok(chunk),
            Finding::InvalidCloseReason => INVALID_CLOSE_REASON,
            Finding::TooBig => FRAME_TOO_BIG,
        };
        self.eof = true;
        Err(PayloadError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            refused,
        )))
    }
}

impl Stream for Incoming {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(early) = self.early.take() {
            return Poll::Ready(Some(self.checked(*early)));
        }
        if self.eof {
            return Poll::Ready(None);
        }
        loop {
            if let Err(e) = ready!(self.io.poll_read_ready(cx)) {
                return Poll::Ready(Some(Err(PayloadError::Io(e))));
            }
            // Only once there is something to read (zeroing it costs).
            let mut buf = [0u8; READ_CHUNK];
            match self.io.try_read(&mut buf) {
                Ok(0) => {
                    self.eof = true;
                    return Poll::Ready(None);
                }
                Ok(n) => {
                    let chunk = Bytes::copy_from_slice(&buf[..n]);
                    return Poll::Ready(Some(self.checked(chunk)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Some(Err(PayloadError::Io(e)))),
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// Takes the session's encoded frames and writes them to the socket.
    /// Ready with `Ok` (and the socket, to close) once the session stopped
    /// and everything was written. The session's context is held inline, so
    /// a connection is one task allocation, not two.
    struct Outgoing<S> {
        #[pin]
        frames: S,
        writer: Writer,
    }
}

/// The socket's side of [`Outgoing`]: frames taken and not yet written.
/// Dropped (the writer finished, or the connection's task was dropped
/// early), it closes the fan-out's direct way to the socket (see
/// `ws::direct`; the session's `stopping` closes it too).
///
/// Every byte here is in every connection's task: the queue is a `Vec`
/// (24 bytes, not a `VecDeque`'s 32), and its byte count a `u32`
/// (saturating; the count only decides when the session is polled).
struct Writer {
    io: Arc<TcpStream>,
    pending: Vec<Bytes>,
    pending_bytes: u32,
    done: bool,
    /// Where the socket refusing bytes is told (`socket_full`).
    shared: Arc<SessionShared>,
}

impl<S> Outgoing<S>
where
    S: Stream<Item = Result<Bytes, actix_web::Error>>,
{
    fn new(io: Arc<TcpStream>, frames: S, shared: Arc<SessionShared>) -> Self {
        Self {
            frames,
            writer: Writer {
                io,
                pending: Vec::new(),
                pending_bytes: 0,
                done: false,
                shared,
            },
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shared.direct.end();
    }
}

impl Writer {
    /// Polls the session for frames while few enough wait for the socket.
    fn take_frames<S>(&mut self, mut frames: Pin<&mut S>, cx: &mut Context<'_>)
    where
        S: Stream<Item = Result<Bytes, actix_web::Error>>,
    {
        while !self.done && (self.pending_bytes as usize) < HIGH_WATER {
            match frames.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    if !bytes.is_empty() {
                        self.count(bytes.len());
                        self.pending.push(bytes);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    log::debug!("websocket frame could not be encoded: {e}");
                    self.done = true;
                }
                Poll::Ready(None) => self.done = true,
                Poll::Pending => return,
            }
        }
    }

    /// Tells the instance whether the socket is refusing bytes.
    fn socket_full(&self, full: bool) {
        // Read first: the line is shared with the instance's thread.
        if self.shared.socket_full.load(Ordering::Relaxed) != full {
            self.shared.socket_full.store(full, Ordering::Release);
        }
    }

    /// Counts `n` more bytes waiting.
    fn count(&mut self, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.pending_bytes = self.pending_bytes.saturating_add(n);
    }

    /// Drops `n` written bytes from the front of the queue.
    fn consume(&mut self, mut n: usize) {
        let counted = u32::try_from(n).unwrap_or(u32::MAX);
        self.pending_bytes = self.pending_bytes.saturating_sub(counted);
        let mut whole = 0;
        for chunk in &mut self.pending {
            if n < chunk.len() {
                chunk.advance(n);
                break;
            }
            n -= chunk.len();
            whole += 1;
        }
        self.pending.drain(..whole);
    }
}

impl<S> Future for Outgoing<S>
where
    S: Stream<Item = Result<Bytes, actix_web::Error>>,
{
    type Output = io::Result<Arc<TcpStream>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut frames = this.frames;
        let w = this.writer;
        // What a direct write left goes first, before the session's frames.
        let rest = w.shared.direct.busy();
        if !rest.is_empty() {
            w.count(rest.len());
            w.pending.insert(0, rest);
        }
        loop {
            w.take_frames(frames.as_mut(), cx);
            if w.pending.is_empty() {
                w.socket_full(false);
                return if w.done {
                    Poll::Ready(Ok(w.io.clone()))
                } else {
                    w.shared.direct.idle();
                    Poll::Pending
                };
            }
            ready!(w.io.poll_write_ready(cx))?;
            let written = if w.pending.len() == 1 {
                w.io.try_write(&w.pending[0])
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let n = slices.len().min(w.pending.len());
                for (slot, chunk) in slices.iter_mut().zip(&w.pending) {
                    *slot = IoSlice::new(chunk);
                }
                w.io.try_write_vectored(&slices[..n])
            };
            match written {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => w.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => w.socket_full(true),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::direct::Direct;
    use std::io::Read;

    /// What a direct write left unwritten goes out before the session's
    /// next frames, however they came.
    #[actix_rt::test]
    async fn the_rest_of_a_direct_write_goes_before_the_sessions_frames() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let io = Arc::new(TcpStream::from_std(server).unwrap());
        let shared = Arc::new(SessionShared::default());
        shared.direct.attach(io.clone());
        shared.direct.idle();
        // Nobody reads yet: direct writes until one is taken in part.
        let chunk = Bytes::from(vec![b'a'; 64 * 1024]);
        let mut written = 0;
        while shared.direct.write(&chunk) == Direct::Written {
            written += chunk.len();
        }
        assert_eq!(
            shared.direct.write(&chunk),
            Direct::Refused,
            "the way closed"
        );
        let frames = futures_util::stream::iter([Ok(Bytes::from_static(b"B"))]);
        let outgoing = Outgoing::new(io.clone(), frames, shared);
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            client.read_to_end(&mut all).unwrap();
            all
        });
        let _ = outgoing.await.unwrap();
        socket2::SockRef::from(&*io)
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
        let all = reader.join().unwrap();
        assert_eq!(all.len(), written + chunk.len() + 1);
        assert!(all[..all.len() - 1].iter().all(|b| *b == b'a'));
        assert_eq!(all.last(), Some(&b'B'));
    }
}
