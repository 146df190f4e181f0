//! A light watch over the client's raw bytes, at frame headers, for two
//! things the frame decoder gets wrong:
//! - a close frame whose reason is not UTF-8: actix-http refuses it with the
//!   same error as an unknown opcode (which earns 1002), while contract §6
//!   (and RFC 6455 §8.1) close it with 1007;
//! - a data frame whose header declares more than the message limit:
//!   actix-http compares the length with its limit only once the whole
//!   frame has arrived, buffering all of it meanwhile (a client declaring
//!   a gigabyte made the server hold whatever it sent); the watch refuses
//!   it at its header (1009).
//!
//! The watch only follows frame boundaries (headers are at most 14 bytes;
//! payloads of other frames are skipped without being looked at) and keeps a
//! close frame's payload (at most 125 bytes) while it arrives. It holds no
//! buffer while idle.

/// Longest payload of a control frame (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Longest frame header: 2 bytes, 8 of extended length, 4 of mask key.
const MAX_HEADER: usize = 14;

/// The opcode of a close frame.
const OPCODE_CLOSE: u8 = 0x8;

/// The last data opcode: continuation (0), text (1), binary (2); the others
/// are control frames or reserved (the decoder's business: 1002).
const OPCODE_LAST_DATA: u8 = 0x2;

/// The message the socket pump fails the client's stream with when the watch
/// finds such a frame; [`super::rules::refusal`] turns it into 1007.
pub const INVALID_CLOSE_REASON: &str = "close frame reason is not valid utf-8";

/// The message the socket pump fails the client's stream with when a data
/// frame declares more than the limit; [`super::rules::refusal`] turns it
/// into 1009.
pub const FRAME_TOO_BIG: &str = "data frame longer than the message limit";

/// What the watch found in the bytes it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    Nothing,
    /// A complete close frame whose reason is not UTF-8.
    InvalidCloseReason,
    /// A data frame header declaring more than the limit.
    TooBig,
}

/// Follows the frames of one connection's incoming bytes.
#[derive(Debug, Default)]
pub struct FrameWatch {
    header: [u8; MAX_HEADER],
    have: u8,
    /// Payload bytes of a frame that is not a close, still to pass.
    skip: u64,
    /// A close frame's payload while it arrives.
    close: Option<Box<ClosePayload>>,
}

#[derive(Debug)]
struct ClosePayload {
    mask: Option<[u8; 4]>,
    len: usize,
    data: Vec<u8>,
}

impl FrameWatch {
    /// Reads `bytes` (the next bytes of the stream): what they complete, a
    /// close frame whose reason is not UTF-8 or the header of a data frame
    /// (text, binary or continuation) longer than `max_payload`.
    pub fn read(&mut self, mut bytes: &[u8], max_payload: u32) -> Finding {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = usize::try_from(self.skip)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            if let Some(close) = self.close.as_mut() {
                let n = (close.len - close.data.len()).min(bytes.len());
                close.data.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if close.data.len() == close.len {
                    let done = self.close.take();
                    if done.is_some_and(|c| !c.reason_is_utf8()) {
                        return Finding::InvalidCloseReason;
                    }
                }
                continue;
            }
            let have = usize::from(self.have);
            self.header[have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if let Some((opcode, len, mask)) = self.parse_header() {
                self.have = 0;
                if opcode <= OPCODE_LAST_DATA && len > u64::from(max_payload) {
                    return Finding::TooBig;
                }
                match usize::try_from(len) {
                    Ok(len) if opcode == OPCODE_CLOSE && len <= MAX_CONTROL_PAYLOAD => {
                        if len > 0 {
                            self.close = Some(Box::new(ClosePayload {
                                mask,
                                len,
                                data: Vec::with_capacity(len),
                            }));
                        }
                    }
                    _ => self.skip = len,
                }
            }
        }
        Finding::Nothing
    }

