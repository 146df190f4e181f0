//! Recovery on reconnect on one node (contract §12): offsets and epochs,
//! the `connection.recovery` first frame, replay of exactly what was missed
//! (through the client's filters) with no gap and no duplicate at the
//! hand-over to live events, the history's bounds, the 400 cases, and
//! slow recovering clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::recovery::{assert_increasing, ev, n, offset, open, read_until, resume};
use common::{event, eventually, stalled_client, Got, Process, TestDb, TestServer, Ws, ACCOUNT};
use serde_json::{json, Value};

/// A server keeping `size` events per instance, after `tweak`.
async fn server(size: usize, tweak: impl FnOnce(&mut eventgate::settings::Settings)) -> TestServer {
    TestServer::start_with(move |s| {
        s.ws.history_size = size;
        tweak(s);
    })
    .await
}

async fn publish_range(s: &TestServer, name: &str, range: std::ops::RangeInclusive<u64>) {
    let body: Vec<Value> = range.map(ev).collect();
    assert_eq!(s.publish(name, json!(body)).await.status, 202);
}

#[actix_rt::test]
async fn offsets_increase_and_are_shared_by_every_client_while_others_see_plain_envelopes() {
    let s = server(100, |_| {}).await;
    s.instance("shared").await;
    let (mut a, first_a) = open(&s, "shared", "&recover=true").await;
    let (mut b, first_b) = open(&s, "shared", "&recover=true").await;
    assert_eq!(first_a["recovered"], true);
    assert_eq!(first_a["offset"], 0, "no event yet");
    let epoch = first_a["epoch"].as_str().unwrap().to_string();
    assert!(!epoch.is_empty());
    assert_eq!(first_b["epoch"], json!(epoch));
    let mut plain = s.connect("shared", "").await;
    s.wait_clients("shared", Some(3)).await;

    publish_range(&s, "shared", 1..=3).await;
    assert_eq!(s.publish("shared", ev(4)).await.status, 202);
    let got_a = read_until(&mut a, 4).await;
    let got_b = read_until(&mut b, 4).await;
    assert_eq!(got_a, got_b, "both opted-in clients see the same offsets");
    assert_eq!(got_a.iter().map(n).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_increasing(&got_a);
    assert!(offset(&got_a[0]) >= 1);
    for v in &got_a {
        assert_eq!(v["epoch"], json!(epoch));
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.len(), 5, "{v}");
    }
    for i in 1..=4 {
        let v = plain.envelope().await;
        assert_eq!(n(&v), i);
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["data", "event", "instanceData"],
            "exactly today's envelope"
        );
    }
    // A later start position names the latest offset.
    let (_c, first_c) = open(&s, "shared", "&recover=true").await;
    assert_eq!(first_c["offset"], json!(offset(&got_a[3])));
    assert_eq!(first_c["recovered"], true);
}

#[actix_rt::test]
async fn replay_is_exactly_what_was_missed_then_live_with_events_published_during_the_replay() {
    replay_then_live(false).await;
}

/// The same with the fan-out writing idle sockets itself (`direct_writes`),
/// the producer spaced so that it does: a replay goes through the session,
/// and nothing written directly overtakes it.
#[actix_rt::test]
async fn replay_then_live_with_direct_writes() {
    replay_then_live(true).await;
}

