//! What a session does with what the client sends, as plain logic with no
//! actor or socket: size limits over fragmented messages, UTF-8 of text
//! messages, and the heartbeat deadline.

use std::time::{Duration, Instant};

use super::close::CloseCode;

/// Tracks a fragmented client message (fragments are counted together).
#[derive(Debug, Default)]
pub struct Reassembly {
    /// `Some(is_text)` while a fragmented message is open.
    open: Option<bool>,
    size: usize,
    /// Text fragments kept for the UTF-8 check at the end (binary: size only).
    text: Vec<u8>,
}

/// What became of a client frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted (and ignored: client data is not used).
    Ok,
    /// Close the connection with this code.
    Close(CloseCode),
}

impl Reassembly {
    /// A first fragment of a text (`is_text`) or binary message.
    pub fn first(&mut self, is_text: bool, data: &[u8], max: usize) -> Verdict {
        if self.open.is_some() {
            return Verdict::Close(CloseCode::PROTOCOL_ERROR);
        }
        self.open = Some(is_text);
        self.size = 0;
        self.text.clear();
        self.more(data, max)
    }

    /// A middle fragment.
    pub fn more(&mut self, data: &[u8], max: usize) -> Verdict {
        let Some(is_text) = self.open else {
            return Verdict::Close(CloseCode::PROTOCOL_ERROR);
        };
        self.size += data.len();
        if self.size > max {
            self.reset();
            return Verdict::Close(CloseCode::TOO_BIG);
        }
        if is_text {
            self.text.extend_from_slice(data);
            // Fail fast on bytes that can never become valid UTF-8.
            if let Err(e) = std::str::from_utf8(&self.text) {
                if e.error_len().is_some() {
                    self.reset();
                    return Verdict::Close(CloseCode::INVALID_UTF8);
                }
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
        let valid = self.open != Some(true) || std::str::from_utf8(&self.text).is_ok();
        self.reset();
        if valid {
            Verdict::Ok
        } else {
            Verdict::Close(CloseCode::INVALID_UTF8)
        }
    }

    /// Whether a fragmented message is open (a new data frame then is an error).
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    fn reset(&mut self) {
        self.open = None;
        self.size = 0;
        self.text = Vec::new();
    }
}

/// When a client was last heard from, and when that is too long ago.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    last_heard: Instant,
    idle_timeout: Duration,
}

impl Heartbeat {
    pub fn new(idle_timeout: Duration) -> Self {
        Self {
            last_heard: Instant::now(),
            idle_timeout,
        }
    }

    /// Anything from the client (pong, data, ping) counts.
    pub fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// Whether the client has been silent longer than the timeout at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.last_heard) > self.idle_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_count_together() {
        let mut r = Reassembly::default();
        assert_eq!(r.first(false, &[0; 40], 100), Verdict::Ok);
        assert_eq!(r.more(&[0; 40], 100), Verdict::Ok);
        assert_eq!(r.last(&[0; 40], 100), Verdict::Close(CloseCode::TOO_BIG));
        assert!(!r.is_open());
    }

    #[test]
    fn utf8_split_across_fragments_is_fine() {
        let bytes = "héllo".as_bytes();
        let mut r = Reassembly::default();
        assert_eq!(r.first(true, &bytes[..2], 100), Verdict::Ok);
        assert_eq!(r.last(&bytes[2..], 100), Verdict::Ok);
        assert_eq!(
            r.first(true, &[0xff], 100),
            Verdict::Close(CloseCode::INVALID_UTF8)
        );
        let mut r = Reassembly::default();
        assert_eq!(r.first(true, &[0xc3], 100), Verdict::Ok);
        assert_eq!(r.last(&[], 100), Verdict::Close(CloseCode::INVALID_UTF8));
    }

    #[test]
    fn continuation_without_start_is_protocol_error() {
        let mut r = Reassembly::default();
        assert_eq!(r.more(b"x", 10), Verdict::Close(CloseCode::PROTOCOL_ERROR));
        assert_eq!(r.first(true, b"x", 10), Verdict::Ok);
        assert_eq!(
            r.first(true, b"x", 10),
            Verdict::Close(CloseCode::PROTOCOL_ERROR)
        );
    }

    #[test]
    fn heartbeat_expires() {
        let hb = Heartbeat::new(Duration::from_millis(10));
        assert!(!hb.expired(Instant::now()));
        assert!(hb.expired(Instant::now() + Duration::from_millis(20)));
    }
}
