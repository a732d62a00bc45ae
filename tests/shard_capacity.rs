//! Per-shard rate limits at full Kinesis scale. A file of its own so that it runs alone:
//! it drives about 3,600 writes a second, which the worker and the fake only sustain on
//! this 2-core machine when no other test competes for it.

mod common;
use common::bin;
use std::time::Duration;

use kd_testkit::env::{assert_all_delivered_in_order, wait_metric, FakeEnv as Env};
use kd_testkit::{Tansu, Worker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_shard_limits_fill_a_stream_with_a_hot_key_without_throttling() {
    // Snappy input below: Tansu's memory engine (its SQLite engine cannot read snappy
    // batches back).
    let env = Env::with(Tansu::start_memory(), None).await;
    let t = env.tenant("src_sharded", "sharded", 4);
    // The fake enforces Kinesis' 1,000 records/s and 1 MiB/s per shard over a sliding
    // second.
    env.fake.enforce_capacity("sharded");
    let cfg = env
        .config(&[&t])
        .set("delivery", "initial_backoff_ms = 20")
        .set("delivery", "max_backoff_ms = 200");
    cfg.write();
    // 16,000 events: one hot user sends 5% of them, 1,900 others share the rest.
    let events: Vec<(String, String, usize)> = (0..16000)
        .map(|i| {
            let user = if i % 20 == 0 {
                "hot-user".to_owned()
            } else {
                format!("u{}", i % 1900)
            };
            ("src_sharded".to_owned(), user, i)
        })
        .collect();
    // In snappy-compressed batches, as a Java or librdkafka producer may send them.
    let snappy = kd_testkit::Kafka::compressed(&env.tansu.bootstrap(), "snappy");
    let sent = env.send_all_via(&snappy, &events).await;
    let mut worker = Worker::start_ready(bin(), &cfg);
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        16000.0,
        Duration::from_secs(120),
    )
    .await;
    let records = env.fake.records_of("sharded");
    assert_all_delivered_in_order(&sent, &records);

    // The busiest shard bounds how fast the stream can take these keys.
    let mut per_shard: std::collections::HashMap<&str, usize> = Default::default();
    for r in &records {
        *per_shard.entry(r.shard_id.as_str()).or_default() += 1;
    }
    assert_eq!(per_shard.len(), 4, "keys spread over every shard");
    let busiest = *per_shard.values().max().unwrap();
    let first = records.iter().map(|r| r.at).min().unwrap();
    let last = records.iter().map(|r| r.at).max().unwrap();
    let took = (last - first).as_secs_f64();
    let best = busiest as f64 / 1000.0;
    let efficiency = best / took;
    let throttled = env.fake.throttled_at();
    let steady: Vec<_> = throttled
        .iter()
        .filter(|t| **t > first + Duration::from_secs(2))
        .collect();
    eprintln!(
        "per-shard limits: {} records in {took:.2}s, busiest shard {busiest} ({best:.2}s at capacity): {:.0}% of capacity; {} throttled ({} in steady state)",
        records.len(),
        efficiency * 100.0,
        throttled.len(),
        steady.len()
    );
    assert!(
        efficiency >= 0.8,
        "written at {:.0}% of capacity",
        efficiency * 100.0
    );
    assert!(
        steady.len() <= 5,
        "{} throttled writes in steady state; the worker's view:\n{}",
        steady.len(),
        worker
            .logs()
            .lines()
            .filter(|l| {
                !l.contains("write failed; retrying")
                    && !l.contains("writes failing")
                    && !l.contains("offsets committed")
            })
            .take(60)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(worker.metric("kinesis_destination_rate_limit_wait_seconds_total") > 0.0);
    worker.stop();
}
