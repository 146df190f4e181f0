//! What a session does with what the client sends, as plain logic with no
//! actor or socket: size limits over fragmented messages, UTF-8 of text
//! messages, which close code a malformed frame earns, and the heartbeat
//! deadline.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use actix_http::ws::ProtocolError;

use super::close::CloseCode;

/// Tracks a fragmented client message (fragments are counted together).
/// Its state is allocated only while a message is open: every byte here is
/// in every connection's task, and most clients never fragment.
#[derive(Debug, Default)]
pub struct Reassembly {
    /// The fragmented message being received, if one is open.
    open: Option<Box<Open>>,
}

/// A fragmented message between its first and its last fragment.
#[derive(Debug)]
struct Open {
    is_text: bool,
    /// Whether the whole message is kept and handed back (the echo route).
    keep: bool,
    size: usize,
    /// The message so far when kept; otherwise only a text message's
    /// unfinished UTF-8 sequence (at most 3 bytes).
    data: Vec<u8>,
    /// How much of `data` is known to be valid UTF-8.
    checked: usize,
}

/// A whole client message, put together from its fragments.
#[derive(Debug, PartialEq, Eq)]
pub enum Whole {
    Text(String),
    Binary(Vec<u8>),
}

/// What became of a client frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted; nothing more to do.
    Ok,
    /// The last fragment of a kept message: the message.
    Complete(Whole),
    /// Close the connection with this code.
    Close(CloseCode),
}

impl Reassembly {
    /// A first fragment of a text (`is_text`) or binary message; `keep`
    /// keeps the message, to hand it back whole with the last fragment.
    pub fn first(&mut self, is_text: bool, keep: bool, data: &[u8], max: usize) -> Verdict {
        if self.open.take().is_some() {
            return Verdict::Close(CloseCode::ProtocolError);
        }
        self.open = Some(Box::new(Open {
            is_text,
            keep,
            size: 0,
            data: Vec::new(),
            checked: 0,
        }));
        self.more(data, max)
    }

    /// A middle fragment.
    pub fn more(&mut self, data: &[u8], max: usize) -> Verdict {
        let Some(open) = self.open.as_mut() else {
            return Verdict::Close(CloseCode::ProtocolError);
        };
        let keep = open.keep;
        open.size += data.len();
        if open.size > max {
            self.open = None;
            return Verdict::Close(CloseCode::TooBig);
        }
        if open.is_text || keep {
            open.data.extend_from_slice(data);
        }
        if open.is_text {
            // Fail fast on bytes that can never become valid UTF-8.
            match std::str::from_utf8(&open.data[open.checked..]) {
                Ok(_) => open.checked = open.data.len(),
                Err(e) if e.error_len().is_some() => {
                    self.open = None;
                    return Verdict::Close(CloseCode::InvalidUtf8);
                }
                Err(e) => open.checked += e.valid_up_to(),
            }
            if !keep {
                open.data.drain(..open.checked);
                open.checked = 0;
            }
        }
        Verdict::Ok
    }

    /// The last fragment.
    pub fn last(&mut self, data: &[u8], max: usize) -> Verdict {
        let verdict = self.more(data, max);
        if verdict != Verdict::Ok {
            return verdict;
        }
        let Some(open) = self.open.take() else {
            return Verdict::Close(CloseCode::ProtocolError);
        };
        let Open {
            is_text,
            keep,
            data,
            checked,
            ..
        } = *open;
        if is_text && checked != data.len() {
            return Verdict::Close(CloseCode::InvalidUtf8);
        }
        match (keep, is_text) {
            (false, _) => Verdict::Ok,
            (true, true) => match String::from_utf8(data) {
                Ok(text) => Verdict::Complete(Whole::Text(text)),
                Err(_) => Verdict::Close(CloseCode::InvalidUtf8),
            },
            (true, false) => Verdict::Complete(Whole::Binary(data)),
        }
    }

    /// Whether a fragmented message is open (a new data frame then is an error).
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }
}

