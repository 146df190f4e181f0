//! Micro-benchmarks of the delivery hot path: building an event's envelope
//! variants (and a webhook attempt's, from the stored event), and one
//! publish fanned out by an instance actor to 1, 100 and 1000 sessions (sink
//! actors that only account for what they receive).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eventgate::bus::Bus;
use eventgate::domain::{AccountId, EventSet, InstanceId, VersionedConfig, WsConfig};
use eventgate::events::{envelope, instance_data_json, parse_publish, stored_envelope, Event};
use eventgate::instance::actor::{FanoutEnv, InstanceActor};
use eventgate::instance::messages::{Join, Publish, SessionId, SessionShared, ToSession};
use eventgate::instance::InstanceInfo;
use eventgate::metrics::Metrics;
use eventgate::ws::session::SessionLimits;

/// A 200-byte `message.exchange` with media, like the load benchmark's.
fn sample_event() -> Event {
    let body = br#"{"event":"message.exchange","data":{"key":{"id":"3EB0C431C26A1916B4F5","fromMe":false},
        "message":{"conversation":"hello there","media":{"mimetype":"image/jpeg","base64":"/9j/4AAQSkZJRgABAQAAAQABAAD"}},
        "pushName":"Ana","timestamp":1795300000}}"#;
    parse_publish(body, 1)
        .map(|mut v| v.remove(0))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn envelopes(c: &mut Criterion) {
    let event = sample_event();
    let idata = instance_data_json("https://gw.example.com", "sales-1", &"t".repeat(64));
    let mut group = c.benchmark_group("envelope");
    group.bench_function("media_kept", |b| b.iter(|| envelope(&event, &idata, true)));
    group.bench_function("media_stripped", |b| {
        b.iter(|| envelope(&event, &idata, false))
    });
    group.finish();
}

/// A webhook attempt's body from its stored `data` text: checked and put
/// in as it is (`stored_envelope`), against parsing it and serialising it
/// again (what each attempt did before).
fn stored_envelopes(c: &mut Criterion) {
    let idata = instance_data_json("https://gw.example.com", "sales-1", &"t".repeat(64));
    let small = parse_publish(
        br#"{"event":"message.status","data":{"tag":7,"seq":123456,"ts":1795300000123456789}}"#,
        1,
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .remove(0);
    let mut group = c.benchmark_group("webhook_body");
    for (name, event) in [("load_tool_event", small), ("message_200b", sample_event())] {
        let stored = serde_json::to_string(&event.data).unwrap_or_else(|e| panic!("{e}"));
        group.bench_function(BenchmarkId::new("from_stored", name), |b| {
            b.iter(|| stored_envelope(event.kind, &stored, &idata, true))
        });
        group.bench_function(BenchmarkId::new("parsed_again", name), |b| {
            b.iter(|| {
                let data: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(&stored).unwrap_or_default();
                envelope(
                    &Event {
                        kind: event.kind,
                        data,
                    },
                    &idata,
                    true,
                )
            })
        });
    }
    group.finish();
}

/// A webhook delivery's id, made for every delivery a publish stores.
fn delivery_ids(c: &mut Criterion) {
    c.bench_function("new_delivery_id", |b| {
        b.iter(eventgate::webhook::signature::new_delivery_id)
    });
}

/// A session stand-in: takes deliveries off its queue and counts nothing else.
struct Sink {
    shared: Arc<SessionShared>,
}

impl Actor for Sink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1 << 20);
    }
}

impl Handler<ToSession> for Sink {
    type Result = ();

    fn handle(&mut self, msg: ToSession, _: &mut Self::Context) {
        if let ToSession::Deliver(batch) | ToSession::Replay(batch) = msg {
            self.shared
                .queued_bytes
                .fetch_sub(batch.bytes, Ordering::AcqRel);
        }
    }
}

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan_out_one_event");
    for sessions in [1usize, 100, 1000] {
        let system = System::new();
        let metrics = Arc::new(Metrics::new().unwrap_or_else(|e| panic!("{e}")));
        let addr = system.block_on(async {
            let env = FanoutEnv {
                base_url: "https://gw.example.com".into(),
                client_buffer_bytes: 1 << 30,
                metrics,
                bus: Bus::Local,
                publish_queue: usize::MAX,
                // The sink takes every batch at once: nothing to wait for.
                publish_lag: 0,
                // The sink has no socket: every batch goes through its mailbox.
                direct_writes: false,
                history: None,
                ping_interval: std::time::Duration::from_secs(20),
                idle_timeout: std::time::Duration::from_secs(60),
                session_limits: SessionLimits {
                    mailbox: 256,
                    max_message_bytes: 1 << 20,
                },
            };
            let info = InstanceInfo {
                id: InstanceId(1),
                account: AccountId(1),
                name: "sales-1".into(),
                token: "t".repeat(64),
            };
            let config = VersionedConfig {
                config: WsConfig::normalized(true, Vec::new(), false),
                version: 1,
            };
            let addr = InstanceActor::new(
                info,
                Some(config),
                env,
                std::sync::Weak::new(),
                "bench".into(),
                Default::default(),
            )
            .start();
            for i in 0..sessions {
                let shared = Arc::new(SessionShared::default());
                let sink = Sink {
                    shared: shared.clone(),
                }
                .start();
                addr.do_send(Join {
                    session: SessionId(i as u64),
                    recipient: sink.recipient(),
                    narrowing: EventSet::default(),
                    shared,
                    recovery: None,
                });
            }
            addr
        });
        let events: Arc<[Event]> = Arc::from(vec![sample_event()]);
        group.throughput(Throughput::Elements(sessions as u64));
        group.bench_with_input(BenchmarkId::from_parameter(sessions), &sessions, |b, _| {
            b.iter(|| {
                let publish = Publish::new(events.clone());
                system
                    .block_on(addr.send(publish))
                    .unwrap_or_else(|e| panic!("{e}"));
            })
        });
    }
    group.finish();
}

criterion_group!(benches, envelopes, stored_envelopes, delivery_ids, fan_out);
criterion_main!(benches);
