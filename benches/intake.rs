//! Micro-benchmark of the webhook intake's store on SQLite (`deliveries::
//! enqueue`): one group of four publishes of 100 deliveries each for one
//! webhook — what the load tool's publish phase hands the intake thread —
//! in one transaction, on a file database with the gateway's pragmas
//! (WAL, `synchronous = FULL`: each group's commit is a flush to disk).
//! Two ways: left for a claim (one bundle per publish and webhook, what a
//! backlog is stored as) and leased to the node (what it attempts at once:
//! one bundle leased to it). What is stored stays, as a backlog does.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use eventgate::domain::InstanceName;
use eventgate::storage::deliveries::{self, Intake, NewDelivery, PendingCounts};
use eventgate::storage::webhooks::{self, NewConfig};
use eventgate::storage::{accounts, instances, now_millis, pool};
use eventgate::webhook::signature::new_delivery_id;

/// Publishes in a group, and events in each.
const PUBLISHES: usize = 4;
const EVENTS: usize = 100;

/// A 200-byte event's `data`, like the load tool's.
const DATA: &str = r#"{"key":{"id":"3EB0C431C26A1916B4F5","fromMe":false},"message":{"conversation":"hello there, this is a message of about two hundred bytes","media":{"mimetype":"image/jpeg"}},"pushName":"Ana","timestamp":1795300000}"#;

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let mut conn = pool::open_one(&url).unwrap_or_else(|e| panic!("{e}"));
    let account = accounts::create(&mut conn, "bench", "hash").unwrap_or_else(|e| panic!("{e}"));
    let name = InstanceName::parse("bench").unwrap_or_else(|| panic!("name"));
    let (instance, _) = instances::create(&mut conn, account, &name, "token", "thash", None, None)
        .unwrap_or_else(|e| panic!("{e:?}"));
    let config = NewConfig {
        label: "default".into(),
        enabled: true,
        url: Some("http://127.0.0.1:9/hook".into()),
        auth_header: None,
        by_events: false,
        events: Vec::new(),
        media_base64: false,
        ordered: false,
        new_secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        rotate_secret: false,
    };
    let (hook, _) =
        webhooks::upsert(&mut conn, instance.id, &config, 0).unwrap_or_else(|e| panic!("{e}"));
    let mut pending = PendingCounts::default();
    let mut group = c.benchmark_group("intake");
    group.throughput(Throughput::Elements((PUBLISHES * EVENTS) as u64));
    for (name, leased) in [("for claims (bundles)", 0), ("leased", EVENTS)] {
        group.bench_function(format!("store 4 publishes x 100 deliveries {name}"), |b| {
            b.iter_batched(
                || {
                    (0..PUBLISHES)
                        .map(|_| {
                            let rows = (0..EVENTS)
                                .map(|_| NewDelivery {
                                    id: new_delivery_id(),
                                    event: "message.exchange",
                                    data: DATA.to_string(),
                                })
                                .collect();
                            vec![(hook.id, rows)]
                        })
                        .collect::<Vec<_>>()
                },
                |publishes| {
                    let now = now_millis();
                    let intakes: Vec<Intake<'_>> = publishes
                        .iter()
                        .map(|batches| Intake {
                            batches,
                            leased: std::slice::from_ref(&leased),
                            now,
                            lease_until: 0,
                        })
                        .collect();
                    deliveries::enqueue(&mut conn, &intakes, i64::MAX, &mut pending)
                        .unwrap_or_else(|e| panic!("{e}"))
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
