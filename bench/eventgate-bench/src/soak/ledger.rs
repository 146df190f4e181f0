//! The soak's books: what was published and acknowledged, what each
//! instance's WebSocket settings were and when they changed, each session's
//! life and what it received, the faults and their windows, HTTP failures —
//! and the verdict drawn from them. Owns deciding what a client should have
//! received; must not talk to a server.

use std::collections::HashMap;
use std::fmt;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use super::receiver::Receivers;

/// How long after its join a session may still miss events (the join, and
/// in a cluster the node's interest subscription, settle).
const JOIN_SLACK_SECS: f64 = 1.0;

/// How long an acknowledged event may take to reach a connected client.
const DELIVERY_SLACK_SECS: f64 = 3.0;

/// Around a settings change, events are not counted either way.
const CHANGE_SLACK_SECS: f64 = 1.0;

/// After a fault ends, WebSocket delivery gets this long to be whole again.
const FAULT_TAIL_SECS: f64 = 10.0;

/// A live delivery slower than this is listed (with its node and instance).
const SLOW_DELIVERY_US: u64 = 1_000_000;

/// Where slow deliveries happened: (second of the run, node, instance).
type SlowAt = (u64, usize, String);
/// How many deliveries were slow there, and the slowest (µs).
type SlowCount = (u64, u64);

/// A fault injected into the soak.
#[derive(Debug, Clone)]
pub(crate) enum Fault {
    ReceiverDown { receiver: usize, secs: f64 },
    KillNode { node: usize },
    RestartNats,
    RestartPostgres,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::ReceiverDown { receiver, secs } => {
                write!(f, "webhook receiver {receiver} down for {secs:.0} s")
            }
            Fault::KillNode { node } => write!(f, "node {node} killed (SIGKILL) and restarted"),
            Fault::RestartNats => f.write_str("NATS restarted"),
            Fault::RestartPostgres => f.write_str("PostgreSQL restarted"),
        }
    }
}

impl Fault {
    /// Whether WebSocket delivery may lose events during it (the contract
    /// allows that; webhooks must lose nothing whatever the fault).
    fn excuses_websocket(&self) -> bool {
        !matches!(self, Fault::ReceiverDown { .. })
    }
}

/// An instance's WebSocket settings as the soak set them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WsState {
    pub(crate) enabled: bool,
    /// Kinds (indexes into `KINDS`); empty = all six.
    pub(crate) events: Vec<usize>,
    pub(crate) media: bool,
}

impl WsState {
    pub(crate) fn all(media: bool) -> WsState {
        WsState {
            enabled: true,
            events: Vec::new(),
            media,
        }
    }

    pub(crate) fn disabled() -> WsState {
        WsState {
            enabled: false,
            events: Vec::new(),
            media: false,
        }
    }

    fn passes(&self, kind: usize) -> bool {
        self.enabled && (self.events.is_empty() || self.events.contains(&kind))
    }
}

/// One acknowledged published event.
#[derive(Debug, Clone, Copy)]
struct Published {
    seq: u64,
    /// The node that accepted it.
    node: usize,
    kind: usize,
    t_send: f64,
    t_ack: f64,
}

/// A settings change: acknowledged (`Some`) or of unknown outcome (`None`).
#[derive(Debug, Clone)]
struct Change {
    t_send: f64,
    t_ack: f64,
    state: Option<WsState>,
}