    /// The opcode, payload length and mask key once the header is complete.
    fn parse_header(&self) -> Option<(u8, u64, Option<[u8; 4]>)> {
        let h = &self.header[..usize::from(self.have)];
        if h.len() < 2 {
            return None;
        }
        let masked = h[1] & 0x80 != 0;
        let (ext, len7) = match h[1] & 0x7f {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(u64::from(n))),
        };
        let total = 2 + ext + if masked { 4 } else { 0 };
        if h.len() < total {
            return None;
        }
        let len = len7.unwrap_or_else(|| {
            h[2..2 + ext]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        });
        let mask = masked.then(|| [h[2 + ext], h[3 + ext], h[4 + ext], h[5 + ext]]);
        Some((h[0] & 0x0f, len, mask))
    }
}

impl ClosePayload {
    fn reason_is_utf8(mut self) -> bool {
        if let Some(mask) = self.mask {
            for (i, b) in self.data.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        self.data.len() <= 2 || std::str::from_utf8(&self.data[2..]).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    #[test]
    fn finds_an_invalid_reason_after_other_frames_at_any_split() {
        let mut stream = frame(0x1, b"hello", [1, 2, 3, 4]);
        stream.extend(frame(0x2, &vec![7u8; 70_000], [9, 9, 9, 9]));
        stream.extend(frame(0xA, b"pong", [0, 1, 0, 1]));
        stream.extend(frame(OPCODE_CLOSE, &[0x03, 0xe8, 0xff, 0xfe], [5, 6, 7, 8]));
        for split in [1, 2, 3, 7, 100, stream.len()] {
            let mut watch = FrameWatch::default();
            let found: Vec<Finding> = stream
                .chunks(split)
                .map(|c| watch.read(c, 100_000))
                .filter(|f| *f != Finding::Nothing)
                .collect();
            assert_eq!(found, [Finding::InvalidCloseReason], "split {split}");
        }
    }

    #[test]
    fn valid_and_empty_close_reasons_pass() {
        for payload in [
            &b""[..],
            &[0x03, 0xe8],
            &[0x03, 0xe8, b'o', b'k'],
            "\u{e9}t\u{e9}".as_bytes(),
        ] {
            let mut watch = FrameWatch::default();
            let close = frame(OPCODE_CLOSE, payload, [1, 2, 3, 4]);
            assert!(close
                .chunks(1)
                .all(|c| watch.read(c, 100) == Finding::Nothing));
        }
        // A text frame of invalid UTF-8 is not this watch's business.
        let mut watch = FrameWatch::default();
        assert_eq!(
            watch.read(&frame(0x1, &[0xff, 0xfe, 0xfd], [0; 4]), 100),
            Finding::Nothing
        );
    }

    #[test]
    fn a_data_frame_over_the_limit_is_found_at_its_header() {
        // Every length form (7-bit, 16-bit, 64-bit), after a frame that fits.
        for (limit, over) in [(100u32, 101usize), (1_000, 1_001), (65_536, 70_000)] {
            for opcode in [0x0, 0x1, 0x2] {
                let mut stream = frame(0x1, &vec![b'a'; limit as usize], [1, 2, 3, 4]);
                let at = stream.len();
                stream.extend(frame(opcode, &vec![b'b'; over], [5, 6, 7, 8]));
                // Only the header of the long frame: its payload never comes.
                let header = if over < 126 {
                    6
                } else if over <= 0xffff {
                    8
                } else {
                    14
                };
                let mut watch = FrameWatch::default();
                assert_eq!(watch.read(&stream[..at], limit), Finding::Nothing);
                let found: Vec<Finding> = stream[at..at + header]
                    .chunks(1)
                    .map(|c| watch.read(c, limit))
                    .collect();
                assert_eq!(found.last(), Some(&Finding::TooBig), "{opcode} {over}");
                assert!(found[..header - 1].iter().all(|f| *f == Finding::Nothing));
            }
        }
        // A declared gigabyte, and a control frame over the limit (the
        // decoder's business: 1002).
        let mut watch = FrameWatch::default();
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 30).to_be_bytes());
        huge.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(watch.read(&huge, 65_536), Finding::TooBig);
        let mut watch = FrameWatch::default();
        assert_eq!(
            watch.read(&frame(0x9, &[0; 125], [0; 4]), 100),
            Finding::Nothing
        );
        // A reserved opcode is the decoder's business too (1002), whatever its length.
        let mut reserved = huge.clone();
        reserved[0] = 0x83;
        assert_eq!(
            FrameWatch::default().read(&reserved, 65_536),
            Finding::Nothing
        );
    }
}
