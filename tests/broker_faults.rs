//! Kafka failing as it does in production, under a worker that is delivering: the broker
//! SIGKILLed and restarted on its data (for 10 s, and for longer than every librdkafka
//! timeout the worker sets), a network path to the broker that drops everything
//! without closing (a black hole), and one AWS region black-holed while another writes.
//! Nothing may be lost, order per user holds among first deliveries, commits reach the
//! end, and the worker recovers by itself.

mod common;
use common::bin;
use std::time::{Duration, Instant};

use kd_testkit::env::{
    assert_all_delivered_in_order, first_deliveries, send_events, wait_metric, FakeEnv as Env, Sent,
};
use kd_testkit::env::{DLQ, TOPIC};
use kd_testkit::{eventually, Kafka, Tenant, Worker, WorkerConfig};

const DELIVERED: &str = "kinesis_destination_events_delivered_total";

/// The sum of every series of `name` (all label values).
fn sum_of(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v)
}

/// Waits until `/readyz` answers `status` with a body containing `says`.
async fn wait_readyz(worker: &Worker, status: u16, says: &str, timeout: Duration) -> String {
    eventually(
        timeout,
        &format!("/readyz {status} saying {says:?}"),
        || {
            let got = worker.get("/readyz");
            async move {
                got.filter(|(code, body)| *code == status && body.contains(says))
                    .map(|(_, body)| body)
            }
        },
    )
    .await
}

/// 20,000 events of 200 users, batched, to a two-shard stream that takes 2,000 records a
/// second (so the outage comes mid-stream); the broker is SIGKILLed once 3,000 are
/// delivered, stays down for `down`, and is restarted on the same data directory.
async fn broker_killed_mid_stream(down: Duration) {
    let mut env = Env::start().await;
    let mut t = env.tenant("src_b", "broker-kill", 2);
    // Batched, as tenants are by default.
    t.use_put_records = None;
    env.fake.enforce_capacity("broker-kill");
    let cfg = env
        .config(&[&t])
        .set("delivery", "initial_backoff_ms = 20")
        .set("delivery", "max_backoff_ms = 500");
    cfg.write();
    let sent: Vec<Sent> = env.send_many("src_b", 200, 100).await;
    assert_eq!(sent.len(), 20_000);
    let mut worker = Worker::start_ready(bin(), &cfg);
    wait_metric(&worker, DELIVERED, 3_000.0, Duration::from_secs(60)).await;

    env.tansu.kill();
    let killed = Instant::now();
    // librdkafka reports every broker down within a few seconds; readiness says so, and
    // the consumer's errors are counted.
    let body = wait_readyz(&worker, 503, "kafka", Duration::from_secs(10)).await;
    eprintln!(
        "broker down {:?} after the kill: /readyz {body:?}",
        killed.elapsed()
    );
    let m = worker.metrics();
    assert!(
        m.contains("kinesis_destination_consumer_errors_total{error=\"AllBrokersDown\"}"),
        "the outage is counted by kind:\n{m}"
    );
    // What was read before the kill goes on being written while the broker is down.
    let delivered_at_kill = worker.metric(DELIVERED);
    tokio::time::sleep(down.saturating_sub(killed.elapsed())).await;
    assert_eq!(
        worker.get("/healthz").map(|r| r.0),
        Some(200),
        "alive through the outage"
    );
    let m = worker.metrics();
    assert_eq!(
        kd_testkit::metric_value(&m, "kinesis_destination_kafka_brokers_answering"),
        0.0,
        "no broker answers while it is down:\n{m}"
    );
    assert_eq!(worker.get("/readyz").map(|r| r.0), Some(503));
    let errors_while_down = sum_of(&m, "kinesis_destination_consumer_errors_total");
    assert!(errors_while_down >= 1.0, "{m}");
    let lines = worker
        .logs()
        .matches("no Kafka broker can be reached")
        .count();
    let minutes = down.as_secs() / 60 + 1;
    assert!(
        (1..=minutes as usize).contains(&lines),
        "the outage is logged once a minute ({lines} lines in {down:?})"
    );

    env.tansu.restart();
    let restarted = Instant::now();
    wait_readyz(&worker, 200, "", Duration::from_secs(60)).await;
    eprintln!("ready again {:?} after the restart", restarted.elapsed());
    env.wait_committed_to_end(&cfg.group_id).await;
    let records = env.fake.records_of("broker-kill");
    assert_all_delivered_in_order(&sent, &records);
    let m = worker.metrics();
    kd_testkit::assert_nothing_dead_lettered(&m);
    assert!(kd_testkit::metric_value(&m, "kinesis_destination_kafka_brokers_answering") >= 1.0);
    let logs = worker.logs();
    assert!(
        logs.contains("kafka brokers answer again"),
        "the recovery is logged"
    );
    // When the group forgot the worker (its session expired while the broker was down),
    // what it wrote meanwhile is committed once it has its partitions back, not written
    // again from the last commit.
    if logs.contains("kept the offsets of work done") {
        assert!(
            logs.contains("committed work done before the group lost this pod"),
            "{logs}"
        );
    }
    eprintln!(
        "broker down {down:?}: {} events, {} duplicates, {delivered_at_kill} delivered at the kill, \
         {errors_while_down} consumer errors while down",
        sent.len(),
        records.len() - first_deliveries(&records).len(),
    );
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sigkilled_for_10s_loses_nothing() {
    broker_killed_mid_stream(Duration::from_secs(10)).await;
}

/// Longer than `session.timeout.ms` (45 s), the dead-letter producer's
/// `message.timeout.ms` (30 s), `socket.timeout.ms` (60 s) and the librdkafka
/// reconnect backoff's ceiling (10 s): the group has forgotten the worker by the time
/// the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_for_3_minutes_loses_nothing() {
    broker_killed_mid_stream(Duration::from_secs(180)).await;
}