/// One WebSocket session's life and what it received.
#[derive(Debug, Default)]
pub(crate) struct Session {
    pub(crate) instance: String,
    /// The node it was connected to.
    pub(crate) node: usize,
    /// Sessions that continue each other by recovery share a chain.
    pub(crate) chain: u64,
    pub(crate) narrowing: Option<Vec<usize>>,
    pub(crate) t_join: f64,
    pub(crate) t_leave: f64,
    /// (seq, media present, seconds into the run) of every event received,
    /// in order.
    pub(crate) received: Vec<(u64, bool, f32)>,
    /// The answer of its `connection.recovery` frame when it asked to recover.
    pub(crate) recovered: Option<bool>,
    /// The position it asked to recover from: (epoch, since).
    pub(crate) resumed_from: Option<(String, u64)>,
    /// Envelopes whose epoch differed from the one before (the numbering
    /// changed under the session).
    pub(crate) epoch_changes: u32,
    /// A close the client did not ask for: code (None: the connection broke).
    pub(crate) closed_by_server: Option<Option<u16>>,
}

/// Everything the soak counted.
#[derive(Default)]
pub(crate) struct Ledger {
    inner: Mutex<Books>,
}

#[derive(Default)]
struct Books {
    published: HashMap<String, Vec<Published>>,
    settings: HashMap<String, Vec<Change>>,
    sessions: Vec<Session>,
    faults: Vec<(Fault, f64, f64)>,
    http_5xx: Vec<(f64, String, u16)>,
    http_other: Vec<(f64, String, String)>,
    problems: Vec<(f64, String)>,
    /// Publish → receive latency per second of the run, in microseconds.
    latency: HashMap<u64, Option<Histogram<u64>>>,
    /// Live deliveries slower than [`SLOW_DELIVERY_US`] by (second, node,
    /// instance): how many, and the slowest (µs).
    slow: HashMap<SlowAt, SlowCount>,
    delivered_ws: u64,
    dead_letters_retried: u64,
    ephemeral_rounds: u64,
}

/// What the books say at the end.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct Verdict {
    pub(crate) events_acknowledged: u64,
    pub(crate) ws_sessions: u64,
    pub(crate) ws_expected: u64,
    pub(crate) ws_delivered: u64,
    pub(crate) ws_lost_unexplained: u64,
    pub(crate) ws_lost_in_fault_windows: u64,
    pub(crate) ws_duplicates: u64,
    pub(crate) ws_filter_violations: u64,
    pub(crate) ws_media_mismatches: u64,
    pub(crate) ws_unexpected_closes: u64,
    pub(crate) ws_closes_in_fault_windows: u64,
    pub(crate) recoveries_true: u64,
    pub(crate) recoveries_false: u64,
    pub(crate) webhook_expected: u64,
    pub(crate) webhook_lost: u64,
    pub(crate) webhook_duplicates: u64,
    pub(crate) webhook_media_mismatches: u64,
    pub(crate) dead_letters_retried: u64,
    pub(crate) http_5xx_outside_faults: u64,
    pub(crate) http_5xx_in_fault_windows: u64,
    pub(crate) http_errors_outside_faults: u64,
    pub(crate) ephemeral_rounds: u64,
    pub(crate) problems: Vec<String>,
    /// The first WebSocket events lost outside fault windows, delivered
    /// against the filters or with the wrong media treatment, each with its
    /// session and the settings changes around it.
    pub(crate) ws_misses: Vec<String>,
    /// The first WebSocket events a chain of sessions received twice, each
    /// with the sessions that received it.
    pub(crate) ws_duplicate_notes: Vec<String>,
    /// The slowest seconds of live delivery (over 1 s) by node and instance.
    pub(crate) slow_deliveries: Vec<String>,
    /// Per fault: what it did.
    pub(crate) faults: Vec<FaultEffect>,
}

/// What one fault did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct FaultEffect {
    pub(crate) fault: String,
    pub(crate) start_secs: f64,
    pub(crate) end_secs: f64,
    pub(crate) ws_events_not_delivered: u64,
    pub(crate) ws_closes: u64,
    pub(crate) http_5xx: u64,
    pub(crate) http_errors: u64,
}

