//! Kinesis as tenants run it today, against a real broker (Tansu) and the AWS fake:
//! streams named by ARN, streams shared by resource policy instead of a role (and a
//! tenant naming another tenant's ARN), streams resharded while written, and records
//! up to 10 MiB.

mod common;
use common::bin;
use std::time::Duration;

use kd_testkit::env::{assert_all_delivered_in_order, wait_metric, FakeEnv as Env, DLQ, TOPIC};
use kd_testkit::{metric_value, Kafka, Worker};
use serde_json::json;

/// The worker's own writer role (`aws.resource_policy_role`), in the worker's account.
const WRITER: &str = "arn:aws:iam::999999999999:role/kinesis-destination-writer";

fn events(
    source: &str,
    users: usize,
    rounds: std::ops::Range<usize>,
) -> Vec<(String, String, usize)> {
    rounds
        .flat_map(|seq| (0..users).map(move |u| (source.to_owned(), format!("u{u}"), seq)))
        .collect()
}

/// The stream policy `kinesis-destination policy --source-id` prints, as a tenant would
/// attach it.
fn printed_stream_policy(arn: &str, source_id: &str) -> serde_json::Value {
    let out = std::process::Command::new(bin())
        .args([
            "policy",
            "--stream-arn",
            arn,
            "--principal",
            WRITER,
            "--source-id",
            source_id,
        ])
        .output()
        .expect("policy runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    printed["streamPolicies"][arn].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_arns_and_resource_policies_let_each_tenant_into_its_own_stream_only() {
    let env = Env::start().await;
    // A: its own role, its stream named by ARN.
    let arn_a = "arn:aws:kinesis:us-east-1:222222222222:stream/orders.a";
    env.fake.create_stream_arn(arn_a, 2);
    // B: no role; its stream's policy grants our writer role for B's source ID.
    let arn_b = "arn:aws:kinesis:eu-west-1:333333333333:stream/b-stream";
    env.fake.create_stream_arn(arn_b, 2);
    env.fake
        .set_stream_policy("b-stream", printed_stream_policy(arn_b, "src_b"));
    let cfg = env
        .config(&[])
        .set("aws", &format!("resource_policy_role = \"{WRITER}\""))
        .set("delivery", "permanent_error_window_secs = 3")
        .set("delivery", "initial_backoff_ms = 50")
        .set("delivery", "max_backoff_ms = 500");
    cfg.write_tenants(&[
        json!({"sourceId": "src_a", "roleAddress": "arn:aws:iam::222222222222:role/segment-kinesis",
               "streamArn": arn_a, "usePutRecords": true}),
        json!({"sourceId": "src_b", "streamArn": arn_b}),
        // C names B's stream in its own settings: AWS (the fake, evaluating B's policy)
        // must refuse it, since its session carries C's source ID.
        json!({"sourceId": "src_c", "streamArn": arn_b, "usePutRecords": false}),
    ]);
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);
    let sent_a = env.send_all(&events("src_a", 5, 0..10)).await;
    let sent_b = env.send_all(&events("src_b", 5, 0..10)).await;
    let sent_c = env.send_all(&events("src_c", 2, 0..3)).await;
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        100.0,
        Duration::from_secs(60),
    )
    .await;
    let dead = env
        .kafka
        .read_topic(DLQ, sent_c.len(), Duration::from_secs(60));
    assert_eq!(dead.len(), sent_c.len(), "{}", worker.logs());
    for d in &dead {
        assert_eq!(Kafka::header(d, "source_id").as_deref(), Some("src_c"));
        assert_eq!(
            Kafka::header(d, "dlq.reason").as_deref(),
            Some("destination_rejected")
        );
        let error = Kafka::header(d, "dlq.error").unwrap_or_default();
        assert!(
            error.contains("AccessDeniedException")
                && error.contains("no resource-based policy allows"),
            "{error}"
        );
    }
    assert_all_delivered_in_order(&sent_a, &env.fake.records_of("orders.a"));
    let in_b = env.fake.records_of("b-stream");
    assert_all_delivered_in_order(&sent_b, &in_b);
    assert!(
        in_b.iter().all(|r| r.json()["messageId"]
            .as_str()
            .unwrap_or_default()
            .starts_with("src_b/")),
        "nothing of C's in B's stream"
    );
    // Every call named its stream by ARN (writes, ListShards, DescribeStreamSummary).
    assert!(env.fake.calls_by_arn() >= 4, "{}", env.fake.calls_by_arn());
    assert_eq!(
        env.fake.requests("PutRecord")
            + env.fake.requests("PutRecords")
            + env.fake.requests("ListShards")
            + env.fake.requests("DescribeStreamSummary"),
        env.fake.calls_by_arn()
    );
    // B and C were written through the writer role, each in a session of its own
    // (tagged with its source ID, without an external ID); A through its own role.
    let calls = env.fake.assume_role_calls();
    let writer_sessions = calls.iter().filter(|c| c.role_arn == WRITER).count();
    assert!(writer_sessions >= 2, "{calls:?}");
    assert!(calls
        .iter()
        .filter(|c| c.role_arn == WRITER)
        .all(|c| c.external_id.is_none()));
    assert!(calls.iter().any(
        |c| c.role_arn.ends_with(":222222222222:role/segment-kinesis")
            && c.external_id.as_deref() == Some("src_a")
    ));
    env.wait_committed_to_end(&cfg.group_id).await;
    let m = worker.metrics();
    assert_eq!(
        metric_value(
            &m,
            "kinesis_destination_events_dead_lettered_total{reason=\"destination_rejected\"}"
        ),
        sent_c.len() as f64
    );
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resharded_while_written_is_listed_again_and_loses_nothing() {
    let env = Env::start().await;
    // On-demand: no `shards` in the settings; ListShards decides.
    env.fake.create_stream("grow", 2);
    env.fake.set_stream_shape("grow", true, 1024);
    let cfg = env.config(&[]);
    cfg.write_tenants(&[json!({"sourceId": "src_grow", "usePutRecords": true,
        "roleAddress": "arn:aws:iam::111111111111:role/segment-kinesis",
        "region": "us-east-1", "stream": "grow"})]);
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);
    let mut sent = env.send_all(&events("src_grow", 40, 0..10)).await;
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        400.0,
        Duration::from_secs(60),
    )
    .await;
    let listed_before = env.fake.requests("ListShards");
    assert!(listed_before >= 1);
    assert!(
        worker.logs().contains("shards=2"),
        "the map had the two shards"
    );
    // AWS splits the stream (2 to 4 shards) while events keep coming.
    env.fake.reshard("grow", 4);
    for round in 10..20 {
        sent.extend(
            env.send_all(&events("src_grow", 40, round..round + 1))
                .await,
        );
    }
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        800.0,
        Duration::from_secs(60),
    )
    .await;
    // A write landed on a shard the map did not have: listed again within seconds
    // (MIN_RELIST is 10 s), not at the 5-minute refresh.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !worker.logs().contains("shards=4") {
        assert!(
            std::time::Instant::now() < deadline,
            "not listed again: {}",
            worker.logs()
        );
        sent.extend(env.send_all(&events("src_grow", 40, 20..21)).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(env.fake.requests("ListShards") > listed_before);
    let records = env.fake.records_of("grow");
    assert_all_delivered_in_order(&sent, &records);
    env.wait_committed_to_end(&cfg.group_id).await;
    kd_testkit::assert_nothing_dead_lettered(&worker.metrics());
    worker.stop();
}

