//! What real producers send, and what real clusters look like: compressed multi-record
//! batches of every codec, records over the size limits, a dead-letter topic that is
//! missing or goes away, large records of a tenant that is down. Nothing of it may stall
//! a partition, lose an event or let memory grow without bound.

mod common;
use common::{bin, replay};
use std::time::{Duration, Instant};

use kd_testkit::env::{
    assert_all_delivered_in_order, wait_metric, FakeEnv as Env, Sent, DLQ, PARTITIONS, TOPIC,
};
use kd_testkit::{eventually, metric_value, Fault, Kafka, Tansu, Worker};

/// 1.1 MB: over a tenant's default 1,024 KiB record limit and librdkafka's default
/// message.max.bytes.
fn big_event() -> String {
    format!(
        r#"{{"type":"track","userId":"u","messageId":"big","p":"{}"}}"#,
        "x".repeat(1_100_000)
    )
}

/// 600 events of 30 users, in rounds the producer batches.
fn events(source: &str) -> Vec<(String, String, usize)> {
    (0..20)
        .flat_map(|seq| (0..30).map(move |u| (source.to_owned(), format!("u{u}"), seq)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_is_delivered_even_when_fetches_start_inside_batches() {
    for codec in ["gzip", "snappy", "lz4", "zstd"] {
        // Tansu's SQLite engine cannot read snappy batches back; its patched memory
        // engine can (tests/broker.rs).
        let env = if codec == "snappy" {
            Env::with(Tansu::start_memory(), None).await
        } else {
            Env::start().await
        };
        let stream = format!("codec-{codec}");
        let t = env.tenant("src_codec", &stream, 4);
        // A small in-flight cap pauses and resumes the partitions all the time: each
        // resume fetches from inside a compressed batch.
        let cfg = env
            .config(&[&t])
            .set("delivery", "max_in_flight_per_partition = 20");
        cfg.write();
        let kafka = Kafka::compressed(&env.tansu.bootstrap(), codec);
        let sent = env.send_all_via(&kafka, &events("src_codec")).await;
        let mut worker = Worker::start_ready(bin(), &cfg);
        wait_metric(
            &worker,
            "kinesis_destination_events_delivered_total",
            sent.len() as f64,
            Duration::from_secs(60),
        )
        .await;
        assert_all_delivered_in_order(&sent, &env.fake.records_of(&stream));
        env.wait_committed_to_end(&cfg.group_id).await;
        let m = worker.metrics();
        kd_testkit::assert_nothing_dead_lettered(&m);
        assert_eq!(
            metric_value(&m, "kinesis_destination_events_received_total"),
            sent.len() as f64,
            "{codec}: every event read once"
        );
        worker.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_a_megabyte_is_dead_lettered_and_the_partition_commits_past_it() {
    let env = Env::start().await;
    let t = env.tenant("src_big", "big-records", 1);
    let cfg = env.config(&[&t]);
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);
    // Between ordinary events of the same user.
    let big = big_event();
    let before = env.send("src_big", "u", 0).await;
    let at = env
        .kafka
        .send(
            TOPIC,
            Some("u"),
            big.as_bytes(),
            &[("source_id", "src_big")],
        )
        .await;
    let after = env.send("src_big", "u", 2).await;
    let dead = env.kafka.read_topic(DLQ, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1, "{}", worker.logs());
    let dl = &dead[0];
    assert_eq!(
        Kafka::header(dl, "dlq.reason").as_deref(),
        Some("record_too_large")
    );
    assert_eq!(Kafka::header(dl, "dlq.offset"), Some(at.offset.to_string()));
    assert_eq!(Kafka::value(dl), big.as_bytes(), "the whole record fits");
    assert_eq!(Kafka::header(dl, "dlq.truncated"), None);
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        2.0,
        Duration::from_secs(30),
    )
    .await;
    assert_all_delivered_in_order(&[before, after], &env.fake.records_of("big-records"));
    env.wait_committed_to_end(&cfg.group_id).await;
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_its_topic_is_cut_to_fit_and_says_so() {
    let env = Env::start().await;
    let t = env.tenant("src_big", "big-records", 1);
    // The dead-letter path is held to librdkafka's default of 1,000,000 bytes, as an
    // operator may set it: the 1.1 MB record cannot be written whole.
    let cfg = env
        .config(&[&t])
        .set("kafka.librdkafka", "\"message.max.bytes\" = \"1000000\"");
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);
    let big = big_event();
    let at = env
        .kafka
        .send(
            TOPIC,
            Some("u"),
            big.as_bytes(),
            &[("source_id", "src_big")],
        )
        .await;
    let after = env.send("src_big", "u", 1).await;
    let dead = env.kafka.read_topic(DLQ, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1, "{}", worker.logs());
    let dl = &dead[0];
    assert_eq!(
        Kafka::header(dl, "dlq.reason").as_deref(),
        Some("record_too_large")
    );
    assert_eq!(Kafka::header(dl, "dlq.truncated").as_deref(), Some("true"));
    assert_eq!(
        Kafka::header(dl, "dlq.original_size"),
        Some(big.len().to_string())
    );
    assert_eq!(Kafka::header(dl, "dlq.offset"), Some(at.offset.to_string()));
    let value = Kafka::value(dl);
    assert!(
        !value.is_empty() && value.len() < 1_000_000 && big.as_bytes().starts_with(value),
        "the value is the start of the original, cut to fit: {} bytes",
        value.len()
    );
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        1.0,
        Duration::from_secs(30),
    )
    .await;
    assert_all_delivered_in_order(&[after], &env.fake.records_of("big-records"));
    env.wait_committed_to_end(&cfg.group_id).await;
    assert_eq!(
        worker.get("/readyz").map(|r| r.0),
        Some(200),
        "a dead letter cut to fit is no failure"
    );
    assert_eq!(
        worker.metric("kinesis_destination_dead_letters_truncated_total"),
        1.0,
        "but it is counted, to be alerted on"
    );
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_stops_the_worker_at_start_with_one_line_naming_it() {
    let tansu = Tansu::start();
    tansu.create_topic(TOPIC, PARTITIONS as u32);
    let fake = kd_testkit::FakeAws::start().await;
    let cfg = kd_testkit::WorkerConfig::new(&tansu.bootstrap(), &fake.endpoint());
    cfg.write_tenants(&[]);
    cfg.write();
    // No dead-letter topic.
    let mut worker = Worker::start(bin(), &cfg);
    let status = worker.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{}", worker.logs());
    let logs = worker.logs();
    let line = logs.lines().last().unwrap_or_default();
    assert!(
        line.contains("kafka.dead_letter_topic") && line.contains("segment-events-dlq"),
        "{logs}"
    );
    // No input topic either, once the dead-letter topic exists.
    tansu.create_topic(DLQ, 1);
    stops_naming(
        &cfg,
        ("KINESIS_DESTINATION__KAFKA__TOPICS", "no-such-topic"),
        "kafka.topics",
    );
    // Nor a status topic, when status.topic names one.
    stops_naming(
        &cfg,
        ("KINESIS_DESTINATION__STATUS__TOPIC", "no-status-topic"),
        "status.topic",
    );
}

/// Starts a worker with the override `(variable, topic)` naming a topic the brokers do
/// not have: it exits with code 2, its last line naming `key` and the topic.
fn stops_naming(cfg: &kd_testkit::WorkerConfig, (variable, topic): (&str, &str), key: &str) {
    let mut worker = Worker::start_with_env(bin(), cfg, &[(variable, topic)]);
    let status = worker.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{}", worker.logs());
    let logs = worker.logs();
    assert!(
        logs.lines()
            .last()
            .is_some_and(|l| l.contains(key) && l.contains(topic)),
        "{logs}"
    );
}

/// Tansu cannot make a topic refuse writes (no ACLs; and its `topic delete` removes
/// every topic, with the SQLite engine at least), so this test runs against librdkafka's own mock broker, which answers
/// the requests it is told to with the error given: here, the dead-letter producer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_that_refuses_writes_takes_readiness_away_until_it_accepts_them() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic(TOPIC, PARTITIONS, 1).unwrap();
    mock.create_topic(DLQ, 1, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let kafka = Kafka::new(&bootstrap);
    let fake = kd_testkit::FakeAws::start().await;
    fake.create_stream("refused-dlq", 1);
    let t = kd_testkit::Tenant::new("src_ok", "111111111111", "us-east-1", "refused-dlq");
    let cfg = kd_testkit::WorkerConfig::new(&bootstrap, &fake.endpoint())
        .set("delivery", "initial_backoff_ms = 50")
        .set("delivery", "max_backoff_ms = 400");
    cfg.write_tenants(&[t.settings()]);
    cfg.write();
    // A bad event, then good ones.
    kafka
        .send(TOPIC, Some("k"), b"{not json", &[("source_id", "src_ok")])
        .await;
    for n in 0..20 {
        let value = format!(r#"{{"type":"track","userId":"u{n}","messageId":"m{n}"}}"#);
        kafka
            .send(
                TOPIC,
                Some(&format!("u{n}")),
                value.as_bytes(),
                &[("source_id", "src_ok")],
            )
            .await;
    }
    // From now on the next 40 produce requests are refused: the worker's dead letter.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 40],
    );
    let mut worker = Worker::start_ready(bin(), &cfg);
    let reason = eventually(Duration::from_secs(30), "readiness taken away", || async {
        match worker.get("/readyz") {
            Some((503, body)) => Some(body),
            _ => None,
        }
    })
    .await;
    // Any caller may read /readyz: it names the failing part, the log has the error.
    assert!(
        reason.contains("dead letters cannot be written") && !reason.contains(DLQ),
        "{reason}"
    );
    let logs = worker.logs();
    assert!(
        logs.contains(DLQ) && logs.contains("authorization"),
        "the log names the topic and the cause: {logs}"
    );
    // The good events are written meanwhile.
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        20.0,
        Duration::from_secs(30),
    )
    .await;
    // Once the topic takes writes again, the dead letter is written and the worker is
    // ready again.
    wait_metric(
        &worker,
        "kinesis_destination_events_dead_lettered_total{reason=\"invalid_json\"}",
        1.0,
        Duration::from_secs(60),
    )
    .await;
    let m = worker.metrics();
    let failures = metric_value(
        &m,
        "kinesis_destination_dead_letter_failures_total{error=\"TopicAuthorizationFailed\"}",
    );
    assert!(
        failures >= 10.0,
        "every failed attempt counted: {failures}\n{m}"
    );
    let lines = worker
        .logs()
        .matches("dead letters cannot be written")
        .count();
    assert_eq!(lines, 1, "logged once a minute:\n{}", worker.logs());
    eventually(Duration::from_secs(10), "ready again", || async {
        (worker.get("/readyz").map(|r| r.0) == Some(200)).then_some(())
    })
    .await;
    let dead = kafka.read_topic(DLQ, 1, Duration::from_secs(10));
    assert_eq!(dead.len(), 1);
    assert_eq!(Kafka::value(&dead[0]), b"{not json");
    kafka
        .wait_committed_to_end(&cfg.group_id, TOPIC, PARTITIONS)
        .await;
    worker.stop();
}

/// Resident memory the worker must stay under while a down tenant's large records wait:
/// the in-flight byte budget (64 MiB here) and librdkafka's prefetch queue (64 MiB by
/// default), plus the process itself. Measured: 67 MiB; 301 MiB without the byte budget
/// (all 264 MiB of the down tenant's records in flight).
const LARGE_RECORDS_RSS_BOUND: u64 = 192 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_records_of_a_down_tenant_are_bounded_in_bytes_while_others_flow() {
    let env = Env::start().await;
    let down = env.tenant("src_down", "down", 1);
    env.fake.fail_for(
        "down",
        Fault::Error {
            status: 503,
            code: "ServiceUnavailable".into(),
        },
        Duration::from_secs(3600),
    );
    let others: Vec<_> = (0..5)
        .map(|i| env.tenant(&format!("src_o{i}"), &format!("other-{i}"), 16))
        .collect();
    let mut all = vec![&down];
    all.extend(others.iter());
    let cfg = env
        .config(&all)
        .set("delivery", "max_in_flight_bytes = 67108864");
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);
    // 300 records of 900 KiB for the down tenant (264 MiB), mixed with the others'.
    let pad = "x".repeat(900 * 1024);
    let mut sent: Vec<Sent> = Vec::new();
    for round in 0..30 {
        let large: Vec<kd_testkit::Record> = (0..10)
            .map(|i| {
                let user = format!("d{}", (round * 10 + i) % 50);
                let value = format!(
                    r#"{{"type":"track","userId":"{user}","messageId":"down/{round}/{i}","p":"{pad}"}}"#
                );
                (
                    user,
                    value.into_bytes(),
                    vec![("source_id".to_owned(), "src_down".to_owned())],
                )
            })
            .collect();
        env.kafka.send_many(TOPIC, &large).await;
        let small: Vec<(String, String, usize)> = (0..200)
            .map(|i| (format!("src_o{}", i % 5), format!("u{}", i % 40), round))
            .collect();
        sent.extend(env.send_all(&small).await);
    }
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    while worker.metric("kinesis_destination_events_delivered_total") < sent.len() as f64 {
        assert!(
            Instant::now() < deadline,
            "the other tenants' {} events not delivered in time:\n{}",
            sent.len(),
            worker.metrics()
        );
        peak = peak.max(worker.rss_bytes());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    peak = peak.max(worker.rss_bytes());
    for o in &others {
        let of: Vec<Sent> = sent
            .iter()
            .filter(|s| s.id.starts_with(&format!("{}/", o.source_id)))
            .cloned()
            .collect();
        assert_all_delivered_in_order(&of, &env.fake.records_of(&o.stream));
    }
    let m = worker.metrics();
    let held = metric_value(&m, "kinesis_destination_in_flight_bytes");
    eprintln!(
        "large records: peak resident memory {} MiB, {} MiB of the down tenant in flight",
        peak / (1024 * 1024),
        held / 1048576.0
    );
    assert!(
        held > 0.0 && held <= 64.0 * 1048576.0,
        "in-flight bytes {held}"
    );
    assert!(
        peak > 0 && peak < LARGE_RECORDS_RSS_BOUND,
        "peak RSS {} MiB",
        peak / 1048576
    );
    // The waiting events show as the age of the oldest one in flight.
    eventually(
        Duration::from_secs(10),
        "oldest in flight published",
        || async {
            let m = worker.metrics();
            let oldest = m
                .lines()
                .filter(|l| l.starts_with("kinesis_destination_oldest_in_flight_seconds{"))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .fold(0.0, f64::max);
            (oldest >= 2.0).then_some(())
        },
    )
    .await;
    assert!(env.fake.records_of("down").is_empty());
    kd_testkit::assert_nothing_dead_lettered(&m);
    worker.sigkill();
}

/// Kafka allows any bytes in a header name, and producers in other languages send
/// them; rdkafka's header accessor panics on a name that is not UTF-8, which read
/// every time the record is fetched again would have crash-looped the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_is_carried_through_and_crashes_nothing() {
    let env = Env::start().await;
    let t = env.tenant("src_raw", "raw-headers", 1);
    let cfg = env.config(&[&t]);
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);
    let event = br#"{"type":"track","userId":"u-raw","messageId":"raw-1"}"#;
    let headers: [(&[u8], Option<&[u8]>); 4] = [
        (b"caf\xe9", Some(b"latin-1 name")),
        (b"source_id", Some(b"src_raw")),
        (b"\xff\xfe", None),
        (b"empty", Some(b"")),
    ];
    env.kafka.send_raw(TOPIC, b"u-raw", event, &headers);
    // Not JSON: a dead letter that keeps the headers, names made valid UTF-8.
    env.kafka.send_raw(TOPIC, b"u-raw", b"{not json", &headers);
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        1.0,
        Duration::from_secs(30),
    )
    .await;
    let written = env.fake.records_of("raw-headers");
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].data, event, "the event itself, byte for byte");
    assert_eq!(written[0].partition_key, "u-raw");
    let dead = env.kafka.read_topic(DLQ, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1, "{}", worker.logs());
    let dl = &dead[0];
    assert_eq!(
        Kafka::header(dl, "dlq.reason").as_deref(),
        Some("invalid_json")
    );
    assert_eq!(Kafka::value(dl), b"{not json");
    let names: Vec<(String, Option<Vec<u8>>)> =
        rdkafka::message::Headers::iter(rdkafka::Message::headers(dl).expect("headers"))
            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
            .take(4)
            .collect();
    assert_eq!(
        names,
        vec![
            ("caf\u{fffd}".to_owned(), Some(b"latin-1 name".to_vec())),
            ("source_id".to_owned(), Some(b"src_raw".to_vec())),
            ("\u{fffd}\u{fffd}".to_owned(), None),
            ("empty".to_owned(), Some(Vec::new())),
        ],
        "the original headers in order, null and empty values kept apart"
    );
    assert!(
        matches!(worker.get("/readyz"), Some((200, _))),
        "still up and ready:\n{}",
        worker.logs()
    );
    // `replay` reads such names too: a dead letter someone else produced with one is
    // sent back (its name made UTF-8), not a crash.
    let topic = TOPIC.as_bytes();
    env.kafka.send_raw(
        DLQ,
        b"u-raw",
        event,
        &[
            (b"caf\xe9", Some(b"x")),
            (b"source_id", Some(b"src_raw")),
            (b"dlq.reason", Some(b"unknown_source")),
            (b"dlq.topic", Some(topic)),
        ],
    );
    let stderr = replay(&["--reason", "unknown_source"], &cfg.path());
    assert!(stderr.contains("replayed 1 of 2"), "{stderr}");
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        2.0,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(env.fake.records_of("raw-headers").len(), 2);
    env.wait_committed_to_end(&cfg.group_id).await;
    worker.stop();
}