impl Ledger {
    pub(crate) fn published(
        &self,
        instance: &str,
        node: usize,
        items: &[(u64, usize)],
        t_send: f64,
        t_ack: f64,
    ) {
        let mut b = self.inner.lock();
        let list = b.published.entry(instance.to_string()).or_default();
        list.extend(items.iter().map(|&(seq, kind)| Published {
            seq,
            node,
            kind,
            t_send,
            t_ack,
        }));
    }

    pub(crate) fn settings_changed(&self, instance: &str, t_send: f64, t_ack: f64, state: WsState) {
        let mut b = self.inner.lock();
        b.settings
            .entry(instance.to_string())
            .or_default()
            .push(Change {
                t_send,
                t_ack,
                state: Some(state),
            });
    }

    pub(crate) fn settings_unknown(&self, instance: &str, t_send: f64) {
        let mut b = self.inner.lock();
        b.settings
            .entry(instance.to_string())
            .or_default()
            .push(Change {
                t_send,
                t_ack: f64::INFINITY,
                state: None,
            });
    }

    pub(crate) fn session(&self, session: Session) {
        self.inner.lock().sessions.push(session);
    }

    /// One envelope received `second`s into the run, `latency_us` after its
    /// publish; a replayed one (a recovery's, published while the client was
    /// away) counts as delivered but not in the latency, which would then
    /// measure how long clients stayed away. `at` is the session's node and
    /// instance.
    pub(crate) fn delivered(
        &self,
        second: u64,
        latency_us: u64,
        replayed: bool,
        at: (usize, &str),
    ) {
        let mut b = self.inner.lock();
        b.delivered_ws += 1;
        if replayed {
            return;
        }
        if latency_us > SLOW_DELIVERY_US {
            let slow = b.slow.entry((second, at.0, at.1.to_string())).or_default();
            slow.0 += 1;
            slow.1 = slow.1.max(latency_us);
        }
        if let Some(h) = b
            .latency
            .entry(second)
            .or_insert_with(new_histogram)
            .as_mut()
        {
            let _ = h.record(latency_us.max(1));
        }
    }

    pub(crate) fn delivered_total(&self) -> u64 {
        self.inner.lock().delivered_ws
    }

    /// p99 of the publish → receive latency of one second of the run, in ms.
    pub(crate) fn p99_of(&self, second: u64) -> Option<f64> {
        let b = self.inner.lock();
        b.latency
            .get(&second)
            .and_then(|h| h.as_ref())
            .map(|h| h.value_at_quantile(0.99) as f64 / 1000.0)
    }

    /// p99 over a span of seconds, in ms.
    pub(crate) fn p99_between(&self, from: u64, to: u64) -> Option<f64> {
        let b = self.inner.lock();
        let mut all = new_histogram()?;
        for s in from..to {
            if let Some(Some(h)) = b.latency.get(&s) {
                let _ = all.add(h);
            }
        }
        (!all.is_empty()).then(|| all.value_at_quantile(0.99) as f64 / 1000.0)
    }

    pub(crate) fn http_status(&self, what: &str, status: u16, t: f64, body: &str) {
        let mut b = self.inner.lock();
        if status >= 500 {
            b.http_5xx.push((t, what.to_string(), status));
        } else {
            let short: String = body.chars().take(160).collect();
            b.http_other
                .push((t, what.to_string(), format!("{status} {short}")));
        }
    }

    pub(crate) fn http_error(&self, what: &str, t: f64, error: &str) {
        self.inner
            .lock()
            .http_other
            .push((t, what.to_string(), error.to_string()));
    }

    pub(crate) fn problem(&self, t: f64, what: String) {
        eprintln!("soak: {t:.0} s: {what}");
        self.inner.lock().problems.push((t, what));
    }

    pub(crate) fn fault(&self, fault: Fault, start: f64, end: f64) {
        self.inner.lock().faults.push((fault, start, end));
    }

    pub(crate) fn dead_letters_retried(&self, n: u64) {
        self.inner.lock().dead_letters_retried += n;
    }

