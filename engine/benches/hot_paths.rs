//! Micro-benchmarks of the relay's hot paths, per batch of 1000 events:
//! message building (topic, headers, librdkafka header lists), the in-flight
//! window and its settlement, and partition assignment. Run with
//! `cargo bench -p outbox-engine`; results are summarised in bench-results/.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use outbox_engine::cluster::assignment::{plan, LeaseView};
use outbox_engine::event::OutboxEvent;
use outbox_engine::relay::window::{settle, InFlight, Window};
use outbox_engine::sink::routing;
use outbox_engine::sink::DeliveryReport;
use rdkafka::message::{Header, OwnedHeaders};
use uuid::Uuid;

const BATCH: usize = 1000;

fn batch(with_headers: bool) -> Vec<OutboxEvent> {
    (0..BATCH)
        .map(|i| OutboxEvent {
            position: i as i64,
            id: Uuid::now_v7(),
            aggregate_type: if i % 3 == 0 { "invoice" } else { "order" }.into(),
            aggregate_id: format!("agg-{}", i % 97),
            event_type: "OrderUpdated".into(),
            payload: format!("{{\"seq\": {i}, \"pad\": \"{}\"}}", "x".repeat(100)).into_bytes(),
            headers: with_headers.then(|| {
                br#"{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#
                    .to_vec()
            }),
            topic: None,
            created_at_ms: 1_700_000_000_000,
        })
        .collect()
}

fn message_building(c: &mut Criterion) {
    let mut g = c.benchmark_group("message_building");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (name, with_headers) in [("plain", false), ("row_headers", true)] {
        let events = batch(with_headers);
        g.bench_function(format!("topics_and_headers/{name}"), |b| {
            b.iter(|| {
                let mut topics: Vec<String> = Vec::new();
                let mut n = 0usize;
                for e in &events {
                    if !topics
                        .iter()
                        .any(|t| routing::is_topic_of(e, "outbox.event.", t))
                    {
                        topics.push(routing::topic(e, "outbox.event.").into_owned());
                    }
                    routing::for_each_header(e, |k, v| n += k.len() + v.len()).unwrap();
                }
                black_box((topics, n))
            })
        });
        g.bench_function(format!("librdkafka_header_lists/{name}"), |b| {
            b.iter(|| {
                for e in &events {
                    let mut h = Some(OwnedHeaders::new_with_capacity(3));
                    routing::for_each_header(e, |key, value| {
                        h = h.take().map(|x| {
                            x.insert(Header {
                                key,
                                value: Some(value),
                            })
                        });
                    })
                    .unwrap();
                    black_box(h);
                }
            })
        });
    }
    g.finish();
}

fn batching(c: &mut Criterion) {
    let events = batch(false);
    let mut g = c.benchmark_group("batching");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("window_push_pop_settle", |b| {
        b.iter_batched(
            || Window::new(4),
            |mut w| {
                w.push(InFlight {
                    ids: events.iter().map(|e| e.id).collect(),
                    session: 1,
                    delivery: (),
                });
                let done = w.pop_front().unwrap();
                let s = settle(&done.ids, DeliveryReport::default());
                black_box(s.delivered_prefix)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn assignment(c: &mut Criterion) {
    let mut g = c.benchmark_group("assignment");
    for nodes in [3usize, 50] {
        let live: Vec<String> = (0..nodes).map(|i| format!("node-{i:02}")).collect();
        let leases: Vec<LeaseView> = (0..256u32)
            .map(|p| LeaseView {
                partition: p,
                owner: (p % 2 == 0).then(|| live[p as usize % nodes].clone()),
                mode: outbox_engine::relay::Mode::Poll,
            })
            .collect();
        g.bench_function(format!("plan_256_partitions/{nodes}_nodes"), |b| {
            b.iter(|| black_box(plan(&live, "node-01", &leases, None)))
        });
    }
    g.finish();
}

criterion_group!(benches, message_building, batching, assignment);
criterion_main!(benches);