/// The path to the broker drops everything for 60 s without closing a connection; new
/// connections are accepted and never answered. No error comes from librdkafka for up
/// to `socket.timeout.ms`: the worker notices from its statistics that no broker has
/// answered for 30 s, says so in `/readyz`, a gauge and a log line, and reads on by
/// itself once the path is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_broker_is_noticed_and_recovered_from() {
    let env = Env::behind_proxy().await;
    let t = env.tenant("src_h", "black-hole", 4);
    let cfg = WorkerConfig::new(&env.proxy_bootstrap(), &env.fake.endpoint());
    cfg.write_tenants(&[t.settings()]);
    cfg.write();
    let mut sent = env.send_many("src_h", 50, 20).await;
    let mut worker = Worker::start_ready(bin(), &cfg);
    wait_metric(&worker, DELIVERED, 1_000.0, Duration::from_secs(60)).await;

    let proxy = env.proxy.as_ref().unwrap();
    proxy.black_hole();
    let holed = Instant::now();
    // Events produced meanwhile go through the same path (the broker advertises the
    // proxy): they are sent once it is back, by a producer of their own.
    let during: Vec<(String, String, usize)> = (20..22)
        .flat_map(|seq| (0..50).map(move |u| ("src_h".to_owned(), format!("src_h-u{u}"), seq)))
        .collect();
    let producer = Kafka::new(&env.tansu.bootstrap());
    let sending = tokio::spawn(async move { send_events(&producer, &during).await });
    let body = wait_readyz(&worker, 503, "kafka", Duration::from_secs(50)).await;
    let noticed = holed.elapsed();
    eprintln!("black hole noticed after {noticed:?}: {body:?}");
    assert!(
        noticed >= Duration::from_secs(25),
        "not before 30 s of silence"
    );
    assert_eq!(
        worker.metric("kinesis_destination_kafka_brokers_answering"),
        0.0
    );
    assert!(worker
        .logs()
        .contains("no Kafka broker has answered for 30 s"));
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(holed.elapsed())).await;
    assert_eq!(worker.get("/healthz").map(|r| r.0), Some(200));

    proxy.up();
    let back = Instant::now();
    sent.extend(sending.await.expect("events sent once the path is back"));
    wait_readyz(&worker, 200, "", Duration::from_secs(90)).await;
    eprintln!("ready again {:?} after the path came back", back.elapsed());
    env.wait_committed_to_end(&cfg.group_id).await;
    let records = env.fake.records_of("black-hole");
    assert_all_delivered_in_order(&sent, &records);
    kd_testkit::assert_nothing_dead_lettered(&worker.metrics());
    eprintln!(
        "kafka black hole: {} events, {} duplicates",
        sent.len(),
        records.len() - first_deliveries(&records).len()
    );
    worker.stop();
}