/// The close code a frame the codec refused earns, or `None` when the
/// connection itself failed and there is nothing to send a close on.
pub fn refusal(error: &ProtocolError) -> Option<CloseCode> {
    match error {
        ProtocolError::Overflow => Some(CloseCode::TooBig),
        // A data frame declaring more than the limit (found at its header
        // by the socket's watch).
        ProtocolError::Io(e) if e.to_string().contains(super::frame_watch::FRAME_TOO_BIG) => {
            Some(CloseCode::TooBig)
        }
        // A text frame that is not UTF-8 (the text is checked after decoding),
        // or a close frame whose reason is not (found by the socket's watch).
        ProtocolError::Io(e) if e.to_string().contains("utf-8") => Some(CloseCode::InvalidUtf8),
        // Non-zero reserved bits.
        ProtocolError::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
            Some(CloseCode::ProtocolError)
        }
        ProtocolError::Io(_) => None,
        // Bad opcodes, unmasked frames, long or malformed control frames,
        // invalid close codes and close reasons, fragments out of order.
        _ => Some(CloseCode::ProtocolError),
    }
}

/// When a client was last heard from, and when that is too long ago.
/// Shared: the session, which hears the client, stamps it; the instance
/// actor, which pings the client, reads it (`SessionShared::heartbeat`).
#[derive(Debug)]
pub struct Heartbeat {
    /// Milliseconds from [`clock_start`] to the last time the client was heard.
    last_heard: AtomicU64,
}

impl Default for Heartbeat {
    /// A client just connected counts as heard.
    fn default() -> Self {
        Self {
            last_heard: AtomicU64::new(since_clock_start(Instant::now())),
        }
    }
}

impl Heartbeat {
    /// Anything from the client (pong, data, ping) counts.
    pub fn heard(&self) {
        let now = since_clock_start(Instant::now());
        self.last_heard.store(now, Ordering::Relaxed);
    }

    /// When the client was last heard from (milliseconds on this clock).
    pub fn last_heard(&self) -> u64 {
        self.last_heard.load(Ordering::Relaxed)
    }

    /// `Some(last_heard)` when the client has been silent longer than
    /// `idle_timeout` at `now`: the caller closes it only if it is still
    /// silent since then ([`Heartbeat::last_heard`] unchanged).
    pub fn silent_since(&self, idle_timeout: Duration, now: Instant) -> Option<u64> {
        let heard = self.last_heard();
        let silent = since_clock_start(now).saturating_sub(heard);
        (u128::from(silent) > idle_timeout.as_millis()).then_some(heard)
    }
}

