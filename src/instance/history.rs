//! One instance's history of recent events on this node (contract §12): a
//! ring bounded by count, age and bytes, numbering each event it keeps with
//! an offset within an epoch. Held by the instance actor beside its sessions;
//! an instance without history (`ws.history_size = 0`) holds none of this.
//!
//! The bytes bound counts each event's envelope once; an entry that was
//! replayed also keeps its stamped copy (made at its first replay, shared by
//! the next), so a history's memory stays under about twice that bound.
//!
//! It owns the numbering and the bounds only: which sessions get what, and
//! the filters, stay with the actor. It never touches the database or the bus.

use std::cell::OnceCell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytestring::ByteString;

use crate::domain::EventKind;
use crate::settings::WsSettings;

/// The bounds of every instance's history, from the `[ws]` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Events kept; never 0 (no history is `None` instead).
    pub size: usize,
    /// How long an event stays.
    pub ttl: Duration,
    /// Bytes of envelopes (media kept) kept at most.
    pub bytes: usize,
}

impl HistoryLimits {
    /// The limits, or `None` when no history is kept (`ws.history_size = 0`).
    pub fn from_settings(ws: &WsSettings) -> Option<Self> {
        (ws.history_size > 0).then(|| Self {
            size: ws.history_size,
            ttl: Duration::from_secs(ws.history_ttl_secs),
            bytes: ws.history_bytes,
        })
    }
}

/// One kept event.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its offset within the epoch.
    pub offset: u64,
    /// When it was accepted (for the age bound).
    pub at: Instant,
    pub kind: EventKind,
    /// Its envelope as published (media kept), without offset or epoch.
    pub frame: ByteString,
    /// The envelope without `data.message.media.base64`, when the event
    /// carries one (for instances without mediaBase64); not counted in bytes.
    pub stripped: Option<ByteString>,
    /// `frame_for(true)` and `frame_for(false)` stamped with the offset and
    /// epoch, made at the entry's first replay and shared by every later
    /// one (a reconnect storm replays each entry to thousands of sessions).
    stamped: [OnceCell<ByteString>; 2],
}

impl Entry {
    /// The envelope as an instance with or without mediaBase64 sends it.
    pub fn frame_for(&self, media_base64: bool) -> &ByteString {
        match (&self.stripped, media_base64) {
            (Some(stripped), false) => stripped,
            _ => &self.frame,
        }
    }
}

/// One instance's ring of recent events, numbered within one epoch.
#[derive(Debug)]
pub struct History {
    limits: HistoryLimits,
    /// Names this numbering; new with every history (every actor start).
    epoch: Arc<str>,
    /// The epoch as a JSON string literal, quotes included.
    epoch_json: Arc<str>,
    entries: VecDeque<Entry>,
    /// Sum of the kept frames' lengths.
    bytes: usize,
    /// The latest offset given (0: none yet).
    latest: u64,
    /// The highest offset that left the ring (0: none has).
    dropped: u64,
}

impl History {
    /// An empty history with a fresh epoch.
    pub fn new(limits: HistoryLimits) -> Self {
        Self::with_epoch(limits, crate::auth::generate_token()[..16].to_string())
    }