/// Requests to one region are read and never answered for 60 s. That region's writes
/// time out (`aws.api_timeout_ms`) and are retried until the path is back; another
/// region's tenant, on the same partitions, keeps being written meanwhile. The pod
/// stays ready (a region is not the whole of AWS, and no other pod would do better).
/// Then the other region too: nothing answers, and the pod says it is not ready until
/// AWS answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_aws_region_leaves_other_regions_writing() {
    let env = Env::start().await;
    let east = env.tenant("src_east", "east", 2);
    let mut west = Tenant::new("src_west", "222222222222", "eu-west-1", "west");
    west.shards = 2;
    env.fake.create_stream("west", 2);
    let cfg = env
        .config(&[&east, &west])
        .set("aws", "api_timeout_ms = 2000")
        .set("delivery", "initial_backoff_ms = 50")
        .set("delivery", "max_backoff_ms = 1000");
    cfg.write();
    let events = |seqs: std::ops::Range<usize>| -> Vec<(String, String, usize)> {
        seqs.flat_map(|seq| {
            (0..20).flat_map(move |u| {
                [
                    ("src_east".to_owned(), format!("e{u}"), seq),
                    ("src_west".to_owned(), format!("w{u}"), seq),
                ]
            })
        })
        .collect()
    };
    let mut sent = env.send_all(&events(0..5)).await;
    let mut worker = Worker::start_ready(bin(), &cfg);
    env.wait_committed_to_end(&cfg.group_id).await;

    env.fake.black_hole_region("eu-west-1", true);
    let holed = Instant::now();
    // Both tenants' events keep coming, interleaved in the same partitions.
    let mut east_during = 0;
    for round in 0..5 {
        sent.extend(env.send_all(&events(5 + round * 2..7 + round * 2)).await);
        tokio::time::sleep(Duration::from_secs(8)).await;
        east_during = env.fake.records_of("east").len();
    }
    let east_sent = sent.iter().filter(|s| s.id.starts_with("src_east")).count();
    let west_written = first_deliveries(&env.fake.records_of("west")).len();
    let m = worker.metrics();
    eprintln!(
        "after {:?} of eu-west-1 black hole: east {east_during} written of {east_sent}, \
         west {west_written} (written before it)",
        holed.elapsed()
    );
    eventually(
        Duration::from_secs(20),
        "us-east-1 keeps being written through eu-west-1's black hole",
        || {
            let written = first_deliveries(&env.fake.records_of("east")).len();
            async move { (written == east_sent).then_some(()) }
        },
    )
    .await;
    assert_eq!(west_written, 100, "nothing answers in eu-west-1");
    assert!(
        kd_testkit::metric_value(
            &m,
            "kinesis_destination_put_errors_total{error=\"Timeout\"}"
        ) >= 1.0,
        "the timeouts are counted:\n{m}"
    );
    assert!(
        worker
            .logs()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("writes failing") && l.contains("Timeout")),
        "and logged (a warning a minute per error and region)"
    );
    assert_eq!(worker.get("/readyz").map(|r| r.0), Some(200));

    tokio::time::sleep(Duration::from_secs(60).saturating_sub(holed.elapsed())).await;

    // Then us-east-1 too: no Kinesis endpoint answers, nothing can be written. After
    // six attempt timeouts (30 s at least) of silence the pod is not ready, and says
    // why; the first answer makes it ready again.
    env.fake.black_hole_region("us-east-1", true);
    let all_holed = Instant::now();
    sent.extend(env.send_all(&events(15..17)).await);
    let body = wait_readyz(
        &worker,
        503,
        "aws: no Kinesis endpoint answering",
        Duration::from_secs(90),
    )
    .await;
    eprintln!(
        "every region black-holed: not ready after {:?}: {body:?}",
        all_holed.elapsed()
    );
    assert!(worker
        .logs()
        .contains("no answer from any Kinesis endpoint"));
    env.fake.black_hole_region("eu-west-1", false);
    env.fake.black_hole_region("us-east-1", false);
    wait_readyz(&worker, 200, "", Duration::from_secs(60)).await;
    assert!(worker.logs().contains("AWS answers again"));
    env.wait_committed_to_end(&cfg.group_id).await;
    let mut records = env.fake.records_of("east");
    records.extend(env.fake.records_of("west"));
    assert_all_delivered_in_order(&sent, &records);
    kd_testkit::assert_nothing_dead_lettered(&worker.metrics());
    worker.stop();
}

