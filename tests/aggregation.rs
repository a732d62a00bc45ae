//! KPL aggregation (`"aggregate": true`): one user's waiting events become one Kinesis
//! record in the KPL aggregated format, which AWS's own deaggregation module turns back
//! into every event, byte for byte, in order.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::bin;
use kd_testkit::env::{wait_metric, FakeEnv as Env, TOPIC};
use kd_testkit::{Fault, Worker};

/// The user records in `records` (stream order) as AWS's Python deaggregation module
/// reads them: (partition key, data).
fn deaggregate(records: &[kd_testkit::FakeRecord]) -> Vec<(String, Vec<u8>)> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/deaggregate.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/test.sh installs aws_kinesis_agg)");
    let mut input = String::new();
    for (i, r) in records.iter().enumerate() {
        let line = serde_json::json!({
            "partitionKey": r.partition_key,
            "data": base64::engine::general_purpose::STANDARD.encode(&r.data),
            "sequenceNumber": i.to_string(),
        });
        input.push_str(&line.to_string());
        input.push('\n');
    }
    // Written from a thread: the script answers while it reads, and would block on a
    // full stdout pipe while we block on a full stdin one.
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "deaggregation failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["partitionKey"].as_str().unwrap().to_owned(),
                base64::engine::general_purpose::STANDARD
                    .decode(v["data"].as_str().unwrap())
                    .unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_users_events_are_aggregated_and_deaggregate_byte_for_byte_in_order() {
    let env = Env::start().await;
    let mut t = env.tenant("src_agg", "agg", 2);
    t.aggregate = true;
    t.use_put_records = None;
    // Answers take 20 ms: a hot user's next events wait in its lane meanwhile, and go
    // together in the next write.
    env.fake.fail_for(
        "agg",
        Fault::Latency(Duration::from_millis(20)),
        Duration::from_secs(600),
    );
    let cfg = env.config(&[&t]);
    cfg.write();

    // One hot user (600 events, some large: lengths past one and two varint bytes),
    // three quiet ones, interleaved; unicode, escapes and control characters.
    let mut records = Vec::new();
    let mut expected: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for seq in 0..600 {
        let pad = "é\u{1}\"\\".repeat(if seq % 50 == 7 { 20_000 } else { seq % 40 });
        let mut users = vec!["hot".to_owned()];
        if seq % 30 == 0 {
            users.extend(["quiet-a", "quiet-b", "quiet-c"].map(str::to_owned));
        }
        for user in users {
            let value = serde_json::json!({"type": "track", "event": "Agg", "userId": user,
                "messageId": format!("{user}/{seq}"), "properties": {"seq": seq, "pad": pad}})
            .to_string()
            .into_bytes();
            expected
                .entry(user.clone())
                .or_default()
                .push(value.clone());
            records.push((
                user.clone(),
                value,
                vec![("source_id".to_owned(), "src_agg".to_owned())],
            ));
        }
    }
    env.kafka.send_many(TOPIC, &records).await;
    let total = records.len();

    let worker = Worker::start_ready(bin(), &cfg);
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        total as f64,
        Duration::from_secs(120),
    )
    .await;
    let written = env.fake.records_of("agg");
    let users = deaggregate(&written);
    assert_eq!(users.len(), total, "every event comes back, once");
    let mut got: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for (key, data) in users {
        got.entry(key).or_default().push(data);
    }
    for (user, sent) in &expected {
        let back = got.get(user).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(back.len(), sent.len(), "{user}");
        for (i, (b, s)) in back.iter().zip(sent).enumerate() {
            assert!(b == s, "{user}: event {i} differs after deaggregation");
        }
    }
    // Aggregated it was: far fewer Kinesis records than events, and the metrics say so.
    assert!(
        written.len() * 4 < total,
        "{} Kinesis records for {total} events",
        written.len()
    );
    let m = worker.metrics();
    let value = |name: &str| kd_testkit::metric_value(&m, name);
    let kinesis = value("kinesis_destination_aggregated_kinesis_records_total");
    let inside = value("kinesis_destination_aggregated_user_records_total");
    assert!(
        kinesis >= 1.0 && inside > kinesis,
        "{kinesis} aggregates of {inside} events"
    );
    assert!(inside + (written.len() as f64 - kinesis) >= total as f64);
}