    pub(crate) fn ephemeral_round(&self) {
        self.inner.lock().ephemeral_rounds += 1;
    }

    pub(crate) fn count_5xx(&self) -> u64 {
        self.inner.lock().http_5xx.len() as u64
    }

    /// Whether `t` lies in a window where WebSocket delivery may fail.
    pub(crate) fn in_ws_fault(&self, from: f64, to: f64) -> bool {
        let b = self.inner.lock();
        ws_fault_at(&b.faults, from, to).is_some()
    }

    /// Acknowledged events whose webhook delivery has not arrived.
    pub(crate) fn webhook_missing(&self, receivers: &Receivers) -> u64 {
        let b = self.inner.lock();
        let mut missing = 0;
        for (instance, list) in b.published.iter().filter(|(i, _)| i.starts_with("soak-")) {
            let seen = receivers.seen(instance);
            missing += list.iter().filter(|p| !seen.contains_key(&p.seq)).count() as u64;
        }
        missing
    }

    /// Draws the verdict.
    pub(crate) fn verdict(&self, receivers: &Receivers) -> Verdict {
        let b = self.inner.lock();
        let mut v = Verdict {
            dead_letters_retried: b.dead_letters_retried,
            ephemeral_rounds: b.ephemeral_rounds,
            ws_sessions: b.sessions.len() as u64,
            ..Verdict::default()
        };
        let mut effects: Vec<FaultEffect> = b
            .faults
            .iter()
            .map(|(f, s, e)| FaultEffect {
                fault: f.to_string(),
                start_secs: *s,
                end_secs: *e,
                ..Default::default()
            })
            .collect();
        v.events_acknowledged = b.published.values().map(|l| l.len() as u64).sum();
        // WebSocket sessions.
        let mut chains: HashMap<u64, HashMap<u64, u32>> = HashMap::new();
        for s in &b.sessions {
            let Some(list) = b.published.get(&s.instance) else {
                continue;
            };
            let changes = b
                .settings
                .get(&s.instance)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let got: HashMap<u64, bool> = s.received.iter().map(|&(q, m, _)| (q, m)).collect();
            let chain = chains.entry(s.chain).or_default();
            for (seq, _, _) in &s.received {
                *chain.entry(*seq).or_default() += 1;
            }
            if let Some(r) = s.recovered {
                if r {
                    v.recoveries_true += 1;
                } else {
                    v.recoveries_false += 1;
                }
            }
            if let Some(code) = s.closed_by_server {
                match ws_fault_at(&b.faults, s.t_leave - 1.0, s.t_leave) {
                    Some(i) => {
                        v.ws_closes_in_fault_windows += 1;
                        effects[i].ws_closes += 1;
                    }
                    None if code == Some(4004) && s.instance.starts_with("eph-") => {}
                    None => v.ws_unexpected_closes += 1,
                }
            }
            for p in list {
                let in_life = p.t_send > s.t_join + JOIN_SLACK_SECS
                    && p.t_ack + DELIVERY_SLACK_SECS < s.t_leave;
                if !in_life {
                    continue;
                }
                let Some(state) = stable_state(changes, p.t_send, p.t_ack) else {
                    continue;
                };
                let narrowed_out = s.narrowing.as_ref().is_some_and(|n| !n.contains(&p.kind));
                let expected = state.passes(p.kind) && !narrowed_out;
                match (expected, got.get(&p.seq)) {
                    (true, Some(media)) => {
                        v.ws_expected += 1;
                        v.ws_delivered += 1;
                        if p.kind == 0 && *media != state.media {
                            v.ws_media_mismatches += 1;
                            note_miss(
                                &mut v.ws_misses,
                                "wrong mediaBase64",
                                s,
                                p,
                                changes,
                                &b.sessions,
                            );
                        }
                    }
                    (true, None) => {
                        v.ws_expected += 1;
                        match ws_fault_at(&b.faults, p.t_send, p.t_ack + DELIVERY_SLACK_SECS) {
                            Some(i) => {
                                v.ws_lost_in_fault_windows += 1;
                                effects[i].ws_events_not_delivered += 1;
                            }
                            None => {
                                v.ws_lost_unexplained += 1;
                                note_miss(&mut v.ws_misses, "lost", s, p, changes, &b.sessions);
                            }
                        }
                    }
                    (false, Some(_)) => {
                        v.ws_filter_violations += 1;
                        note_miss(
                            &mut v.ws_misses,
                            "filtered out but delivered",
                            s,
                            p,
                            changes,
                            &b.sessions,
                        );
                    }
                    (false, None) => {}
                }
            }
        }
        v.ws_duplicates = chains
            .values()
            .flat_map(|c| c.values())
            .filter(|n| **n > 1)
            .count() as u64;
        v.ws_duplicate_notes = describe_duplicates(&b, &chains);
        v.slow_deliveries = describe_slow(&b);
        // Webhooks: every acknowledged event of a persistent instance.
        for (instance, list) in b.published.iter().filter(|(i, _)| i.starts_with("soak-")) {
            let seen = receivers.seen(instance);
            for p in list {
                v.webhook_expected += 1;
                match seen.get(&p.seq) {
                    None => v.webhook_lost += 1,
                    Some(arrival) => {
                        if arrival.count > 1 {
                            v.webhook_duplicates += 1;
                        }
                        if arrival.media {
                            v.webhook_media_mismatches += 1;
                        }
                    }
                }
            }
        }
        // HTTP failures.
        for (t, _, _) in &b.http_5xx {
            match any_fault_at(&b.faults, *t - 1.0, *t) {
                Some(i) => {
                    v.http_5xx_in_fault_windows += 1;
                    effects[i].http_5xx += 1;
                }
                None => v.http_5xx_outside_faults += 1,
            }
        }
        for (t, _, _) in &b.http_other {
            match any_fault_at(&b.faults, *t - 1.0, *t) {
                Some(i) => effects[i].http_errors += 1,
                None => v.http_errors_outside_faults += 1,
            }
        }
        v.problems = b
            .problems
            .iter()
            .map(|(t, p)| format!("{t:.0} s: {p}"))
            .collect();
        for (t, what, detail) in b.http_other.iter().take(20) {
            if any_fault_at(&b.faults, *t - 1.0, *t).is_none() {
                v.problems.push(format!("{t:.0} s: {what}: {detail}"));
            }
        }
        v.faults = effects;
        v
    }
}