async fn replay_then_live(direct_writes: bool) {
    let s = server(10_000, |st| st.server.direct_writes = direct_writes).await;
    s.instance("gap").await;
    let (mut watcher, first) = open(&s, "gap", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    let (mut a, _) = open(&s, "gap", "&recover=true").await;
    publish_range(&s, "gap", 1..=5).await;
    let seen = read_until(&mut a, 5).await;
    let since = offset(&seen[4]);
    drop(a);
    s.wait_clients("gap", Some(1)).await;
    // Missed while away: 295 events, in batches and singly.
    for start in (6..=205).step_by(50) {
        publish_range(&s, "gap", start..=start + 49).await;
    }
    for i in 206..=300 {
        s.publish("gap", ev(i)).await;
    }
    let replayed_before = s.metric("eventgate_replayed_events_total").await;

    // A producer keeps publishing while the client reconnects and replays.
    let last = 700;
    let producer = async {
        for i in 301..=last {
            assert_eq!(s.publish("gap", ev(i)).await.status, 202);
            if direct_writes {
                // Fan-outs spaced past the node's 5 ms gate: written directly.
                tokio::time::sleep(Duration::from_millis(6)).await;
            }
        }
    };
    let consumer = async {
        let (mut b, first) = resume(&s, "gap", &epoch, since, "").await;
        assert_eq!(first["recovered"], true, "{first}");
        assert_eq!(first["epoch"], json!(epoch));
        let latest_at_join = first["offset"].as_u64().unwrap();
        let got = read_until(&mut b, last).await;
        (got, latest_at_join)
    };
    let ((), (got, latest_at_join)) = tokio::join!(producer, consumer);
    let ns: Vec<u64> = got.iter().map(n).collect();
    assert_eq!(
        ns,
        (6..=last).collect::<Vec<_>>(),
        "no gap, no duplicate, in order"
    );
    assert_increasing(&got);
    assert!(got.iter().all(|v| v["epoch"] == json!(epoch)));
    // The replay ended at the latest offset the first frame named; what
    // followed arrived live.
    let replayed = got.iter().filter(|v| offset(v) <= latest_at_join).count();
    assert!(replayed >= 295, "{replayed}");
    assert_eq!(
        s.metric("eventgate_replayed_events_total").await - replayed_before,
        replayed as f64
    );
    assert!(
        s.metric("eventgate_recoveries_total{recovered=\"true\"}")
            .await
            >= 1.0
    );
    // The watcher, connected throughout, saw the same offsets.
    let all = read_until(&mut watcher, last).await;
    assert_eq!(&all[5..], &got[..]);
    let direct = s
        .metric("eventgate_direct_writes_total{written=\"whole\"}")
        .await;
    assert_eq!(direct > 100.0, direct_writes, "{direct} direct writes");
}

#[actix_rt::test]
async fn replay_passes_the_instance_filter_media_setting_and_the_client_narrowing() {
    let s = server(100, |_| {}).await;
    s.instance_with(
        "filters",
        json!({"name": "filters", "websocketEnabled": true,
               "websocketEvents": ["message.exchange", "call.update"], "websocketMediaBase64": false}),
    )
    .await;
    let (_keep, first) = open(&s, "filters", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    let media = |n: u64| {
        event(
            "message.exchange",
            json!({"n": n, "message": {"media": {"base64": "QUJD", "mime": "image/png"}}}),
        )
    };
    s.publish(
        "filters",
        json!([
            media(1),
            ev(2),
            event("label.update", json!({"n": 3})),
            media(4),
            ev(5)
        ]),
    )
    .await;
    // Recovered from the start position: only message.exchange (narrowing),
    // without media (instance setting).
    let (mut a, first) = resume(&s, "filters", &epoch, 0, "&events=message.exchange").await;
    assert_eq!(first["recovered"], true);
    for want in [1, 4] {
        let v = a.envelope().await;
        assert_eq!(n(&v), want);
        assert_eq!(v["data"]["message"]["media"], json!({"mime": "image/png"}));
    }
    a.silent(Duration::from_millis(300)).await;
    let (mut b, _) = resume(&s, "filters", &epoch, 0, "").await;
    assert_eq!(
        read_until(&mut b, 5)
            .await
            .iter()
            .map(n)
            .collect::<Vec<_>>(),
        [1, 2, 4, 5]
    );

    // The history kept every event as published: under new settings the
    // same recovery replays the label and the media.
    s.configure(
        "filters",
        json!({"enabled": true, "events": [], "mediaBase64": true}),
    )
    .await;
    let (mut c, first) = resume(&s, "filters", &epoch, 0, "").await;
    assert_eq!(first["recovered"], true);
    let got = read_until(&mut c, 5).await;
    assert_eq!(got.iter().map(n).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert_eq!(got[0]["data"]["message"]["media"]["base64"], "QUJD");
    assert_increasing(&got);
}

/// Connects from `(epoch, since)` until the first frame says `recovered`
/// is `want` (for bounds that act over time), within 20 s.
async fn until_recovered_is(s: &TestServer, name: &str, epoch: &str, since: u64, want: bool) -> Ws {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ws, first) = resume(s, name, epoch, since, "").await;
        if first["recovered"] == want {
            return ws;
        }
        assert!(Instant::now() < deadline, "recovered never became {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_rt::test]
async fn history_bounds_by_count_age_and_bytes_make_recovered_false() {
    // By count.
    let s = server(3, |_| {}).await;
    s.instance("count").await;
    let (_keep, first) = open(&s, "count", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    publish_range(&s, "count", 1..=5).await;
    let (_, first) = resume(&s, "count", &epoch, 2, "").await;
    assert_eq!(first["recovered"], true, "offsets 3..5 are kept");
    let (mut a, first) = resume(&s, "count", &epoch, 1, "").await;
    assert_eq!(first["recovered"], false, "offset 2 left the history");
    assert_eq!(first["epoch"], json!(epoch));
    // Nothing replayed; live events follow.
    s.publish("count", ev(6)).await;
    assert_eq!(n(&a.envelope().await), 6);
    assert!(
        s.metric("eventgate_recoveries_total{recovered=\"false\"}")
            .await
            >= 1.0
    );

    // By age.
    // Long enough that publishing and the first resume fit in it on a busy machine.
    let s = server(100, |st| st.ws.history_ttl_secs = 5).await;
    s.instance("age").await;
    let (_keep, first) = open(&s, "age", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    publish_range(&s, "age", 1..=2).await;
    let (mut a, first) = resume(&s, "age", &epoch, 0, "").await;
    assert_eq!(first["recovered"], true);
    assert_eq!(read_until(&mut a, 2).await.len(), 2);
    let mut late = until_recovered_is(&s, "age", &epoch, 0, false).await;
    s.publish("age", ev(3)).await;
    assert_eq!(n(&late.envelope().await), 3, "only live events follow");

    // By bytes: each envelope is about 500 bytes; 1100 bytes hold two.
    let s = server(100, |st| st.ws.history_bytes = 1100).await;
    s.instance("bytes").await;
    let (_keep, first) = open(&s, "bytes", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    let pad = "x".repeat(300);
    for i in 1..=4 {
        s.publish("bytes", event("call.update", json!({"n": i, "pad": pad})))
            .await;
    }
    let latest = {
        let (_, first) = open(&s, "bytes", "&recover=true").await;
        first["offset"].as_u64().unwrap()
    };
    let (mut a, first) = resume(&s, "bytes", &epoch, latest - 2, "").await;
    assert_eq!(first["recovered"], true);
    assert_eq!(
        read_until(&mut a, 4)
            .await
            .iter()
            .map(n)
            .collect::<Vec<_>>(),
        [3, 4]
    );
    let (_, first) = resume(&s, "bytes", &epoch, latest - 3, "").await;
    assert_eq!(first["recovered"], false);
}

#[actix_rt::test]
async fn wrong_epoch_empty_epoch_and_since_past_the_latest_are_not_recovered() {
    let s = server(100, |_| {}).await;
    s.instance("epochs").await;
    let (_keep, first) = open(&s, "epochs", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    publish_range(&s, "epochs", 1..=3).await;
    let (_, latest) = open(&s, "epochs", "&recover=true").await;
    let mut latest = latest["offset"].as_u64().unwrap();
    for (e, past) in [
        ("not-the-epoch", false),
        ("", false),
        (epoch.as_str(), true),
    ] {
        let since = if past { latest + 1 } else { 0 };
        let (mut ws, first) = resume(&s, "epochs", e, since, "").await;
        assert_eq!(first["recovered"], false, "epoch={e} since={since}");
        assert_eq!(first["epoch"], json!(epoch));
        assert_eq!(first["offset"], json!(latest));
        s.publish("epochs", ev(100 + since)).await;
        let v = ws.envelope().await;
        assert_eq!(n(&v), 100 + since, "nothing replayed, live follows");
        latest = offset(&v);
    }
    // since = latest: recovered, nothing to replay.
    let (_, now) = open(&s, "epochs", "&recover=true").await;
    let latest = now["offset"].as_u64().unwrap();
    let (mut ws, first) = resume(&s, "epochs", &epoch, latest, "").await;
    assert_eq!(first["recovered"], true);
    s.publish("epochs", ev(999)).await;
    assert_eq!(n(&ws.envelope().await), 999);
}

#[actix_rt::test]
async fn recovery_parameters_that_are_not_valid_are_400_before_the_upgrade() {
    let s = server(100, |s| {
        s.ws.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    s.instance("bad").await;
    s.instance_with("off", json!({"name": "off", "websocketEnabled": false}))
        .await;
    let upgrade = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let get = |path: String| {
        let s = &s;
        async move { s.raw("GET", &path, &upgrade, None).await }
    };
    for query in [
        "recover=yes",
        "recover=",
        "recover=1",
        "recover=true&recover=false",
        "since=5",
        "epoch=abc",
        "recover=true&since=5",
        "recover=true&epoch=abc",
        "recover=false&since=5&epoch=abc",
        "recover=false&epoch=abc",
        "since=-1&epoch=abc",
        "since=%2B1&epoch=abc",
        "since=&epoch=abc",
        "since=1.5&epoch=abc",
        "since=0x10&epoch=abc",
        "since=12345678901234567890&epoch=abc",
        "since=1&since=2&epoch=abc",
        // Given twice, even with the same value.
        "recover=true&recover=true",
        "since=1&since=1&epoch=abc",
        "since=1&epoch=abc&epoch=abc",
    ] {
        // Checked before the settings-enabled check.
        for name in ["bad", "off"] {
            let r = get(format!("/ws/{name}?token={ACCOUNT}&{query}")).await;
            r.assert_error(400, "Invalid request body");
        }
    }
    // After `?events=` (its own 400, the same literal: its details say
    // which), before the settings check; a valid query reaches the settings
    // check. The checks of §2 and the Origin come first.
    let r = get(format!("/ws/bad?token={ACCOUNT}&events=nope&since=x")).await;
    r.assert_error(400, "Invalid request body");
    let details = r.body["error"]["details"].as_str().unwrap_or_default();
    assert!(details.contains("`events`"), "{}", r.body);
    let r = get(format!(
        "/ws/bad?token={ACCOUNT}&events=call.update&since=x"
    ))
    .await;
    r.assert_error(400, "Invalid request body");
    let details = r.body["error"]["details"].as_str().unwrap_or_default();
    assert!(details.contains("`since`"), "{}", r.body);
    get("/ws/bad?token=wrong-token-000000000000000000000&since=x".into())
        .await
        .assert_error(401, "Invalid token");
    get(format!("/ws/nobody?token={ACCOUNT}&since=x"))
        .await
        .assert_error(404, "Instance not found");
    let mut from_elsewhere = upgrade.to_vec();
    from_elsewhere.push(("origin", "https://elsewhere.example"));
    s.raw(
        "GET",
        &format!("/ws/bad?token={ACCOUNT}&since=x"),
        &from_elsewhere,
        None,
    )
    .await
    .assert_error(403, "Origin not allowed");
    get(format!("/ws/off?token={ACCOUNT}&recover=true&since=1&epoch=e"))
        .await
        .assert_error(
            400,
            "WebSocket is not enabled for this instance. Configure it first using POST /api/events/websocket/off",
        );
    // A valid query without an upgrade gets the upgrade check.
    s.raw(
        "GET",
        &format!("/ws/bad?token={ACCOUNT}&since=1&epoch=e"),
        &[],
        None,
    )
    .await
    .assert_error(400, "WebSocket upgrade expected");
    // since and epoch without recover imply it; recover=false is plain.
    let (_, first) = open(&s, "bad", "&since=9999999999999999999&epoch=").await;
    assert_eq!(first["recovered"], false);
    let mut plain = s.connect("bad", "&recover=false").await;
    s.publish("bad", ev(1)).await;
    let v = plain.envelope().await;
    assert_eq!(n(&v), 1);
    assert!(v.get("offset").is_none() && v.get("epoch").is_none());
}

#[actix_rt::test]
async fn without_history_recover_is_accepted_and_envelopes_stay_plain() {
    let s = TestServer::start().await;
    s.instance("none").await;
    let (mut a, first) = open(&s, "none", "&recover=true").await;
    assert_eq!(first, json!({"recovered": true, "epoch": "", "offset": 0}));
    s.publish("none", ev(1)).await;
    let v = a.envelope().await;
    let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["data", "event", "instanceData"]);
    let (mut b, first) = resume(&s, "none", "", 0, "").await;
    assert_eq!(first, json!({"recovered": false, "epoch": "", "offset": 0}));
    let (_, first) = resume(&s, "none", "abc", 1, "").await;
    assert_eq!(first["recovered"], false);
    s.publish("none", ev(2)).await;
    assert_eq!(n(&b.envelope().await), 2, "live follows, nothing replayed");
    b.silent(Duration::from_millis(200)).await;
    assert_eq!(s.metric("eventgate_replayed_events_total").await, 0.0);
}

#[actix_rt::test]
async fn events_accepted_while_disabled_get_no_offset_and_are_not_replayed() {
    let s = server(100, |_| {}).await;
    s.instance("toggle").await;
    let (mut a, first) = open(&s, "toggle", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    s.publish("toggle", ev(1)).await;
    let o1 = offset(&a.envelope().await);
    s.configure("toggle", json!({"enabled": false})).await;
    publish_range(&s, "toggle", 2..=3).await;
    s.configure("toggle", json!({"enabled": true})).await;
    s.publish("toggle", ev(4)).await;
    let v = a.envelope().await;
    assert_eq!(n(&v), 4, "nothing delivered while disabled");
    assert_eq!(offset(&v), o1 + 1, "no offset given while disabled, no gap");
    let (mut b, first) = resume(&s, "toggle", &epoch, o1, "").await;
    assert_eq!(first["recovered"], true);
    let v = b.envelope().await;
    assert_eq!((n(&v), offset(&v)), (4, o1 + 1));
    b.silent(Duration::from_millis(300)).await;
}

#[actix_rt::test]
async fn deleting_the_instance_clears_its_history() {
    let s = server(100, |_| {}).await;
    s.instance("gone").await;
    let (mut a, first) = open(&s, "gone", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    publish_range(&s, "gone", 1..=3).await;
    let o1 = offset(&a.envelope().await);
    let r = s
        .call("DELETE", "/api/instance/delete/gone", Some(ACCOUNT), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(a.closed(Duration::from_secs(5)).await, Some(4004));
    // The same name again: a new numbering, nothing of the old one.
    s.instance("gone").await;
    let (mut b, first) = resume(&s, "gone", &epoch, o1, "").await;
    assert_eq!(first["recovered"], false);
    assert_ne!(first["epoch"], json!(epoch));
    assert_eq!(first["offset"], 0);
    s.publish("gone", ev(10)).await;
    let v = b.envelope().await;
    assert_eq!(n(&v), 10);
    assert_eq!(v["epoch"], first["epoch"]);
}

#[actix_rt::test]
async fn a_client_too_slow_for_its_replay_is_evicted_while_others_are_unaffected() {
    let s = server(1000, |st| {
        st.ws.client_buffer_bytes = 1 << 20;
        st.ws.history_bytes = 16 << 20;
        st.ws.tcp_user_timeout_secs = 10;
    })
    .await;
    s.instance("slow").await;
    let (mut watcher, first) = open(&s, "slow", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    // 400 events of 32 KiB: a replay of 12.5 MiB, past the 1 MiB bound
    // and more than the kernel's socket buffers take.
    let pad = "s".repeat(32 * 1024);
    let producer = async {
        for i in 1..=400 {
            s.publish("slow", event("message.status", json!({"n": i, "pad": pad})))
                .await;
        }
    };
    let ((), got) = tokio::join!(producer, read_until(&mut watcher, 400));
    assert_eq!(got.len(), 400);
    // A recovering client that reads gets the whole replay, bounds or not.
    let (mut fast, first) = resume(&s, "slow", &epoch, 0, "").await;
    assert_eq!(first["recovered"], true);
    assert_eq!(read_until(&mut fast, 400).await.len(), 400);
    // One that never reads is a slow consumer once more events come.
    let _stalled = stalled_client(
        s.addr,
        &format!("/ws/slow?token={ACCOUNT}&recover=true&epoch={epoch}&since=0"),
    )
    .await;
    s.wait_clients("slow", Some(3)).await;
    let evicted = "eventgate_clients_evicted_total{reason=\"slow_consumer\"}";
    assert_eq!(s.metric(evicted).await, 0.0);
    // One live event at a time: the eviction comes after the 202, on the
    // instance's thread, so each is given time to evict before the next.
    let mut i = 400;
    loop {
        assert!(i < 410, "the stalled client was never evicted");
        i += 1;
        s.publish("slow", event("message.status", json!({"n": i, "pad": pad})))
            .await;
        let gone = eventually(Duration::from_secs(3), async || {
            (s.metric(evicted).await >= 1.0).then_some(())
        })
        .await;
        if gone.is_some() {
            break;
        }
    }
    // Its replay alone put it past its bounds: the first live event evicts it.
    assert!(i <= 402, "evicted only after {} live events", i - 400);
    s.wait_clients("slow", Some(2)).await;
    assert_eq!(s.metric(evicted).await, 1.0);
    for ws in [&mut watcher, &mut fast] {
        let got = read_until(ws, i).await;
        assert_eq!(
            got.iter().map(n).collect::<Vec<_>>(),
            (401..=i).collect::<Vec<_>>()
        );
    }
}

/// Events accepted before any client connected (since the instance was
/// created, or since a restart) are numbered and kept too: "each event an
/// instance accepts while its WebSocket is enabled gets an offset".
#[actix_rt::test]
async fn events_accepted_before_any_client_connected_are_kept() {
    let s = server(100, |_| {}).await;
    s.instance("early").await;
    publish_range(&s, "early", 1..=3).await;
    let (mut a, first) = open(&s, "early", "&recover=true").await;
    assert_eq!(first["recovered"], true);
    assert_eq!(first["offset"], 3, "{first}");
    let epoch = first["epoch"].as_str().unwrap().to_string();
    s.publish("early", ev(4)).await;
    assert_eq!(offset(&a.envelope().await), 4);
    let (mut b, first) = resume(&s, "early", &epoch, 0, "").await;
    assert_eq!(first["recovered"], true, "{first}");
    let got = read_until(&mut b, 4).await;
    assert_eq!(got.iter().map(n).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(got.iter().map(offset).collect::<Vec<_>>(), [1, 2, 3, 4]);
    // Without the WebSocket enabled, a publish keeps nothing (and starts nothing).
    s.instance_with("off", json!({"name": "off"})).await;
    publish_range(&s, "off", 1..=2).await;
    s.configure("off", json!({"enabled": true})).await;
    let (_c, first) = open(&s, "off", "&recover=true").await;
    assert_eq!(first["offset"], 0, "{first}");
}

#[actix_rt::test]
async fn a_restart_of_a_single_node_changes_the_epoch() {
    let db = TestDb::sqlite();
    let env = [("EVENTGATE_WS_HISTORY_SIZE", "100".to_string())];
    let settings = common::test_settings(&db);
    let first_epoch;
    let since;
    {
        let p = Process::start(&db, &["serve"], &env);
        let s = p.client(&settings);
        s.instance("restart").await;
        let (mut a, first) = open(&s, "restart", "&recover=true").await;
        first_epoch = first["epoch"].as_str().unwrap().to_string();
        s.publish("restart", ev(1)).await;
        since = offset(&a.envelope().await);
        p.signal("TERM");
        match a.next_within(Duration::from_secs(10)).await {
            Got::Closed(code) => assert_eq!(code, Some(1001)),
            other => panic!("expected 1001, got {other:?}"),
        }
    }
    let p = Process::start(&db, &["serve"], &env);
    let s = p.client(&settings);
    let (mut b, first) = resume(&s, "restart", &first_epoch, since, "").await;
    assert_eq!(first["recovered"], false);
    let epoch = first["epoch"].as_str().unwrap();
    assert!(!epoch.is_empty() && epoch != first_epoch);
    s.publish("restart", ev(2)).await;
    assert_eq!(b.envelope().await["epoch"], json!(epoch));
}

#[test]
fn check_config_shows_the_history_keys() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_eventgate"))
        .arg("check-config")
        .env_clear()
        .env("EVENTGATE_WS_HISTORY_SIZE", "500")
        .env("EVENTGATE_WS_HISTORY_TTL_SECS", "60")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for line in [
        "history_size = 500",
        "history_ttl_secs = 60",
        "history_bytes = 4194304",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "{line} in {text}"
        );
    }
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_eventgate"))
        .arg("check-config")
        .env_clear()
        .env("EVENTGATE_WS_HISTORY_TTL_SECS", "0")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("history_ttl_secs"));
}

/// A publish authorised just before its instance is deleted would start the
/// actor that keeps the history after the deletion had stopped it; that
/// actor now hears of the deletion and stops too.
#[actix_rt::test]
async fn a_publish_authorised_before_its_instance_is_deleted_leaves_no_actor() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = server(100, |_| {}).await;
    s.instance("gone").await;
    assert_eq!(s.metric("eventgate_instance_actors").await, 0.0);
    // The headers and half the body: authorised, then reading the rest.
    let body = serde_json::to_vec(&ev(1)).unwrap();
    let (first, rest) = body.split_at(body.len() / 2);
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /api/events/publish/gone HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ACCOUNT}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deleted = s
        .call("DELETE", "/api/instance/delete/gone", Some(ACCOUNT), None)
        .await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    tcp.write_all(rest).await.unwrap();
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 202"), "{reply}");
    let stopped = eventually(Duration::from_secs(5), async || {
        (s.metric("eventgate_instance_actors").await == 0.0).then_some(())
    })
    .await;
    assert!(stopped.is_some(), "the deleted instance's actor still runs");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.metric("eventgate_instance_actors").await, 0.0);
}