    /// An empty history named `epoch`.
    pub fn with_epoch(limits: HistoryLimits, epoch: String) -> Self {
        let epoch_json: Arc<str> = serde_json::Value::String(epoch.clone()).to_string().into();
        Self {
            limits,
            epoch: epoch.into(),
            epoch_json,
            entries: VecDeque::new(),
            bytes: 0,
            latest: 0,
            dropped: 0,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The latest offset given in this epoch (0: none yet).
    pub fn latest(&self) -> u64 {
        self.latest
    }

    /// Keeps one accepted event and returns its offset; the oldest leave
    /// by count, age and bytes.
    pub fn push(
        &mut self,
        kind: EventKind,
        frame: ByteString,
        stripped: Option<ByteString>,
        now: Instant,
    ) -> u64 {
        self.latest += 1;
        self.bytes += frame.len();
        self.entries.push_back(Entry {
            offset: self.latest,
            at: now,
            kind,
            frame,
            stripped,
            stamped: Default::default(),
        });
        self.trim(now);
        self.latest
    }

    /// Keeps an event numbered elsewhere (the shared history) with `offset`,
    /// above every offset kept so far.
    pub fn push_at(
        &mut self,
        offset: u64,
        kind: EventKind,
        frame: ByteString,
        stripped: Option<ByteString>,
        at: Instant,
        now: Instant,
    ) {
        self.latest = self.latest.max(offset.saturating_sub(1));
        self.push(kind, frame, stripped, at);
        self.trim(now);
    }

    /// Forgets every kept event and everything up to `floor` (what the
    /// shared history lost before this node saw it).
    pub fn restart_after(&mut self, floor: u64) {
        self.entries.clear();
        self.bytes = 0;
        self.dropped = self.dropped.max(floor);
        self.latest = self.latest.max(floor);
    }

    /// Drops what is past the bounds at `now`.
    pub fn trim(&mut self, now: Instant) {
        while let Some(front) = self.entries.front() {
            let too_old = now.saturating_duration_since(front.at) > self.limits.ttl;
            let over = self.entries.len() > self.limits.size || self.bytes > self.limits.bytes;
            if !(too_old || over) {
                break;
            }
            if let Some(gone) = self.entries.pop_front() {
                self.bytes -= gone.frame.len();
                self.dropped = gone.offset;
            }
        }
    }

    /// Whether every event after `since` is still kept (at `now`).
    pub fn covers(&mut self, since: u64, now: Instant) -> bool {
        self.trim(now);
        since >= self.dropped && since <= self.latest
    }

    /// The kept events after `since`, oldest first.
    pub fn after(&self, since: u64) -> impl Iterator<Item = &Entry> {
        let start = self.entries.partition_point(|e| e.offset <= since);
        self.entries.range(start..)
    }

    /// `frame` (an envelope) with this epoch's `"offset"` and `"epoch"` keys.
    pub fn stamp(&self, frame: &str, offset: u64) -> ByteString {
        stamp(frame, offset, &self.epoch_json)
    }

    /// A kept entry's envelope as an instance with or without mediaBase64
    /// sends it, stamped (made once per entry and media setting).
    pub fn stamped(&self, entry: &Entry, media_base64: bool) -> ByteString {
        entry.stamped[usize::from(media_base64)]
            .get_or_init(|| self.stamp(entry.frame_for(media_base64), entry.offset))
            .clone()
    }

    /// How many events are kept, and their bytes.
    pub fn size(&self) -> (usize, usize) {
        (self.entries.len(), self.bytes)
    }
}

/// `frame`, a JSON object, with `"offset"` and `"epoch"` (a JSON string
/// literal) added as its last keys.
pub fn stamp(frame: &str, offset: u64, epoch_json: &str) -> ByteString {
    let body = frame.strip_suffix('}').unwrap_or(frame);
    let mut out = String::with_capacity(frame.len() + 32 + epoch_json.len());
    out.push_str(body);
    out.push_str(",\"offset\":");
    out.push_str(&offset.to_string());
    out.push_str(",\"epoch\":");
    out.push_str(epoch_json);
    out.push('}');
    ByteString::from(out)
}

/// The first frame of a client that opted in (contract §12).
/// Keys in the contract's order.
pub fn recovery_frame(recovered: bool, epoch: &str, offset: u64) -> ByteString {
    let epoch = serde_json::Value::String(epoch.to_string());
    ByteString::from(format!(
        "{{\"event\":\"connection.recovery\",\"data\":{{\"recovered\":{recovered},\"epoch\":{epoch},\"offset\":{offset}}}}}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(size: usize, ttl: u64, bytes: usize) -> HistoryLimits {
        HistoryLimits {
            size,
            ttl: Duration::from_secs(ttl),
            bytes,
        }
    }

    fn push(h: &mut History, text: &str, now: Instant) -> u64 {
        h.push(
            EventKind::CallUpdate,
            ByteString::from(text.to_string()),
            None,
            now,
        )
    }

    #[test]
    fn offsets_increase_and_the_oldest_leave_by_count() {
        let now = Instant::now();
        let mut h = History::new(limits(3, 60, 1 << 20));
        assert!(h.covers(0, now));
        for i in 1..=5 {
            assert_eq!(push(&mut h, "{}", now), i);
        }
        assert_eq!(h.size().0, 3);
        assert!(!h.covers(1, now));
        assert!(h.covers(2, now));
        assert!(h.covers(5, now));
        assert!(!h.covers(6, now));
        assert_eq!(h.after(3).map(|e| e.offset).collect::<Vec<_>>(), [4, 5]);
    }

    #[test]
    fn the_oldest_leave_by_bytes_and_age() {
        let now = Instant::now();
        let mut h = History::new(limits(100, 60, 10));
        push(&mut h, "{\"a\":1}", now);
        push(&mut h, "{\"b\":1}", now);
        assert_eq!(h.size(), (1, 7));
        assert!(!h.covers(0, now) && h.covers(1, now));
        let later = now + Duration::from_secs(61);
        assert!(!h.covers(1, later));
        assert!(h.covers(2, later));
        assert_eq!(h.size(), (0, 0));
    }

    #[test]
    fn an_entry_is_stamped_once_per_media_setting_and_shared() {
        let now = Instant::now();
        let mut h = History::with_epoch(limits(4, 60, 1 << 20), "e".into());
        h.push(
            EventKind::MessageExchange,
            ByteString::from_static(r#"{"m":"kept"}"#),
            Some(ByteString::from_static(r#"{"m":"stripped"}"#)),
            now,
        );
        let entry = h.after(0).next().unwrap();
        let (kept, again) = (h.stamped(entry, true), h.stamped(entry, true));
        assert_eq!(&*kept, r#"{"m":"kept","offset":1,"epoch":"e"}"#);
        assert_eq!(kept.as_bytes().as_ptr(), again.as_bytes().as_ptr());
        assert_eq!(
            &*h.stamped(entry, false),
            r#"{"m":"stripped","offset":1,"epoch":"e"}"#
        );
    }

    #[test]
    fn stamped_frames_and_the_recovery_frame() {
        let h = History::with_epoch(limits(1, 1, 1), "ab\"c".into());
        let v: serde_json::Value = serde_json::from_str(&h.stamp("{\"event\":\"x\"}", 7)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"x","offset":7,"epoch":"ab\"c"})
        );
        assert_eq!(
            &*recovery_frame(true, "e1", 5),
            r#"{"event":"connection.recovery","data":{"recovered":true,"epoch":"e1","offset":5}}"#
        );
        let v: serde_json::Value = serde_json::from_str(&recovery_frame(false, "", 0)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"connection.recovery","data":{"recovered":false,"epoch":"","offset":0}})
        );
    }
}