impl Verdict {
    /// The checks a soak must pass, each with what failed.
    pub(crate) fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        let mut check = |bad: bool, what: String| {
            if bad {
                f.push(what);
            }
        };
        check(
            self.ws_lost_unexplained > 0,
            format!(
                "{} WebSocket events lost outside fault windows",
                self.ws_lost_unexplained
            ),
        );
        check(
            self.ws_duplicates > 0,
            format!("{} WebSocket events received twice", self.ws_duplicates),
        );
        check(
            self.ws_filter_violations > 0,
            format!(
                "{} WebSocket events that the filters excluded were delivered",
                self.ws_filter_violations
            ),
        );
        check(
            self.ws_media_mismatches > 0,
            format!(
                "{} WebSocket envelopes with the wrong mediaBase64 treatment",
                self.ws_media_mismatches
            ),
        );
        check(
            self.ws_unexpected_closes > 0,
            format!("{} unexpected WebSocket closes", self.ws_unexpected_closes),
        );
        check(
            self.webhook_lost > 0,
            format!(
                "{} acknowledged webhook deliveries never arrived",
                self.webhook_lost
            ),
        );
        check(
            self.webhook_media_mismatches > 0,
            format!(
                "{} webhook bodies kept media base64",
                self.webhook_media_mismatches
            ),
        );
        check(
            self.http_5xx_outside_faults > 0,
            format!(
                "{} 5xx replies outside fault windows",
                self.http_5xx_outside_faults
            ),
        );
        check(
            self.http_errors_outside_faults > 0,
            format!(
                "{} failed or refused requests outside fault windows",
                self.http_errors_outside_faults
            ),
        );
        check(
            self.ws_expected == 0,
            "no WebSocket event was expected: the run checked nothing".into(),
        );
        check(
            !self.problems.is_empty(),
            format!("{} problems (see the list)", self.problems.len()),
        );
        f
    }
}