/// The heartbeats' common origin: the first time one was read or stamped.
fn clock_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn since_clock_start(at: Instant) -> u64 {
    let millis = at.saturating_duration_since(clock_start()).as_millis();
    u64::try_from(millis).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_count_together() {
        let mut r = Reassembly::default();
        assert_eq!(r.first(false, false, &[0; 40], 100), Verdict::Ok);
        assert_eq!(r.more(&[0; 40], 100), Verdict::Ok);
        assert_eq!(r.last(&[0; 40], 100), Verdict::Close(CloseCode::TooBig));
        assert!(!r.is_open());
    }

    #[test]
    fn utf8_split_across_fragments_is_fine() {
        let bytes = "héllo".as_bytes();
        let mut r = Reassembly::default();
        assert_eq!(r.first(true, false, &bytes[..2], 100), Verdict::Ok);
        assert_eq!(r.last(&bytes[2..], 100), Verdict::Ok);
        assert_eq!(
            r.first(true, false, &[0xff], 100),
            Verdict::Close(CloseCode::InvalidUtf8)
        );
        let mut r = Reassembly::default();
        assert_eq!(r.first(true, false, &[0xc3], 100), Verdict::Ok);
        assert_eq!(r.last(&[], 100), Verdict::Close(CloseCode::InvalidUtf8));
    }

    #[test]
    fn continuation_without_start_is_protocol_error() {
        let mut r = Reassembly::default();
        assert_eq!(r.more(b"x", 10), Verdict::Close(CloseCode::ProtocolError));
        assert_eq!(r.first(true, false, b"x", 10), Verdict::Ok);
        assert_eq!(
            r.first(true, false, b"x", 10),
            Verdict::Close(CloseCode::ProtocolError)
        );
    }

    #[test]
    fn utf8_fails_fast_and_remembers_only_the_unfinished_sequence() {
        let euro = "€".as_bytes();
        let mut r = Reassembly::default();
        assert_eq!(r.first(true, false, b"ab", 100), Verdict::Ok);
        assert_eq!(r.more(&euro[..1], 100), Verdict::Ok);
        assert_eq!(r.open.as_ref().map(|o| o.data.len()), Some(1));
        assert_eq!(r.more(&euro[1..], 100), Verdict::Ok);
        assert!(r.open.as_ref().is_some_and(|o| o.data.is_empty()));
        assert_eq!(
            r.more(&[0xed, 0xa0, 0x80], 100),
            Verdict::Close(CloseCode::InvalidUtf8)
        );
        assert!(!r.is_open());
    }

    #[test]
    fn kept_messages_come_back_whole() {
        let mut r = Reassembly::default();
        assert_eq!(r.first(true, true, "hé".as_bytes(), 100), Verdict::Ok);
        assert_eq!(r.more(b"", 100), Verdict::Ok);
        assert_eq!(
            r.last(b"llo", 100),
            Verdict::Complete(Whole::Text("héllo".into()))
        );
        assert_eq!(r.first(false, true, &[0xff], 100), Verdict::Ok);
        assert_eq!(
            r.last(&[0], 100),
            Verdict::Complete(Whole::Binary(vec![0xff, 0]))
        );
        assert_eq!(r.first(false, true, &[0; 60], 100), Verdict::Ok);
        assert_eq!(r.last(&[0; 60], 100), Verdict::Close(CloseCode::TooBig));
        assert!(!r.is_open());
    }

    #[test]
    fn refused_frames_close_with_the_right_code() {
        use std::io::{Error, ErrorKind};
        // What the session sees for a text frame that is not UTF-8.
        let utf8 = String::from_utf8(vec![0xff]).unwrap_err().utf8_error();
        let cases = [
            (ProtocolError::Overflow, Some(CloseCode::TooBig)),
            (
                ProtocolError::Io(Error::other(format!(
                    "I/O error: {}",
                    crate::ws::frame_watch::FRAME_TOO_BIG
                ))),
                Some(CloseCode::TooBig),
            ),
            (
                ProtocolError::Io(Error::other(format!(
                    "I/O error: {}",
                    crate::ws::frame_watch::INVALID_CLOSE_REASON
                ))),
                Some(CloseCode::InvalidUtf8),
            ),
            (
                ProtocolError::Io(Error::other(utf8.to_string())),
                Some(CloseCode::InvalidUtf8),
            ),
            (
                ProtocolError::Io(Error::new(ErrorKind::InvalidData, "reserved bits")),
                Some(CloseCode::ProtocolError),
            ),
            (ProtocolError::Io(Error::other("connection reset")), None),
            (ProtocolError::BadOpCode, Some(CloseCode::ProtocolError)),
            (
                ProtocolError::InvalidLength(1),
                Some(CloseCode::ProtocolError),
            ),
            (
                ProtocolError::ContinuationStarted,
                Some(CloseCode::ProtocolError),
            ),
        ];
        for (error, code) in cases {
            assert_eq!(refusal(&error), code, "{error:?}");
        }
    }

    #[test]
    fn heartbeat_expires() {
        let hb = Heartbeat::default();
        let timeout = Duration::from_millis(10);
        assert_eq!(hb.silent_since(timeout, Instant::now()), None);
        let later = Instant::now() + Duration::from_millis(20);
        assert_eq!(hb.silent_since(timeout, later), Some(hb.last_heard()));
        std::thread::sleep(Duration::from_millis(20));
        let before = hb.last_heard();
        hb.heard();
        assert_ne!(hb.last_heard(), before);
        assert_eq!(hb.silent_since(timeout, Instant::now()), None);
    }
}