/// An event of `bytes` bytes for `user`.
fn sized_event(user: &str, id: &str, bytes: usize) -> Vec<u8> {
    let head = format!(r#"{{"type":"track","userId":"{user}","messageId":"{id}","p":""#);
    let mut v = head.into_bytes();
    v.resize(bytes - 2, b'x');
    v.extend_from_slice(b"\"}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_up_to_the_streams_raised_maximum_are_written_and_larger_ones_dead_lettered() {
    let env = Env::start().await;
    // A stream raised to 10 MiB records; the tenant does not say so, DescribeStreamSummary does.
    env.fake.create_stream("wide", 1);
    env.fake.set_stream_shape("wide", false, 10240);
    // A stream at the default 1 MiB.
    env.fake.create_stream("narrow", 1);
    let cfg = env.config(&[]);
    cfg.write_tenants(&[
        json!({"sourceId": "src_wide", "usePutRecords": true,
            "roleAddress": "arn:aws:iam::111111111111:role/segment-kinesis",
            "region": "us-east-1", "stream": "wide"}),
        json!({"sourceId": "src_narrow", "usePutRecords": true,
            "roleAddress": "arn:aws:iam::111111111111:role/segment-kinesis",
            "region": "us-east-1", "stream": "narrow"}),
    ]);
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);
    let mib = 1024 * 1024;
    // 9.9 MiB and 3 MiB into the wide stream, between small events of the same user;
    // 2 MiB into the narrow one; and 10.5 MiB, larger than any stream takes.
    let nine = sized_event("u", "src_wide/u/1", 10 * mib - 100 * 1024);
    let three = sized_event("u", "src_wide/u/2", 3 * mib);
    let two = sized_event("v", "src_narrow/v/0", 2 * mib);
    let huge = sized_event("w", "src_wide/w/0", 10 * mib + mib / 2);
    let send = |value: Vec<u8>, user: &'static str, source: &'static str| {
        let kafka = &env.kafka;
        async move {
            kafka
                .send(TOPIC, Some(user), &value, &[("source_id", source)])
                .await
        }
    };
    let first = env.send("src_wide", "u", 0).await;
    send(nine.clone(), "u", "src_wide").await;
    send(three.clone(), "u", "src_wide").await;
    let last = env.send("src_wide", "u", 3).await;
    let narrow_at = send(two.clone(), "v", "src_narrow").await;
    let huge_at = send(huge.clone(), "w", "src_wide").await;
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        4.0,
        Duration::from_secs(60),
    )
    .await;
    let wide = env.fake.records_of("wide");
    let data: Vec<&[u8]> = wide.iter().map(|r| r.data.as_slice()).collect();
    assert_eq!(data.len(), 4, "{}", worker.logs());
    assert_eq!(data[1], &nine[..], "9.9 MiB byte for byte");
    assert_eq!(data[2], &three[..]);
    // In the user's order: the small one, 9.9 MiB, 3 MiB, the small one.
    let ids: Vec<String> = wide
        .iter()
        .map(|r| {
            r.json()["messageId"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        ids,
        [
            first.id.as_str(),
            "src_wide/u/1",
            "src_wide/u/2",
            last.id.as_str()
        ]
    );
    let dead = env.kafka.read_topic(DLQ, 2, Duration::from_secs(60));
    assert_eq!(dead.len(), 2, "{}", worker.logs());
    for d in &dead {
        assert_eq!(
            Kafka::header(d, "dlq.reason").as_deref(),
            Some("record_too_large")
        );
    }
    let offsets: Vec<Option<String>> = dead
        .iter()
        .map(|d| Kafka::header(d, "dlq.offset"))
        .collect();
    assert!(
        offsets.contains(&Some(narrow_at.offset.to_string())),
        "{offsets:?}"
    );
    assert!(
        offsets.contains(&Some(huge_at.offset.to_string())),
        "{offsets:?}"
    );
    let narrow_dl = dead
        .iter()
        .find(|d| Kafka::header(d, "source_id").as_deref() == Some("src_narrow"))
        .unwrap();
    let why = Kafka::header(narrow_dl, "dlq.error").unwrap_or_default();
    assert!(
        why.contains("at most 1048576"),
        "the stream's own limit: {why}"
    );
    assert!(env.fake.records_of("narrow").is_empty());
    env.wait_committed_to_end(&cfg.group_id).await;
    let m = worker.metrics();
    assert_eq!(metric_value(&m, "kinesis_destination_in_flight_bytes"), 0.0);
    worker.stop();
}