/// How many misses the verdict describes one by one.
const MISSES_LISTED: usize = 40;

/// Describes one miss: the event, its session, the last settings change
/// acknowledged before it was sent and the next one after, and how the
/// other sessions of the instance connected then fared, by node (received
/// by how many, and the latest how long after the acknowledgement): late
/// elsewhere too, or lost in one session only.
fn note_miss(
    out: &mut Vec<String>,
    what: &str,
    s: &Session,
    p: &Published,
    changes: &[Change],
    sessions: &[Session],
) {
    if out.len() >= MISSES_LISTED {
        return;
    }
    let mut others: Vec<String> = Vec::new();
    for node in 0..=sessions.iter().map(|o| o.node).max().unwrap_or(0) {
        let (mut connected, mut got, mut latest) = (0, 0, 0f32);
        for o in sessions.iter().filter(|o| {
            !std::ptr::eq(*o, s)
                && o.node == node
                && o.instance == s.instance
                && o.t_join + JOIN_SLACK_SECS < p.t_send
                && o.t_leave > p.t_ack
                && o.narrowing.as_ref().is_none_or(|n| n.contains(&p.kind))
        }) {
            connected += 1;
            if let Some(&(_, _, at)) = o.received.iter().find(|r| r.0 == p.seq) {
                got += 1;
                latest = latest.max(at - p.t_ack as f32);
            }
        }
        others.push(format!(
            "node {node}: {got} of {connected} (latest {latest:.2} s after the ack)"
        ));
    }
    let before = changes.iter().rev().find(|c| c.t_ack < p.t_send);
    let after = changes.iter().find(|c| c.t_send > p.t_ack);
    let show = |c: Option<&Change>| match c {
        Some(c) => format!("{:.2}–{:.2} s → {:?}", c.t_send, c.t_ack, c.state),
        None => "none".into(),
    };
    out.push(format!(
        "{what}: {} seq {} ({}) sent {:.2} s to node {}, acked {:.2} s; session on node {} (chain {}, narrowing {:?}) {:.2}–{:.2} s; change before: {}; change after: {}; other sessions that received it: {}",
        s.instance,
        p.seq,
        super::KINDS[p.kind],
        p.t_send,
        p.node,
        p.t_ack,
        s.node,
        s.chain,
        s.narrowing,
        s.t_join,
        s.t_leave,
        show(before),
        show(after),
        others.join(", "),
    ));
}

/// The slowest seconds of live delivery: second, node, instance, how many
/// deliveries took over a second and the slowest, in time order.
fn describe_slow(b: &Books) -> Vec<String> {
    let mut slow: Vec<(&SlowAt, &SlowCount)> = b.slow.iter().collect();
    slow.sort_unstable_by_key(|(_, (_, max))| std::cmp::Reverse(*max));
    slow.truncate(MISSES_LISTED);
    slow.sort_unstable_by_key(|(key, _)| (*key).clone());
    slow.iter()
        .map(|((second, node, instance), (count, max))| {
            let fault = if ws_fault_at(&b.faults, *second as f64 - 1.0, *second as f64).is_some() {
                " (fault window)"
            } else {
                ""
            };
            format!(
                "{second} s, node {node}, {instance}: {count} over 1 s, slowest {:.2} s{fault}",
                *max as f64 / 1e6
            )
        })
        .collect()
}

