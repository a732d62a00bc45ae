//! Throughput figures (a benchmark, not a pass/fail test: `#[ignore]`d, run by
//! `scripts/bench.sh`). One tenant, 20,000 events of 1,000 users into a 64-shard stream
//! of the AWS fake (so shard capacity is not what limits), each call answered after
//! 25 ms as a real Kinesis endpoint would: `PutRecord` against `PutRecords` batches.
//! Only delivery is asserted; the figures are printed.

mod common;
use common::bin;
use std::time::Duration;

use kd_testkit::env::{wait_metric, FakeEnv as Env};
use kd_testkit::{Fault, Worker};

const EVENTS: usize = 20_000;

async fn one_tenant(batched: bool) {
    let env = Env::start().await;
    let mut t = env.tenant("src_x", "x", 64);
    t.use_put_records = batched;
    env.fake.fail_for(
        "x",
        Fault::Latency(Duration::from_millis(25)),
        Duration::from_secs(600),
    );
    let cfg = env.config(&[&t]);
    cfg.write();
    let events: Vec<(String, String, usize)> = (0..EVENTS / 1000)
        .flat_map(|seq| (0..1000).map(move |u| ("src_x".to_owned(), format!("u{u}"), seq)))
        .collect();
    env.send_all(&events).await;
    let mut worker = Worker::start_ready(bin(), &cfg);
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        EVENTS as f64,
        Duration::from_secs(300),
    )
    .await;
    let records = env.fake.records_of("x");
    assert_eq!(records.len(), EVENTS);
    let first = records.iter().map(|r| r.at).min().unwrap();
    let last = records.iter().map(|r| r.at).max().unwrap();
    let took = (last - first).as_secs_f64();
    let calls = env
        .fake
        .requests(if batched { "PutRecords" } else { "PutRecord" });
    println!(
        "{:<11} {EVENTS} records in {took:.2} s: {:>6.0} records/s, {calls} calls, peak RSS {} MiB",
        if batched { "PutRecords" } else { "PutRecord" },
        EVENTS as f64 / took,
        worker.peak_rss_bytes() / (1024 * 1024),
    );
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run by scripts/bench.sh"]
async fn throughput_of_one_tenant_put_record_and_put_records() {
    one_tenant(false).await;
    one_tenant(true).await;
}
