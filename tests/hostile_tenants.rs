//! Hostile tenants and outsiders: a tenant that names another tenant's stream spends
//! none of its capacity, an outage in one AWS region delays no other region, and slow
//! connections to the HTTP port cannot starve the probes.

mod common;
use common::bin;
use std::time::{Duration, Instant};

use kd_testkit::env::{wait_metric, FakeEnv as Env, DLQ};
use kd_testkit::{FakeRecord, Kafka, Worker, CALLER_ACCOUNT};
use serde_json::json;

const VICTIM_ARN: &str = "arn:aws:kinesis:us-east-1:111111111111:stream/victim";

/// Events per second the victim's records reached its stream at, first to last.
fn rate(records: &[&FakeRecord]) -> f64 {
    let first = records.iter().map(|r| r.at).min().unwrap();
    let last = records.iter().map(|r| r.at).max().unwrap();
    records.len() as f64 / (last - first).as_secs_f64().max(0.001)
}

/// `count` events of `source` over 50 users, phase `phase`, interleaved with the others.
fn events(source: &str, phase: usize, count: usize) -> Vec<(String, String, usize)> {
    (0..count)
        .map(|i| {
            (
                source.to_owned(),
                format!("{source}-u{}", i % 50),
                phase * 100_000 + i,
            )
        })
        .collect()
}

/// Tenant B writes to its one-shard stream at the shard's capacity (the fake enforces
/// 1,000 records/s), first alone, then while two tenants name B's stream: A1 with B's
/// role (which it cannot assume: the trust policy wants B's external ID), A2 with a role
/// of its own account (which the stream's account does not admit). Their events are
/// dead-lettered, and B is written as fast as when alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_naming_another_tenants_stream_spends_none_of_its_capacity() {
    let env = Env::start().await;
    env.fake.create_stream_arn(VICTIM_ARN, 1);
    env.fake.enforce_capacity("victim");
    let b_role = "arn:aws:iam::111111111111:role/segment-kinesis";
    env.fake.set_trust_policy(
        b_role,
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Principal": {"AWS": format!("arn:aws:iam::{CALLER_ACCOUNT}:root")},
            "Action": "sts:AssumeRole",
            "Condition": {"StringEquals": {"sts:ExternalId": "src_b"}}}]}),
    );
    let cfg = env.config(&[]);
    // Batched (the default, `auto`): the path where a record took its tokens before
    // its tenant's role was known good.
    cfg.write_tenants(&[
        json!({"sourceId": "src_b", "roleAddress": b_role, "streamArn": VICTIM_ARN}),
        json!({"sourceId": "src_a1", "roleAddress": b_role, "streamArn": VICTIM_ARN}),
        json!({"sourceId": "src_a2", "roleAddress": "arn:aws:iam::222222222222:role/mine",
            "streamArn": VICTIM_ARN}),
    ]);
    // Refusals are retried 2 s (IAM changes take a while to reach every region), a
    // few attempts a second: the attackers' retries run through B's phase.
    let cfg = cfg
        .set("delivery", "initial_backoff_ms = 20")
        .set("delivery", "max_backoff_ms = 200")
        .set("delivery", "permanent_error_window_secs = 2");
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);

    let per_phase = 3000;
    // Alone.
    env.send_all(&events("src_b", 0, per_phase)).await;
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        per_phase as f64,
        Duration::from_secs(60),
    )
    .await;
    let alone_records = env.fake.records_of("victim");
    let alone = rate(&alone_records.iter().collect::<Vec<_>>());

    // With A1 and A2 naming B's stream, their events among B's.
    let hostile = 300;
    let mut mixed = Vec::new();
    let (a1, a2) = (events("src_a1", 1, hostile), events("src_a2", 1, hostile));
    for (i, b) in events("src_b", 1, per_phase).into_iter().enumerate() {
        if i < hostile {
            mixed.extend([a1[i].clone(), a2[i].clone()]);
        }
        mixed.push(b);
    }
    let started = Instant::now();
    env.send_all(&mixed).await;
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        2.0 * per_phase as f64,
        Duration::from_secs(60),
    )
    .await;
    let b_done = started.elapsed();
    let records = env.fake.records_of("victim");
    let attacked: Vec<&FakeRecord> = records[alone_records.len()..].iter().collect();
    assert!(
        attacked.iter().all(|r| r.json()["messageId"]
            .as_str()
            .unwrap()
            .starts_with("src_b/")),
        "only B's events reach B's stream"
    );
    let with_attackers = rate(&attacked);
    let dead = env
        .kafka
        .read_topic(DLQ, 2 * hostile, Duration::from_secs(90));
    assert_eq!(dead.len(), 2 * hostile, "{}", worker.logs());
    for d in &dead {
        let source = Kafka::header(d, "source_id").unwrap();
        assert!(source == "src_a1" || source == "src_a2", "{source}");
        assert_eq!(
            Kafka::header(d, "dlq.reason").as_deref(),
            Some("destination_rejected")
        );
        let error = Kafka::header(d, "dlq.error").unwrap();
        assert!(error.contains("AccessDenied"), "{error}");
    }
    eprintln!(
        "tenant B: {alone:.0} events/s alone, {with_attackers:.0} events/s with A1 and A2 \
         naming its stream ({} of their events dead-lettered); B's last event written {:.2}s \
         after the mixed input was produced; {} writes refused for capacity",
        dead.len(),
        b_done.as_secs_f64(),
        env.fake.throttled_at().len()
    );
    assert!(
        with_attackers >= 0.85 * alone,
        "B slowed from {alone:.0} to {with_attackers:.0} events/s"
    );
    worker.stop();
}