/// Describes the first duplicates: the event (when it was published and
/// acknowledged) and every session of its chain that received it.
fn describe_duplicates(b: &Books, chains: &HashMap<u64, HashMap<u64, u32>>) -> Vec<String> {
    let mut dups: Vec<(u64, u64)> = chains
        .iter()
        .flat_map(|(chain, seqs)| {
            seqs.iter()
                .filter(|(_, n)| **n > 1)
                .map(move |(seq, _)| (*chain, *seq))
        })
        .collect();
    dups.sort_unstable();
    dups.truncate(MISSES_LISTED);
    dups.iter()
        .map(|(chain, seq)| {
            let sessions: Vec<&Session> = b
                .sessions
                .iter()
                .filter(|s| s.chain == *chain && s.received.iter().any(|(q, _, _)| q == seq))
                .collect();
            let published = sessions.first().and_then(|s| {
                b.published
                    .get(&s.instance)
                    .and_then(|l| l.iter().find(|p| p.seq == *seq))
            });
            let event = match (sessions.first(), published) {
                (Some(s), Some(p)) => format!(
                    "{} seq {seq} sent {:.2} s, acked {:.2} s",
                    s.instance, p.t_send, p.t_ack
                ),
                _ => format!("seq {seq}"),
            };
            let lives: Vec<String> = sessions
                .iter()
                .map(|s| {
                    format!(
                        "node {} {:.2}–{:.2} s, {}× in it, resumed from {:?} → recovered {:?}, epoch changes {}",
                        s.node,
                        s.t_join,
                        s.t_leave,
                        s.received.iter().filter(|(q, _, _)| q == seq).count(),
                        s.resumed_from,
                        s.recovered,
                        s.epoch_changes,
                    )
                })
                .collect();
            format!("{event}; chain {chain}: {}", lives.join("; "))
        })
        .collect()
}

fn new_histogram() -> Option<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).ok()
}

/// The settings in force for an event sent at `t_send` and acknowledged at
/// `t_ack`, when no change was in progress near it; `None` otherwise.
fn stable_state(changes: &[Change], t_send: f64, t_ack: f64) -> Option<WsState> {
    let mut state = None;
    for c in changes {
        let near = c.t_send - CHANGE_SLACK_SECS < t_ack && t_send < c.t_ack + CHANGE_SLACK_SECS;
        if near {
            return None;
        }
        if c.t_ack < t_send {
            state = Some(c.state.clone()?);
        }
    }
    state
}

/// The index of a fault that may break WebSocket delivery in `[from, to]`.
fn ws_fault_at(faults: &[(Fault, f64, f64)], from: f64, to: f64) -> Option<usize> {
    faults
        .iter()
        .position(|(f, s, e)| f.excuses_websocket() && from < e + FAULT_TAIL_SECS && *s - 1.0 < to)
}

/// The index of any fault (a 5xx is allowed while storage is away) in `[from, to]`.
fn any_fault_at(faults: &[(Fault, f64, f64)], from: f64, to: f64) -> Option<usize> {
    faults.iter().position(|(f, s, e)| {
        !matches!(f, Fault::ReceiverDown { .. }) && from < e + FAULT_TAIL_SECS && *s - 1.0 < to
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_near_a_change_are_not_counted() {
        let changes = vec![
            Change {
                t_send: 0.0,
                t_ack: 0.1,
                state: Some(WsState::all(true)),
            },
            Change {
                t_send: 10.0,
                t_ack: 10.2,
                state: Some(WsState::disabled()),
            },
        ];
        assert_eq!(stable_state(&changes, 5.0, 5.1), Some(WsState::all(true)));
        assert_eq!(stable_state(&changes, 9.5, 9.6), None);
        assert_eq!(
            stable_state(&changes, 12.0, 12.1),
            Some(WsState::disabled())
        );
        assert!(!WsState::disabled().passes(0));
    }
}