/// The dead-letter producer's answers are lost: the path to the broker is black-holed
/// for 3 s, three times, while 20,000 malformed records are dead-lettered, with the
/// clients' socket timeout at 1 s. Produce requests already stored when the path went
/// are sent again on a new connection once it is back; the dead-letter producer is
/// idempotent, so the broker recognises each copy by its sequence number and stores it
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_sent_again_after_lost_answers_are_stored_once() {
    let env = Env::behind_proxy().await;
    let t = env.tenant("src_l", "lost-answers", 1);
    let mut cfg = WorkerConfig::new(&env.proxy_bootstrap(), &env.fake.endpoint())
        .set("kafka.librdkafka", "\"socket.timeout.ms\" = \"1000\"");
    // The group keeps the worker through the holes: no rebalance, so nothing is read
    // (and dead-lettered) again, and any copy is the producer's.
    cfg.session_timeout_ms = 30_000;
    cfg.write_tenants(&[t.settings()]);
    cfg.write();
    const COUNT: usize = 20_000;
    let records: Vec<kd_testkit::Record> = (0..COUNT)
        .map(|i| {
            (
                format!("k{i}"),
                format!("{{\"type\": \"track\", \"n\": {i}").into_bytes(),
                vec![("source_id".to_owned(), "src_l".to_owned())],
            )
        })
        .collect();
    let produced = env.kafka.send_many(TOPIC, &records).await;
    let mut worker = Worker::start_ready(bin(), &cfg);
    let proxy = env.proxy.as_ref().unwrap();
    let lettered = "kinesis_destination_events_dead_lettered_total{reason=\"invalid_json\"}";
    for hole in 1..=3 {
        wait_metric(
            &worker,
            lettered,
            (hole * 4_000) as f64,
            Duration::from_secs(60),
        )
        .await;
        // Dead letters are still being written: the hole takes some answers.
        assert!(
            worker.metric(lettered) < COUNT as f64,
            "hole {hole} too late"
        );
        proxy.black_hole();
        tokio::time::sleep(Duration::from_secs(3)).await;
        proxy.up();
    }
    env.wait_committed_to_end(&cfg.group_id).await;
    let letters = env
        .kafka
        // All of them, and any copies (read until 15 s pass with fewer than twice).
        .read_topic(DLQ, 2 * COUNT, Duration::from_secs(15));
    let mut copies: std::collections::HashMap<(i32, i64), usize> = Default::default();
    for m in &letters {
        let at = (
            Kafka::header(m, "dlq.partition").unwrap().parse().unwrap(),
            Kafka::header(m, "dlq.offset").unwrap().parse().unwrap(),
        );
        *copies.entry(at).or_default() += 1;
    }
    let doubled = copies.values().filter(|&&n| n > 1).count();
    let missing = produced
        .iter()
        .filter(|p| !copies.contains_key(&(p.partition, p.offset)))
        .count();
    let m = worker.metrics();
    eprintln!(
        "lost answers: {} dead letters read for {COUNT}, {doubled} doubled, {missing} missing; \
         dead-letter producer errors counted: {}",
        letters.len(),
        sum_of(&m, "kinesis_destination_dead_letter_failures_total")
    );
    assert!(
        worker.logs().contains("Timed out ProduceRequest"),
        "produce answers were lost"
    );
    assert_eq!(missing, 0, "every dead letter written");
    assert_eq!(doubled, 0, "none written twice");
    assert_eq!(letters.len(), COUNT);
    worker.stop();
}
