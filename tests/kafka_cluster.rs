//! Kafka as a cluster: partition leaders that move, a broker lost and back, the group
//! coordinator moved. These run against librdkafka's mock cluster (librdkafka 2.12.1,
//! `rdkafka::mocking`): Tansu is a single broker. (Transactions: `transactions.rs`.)
//!
//! What the mock cluster does, checked in its source (`rdkafka_mock.c`,
//! `rdkafka_mock_handlers.c`): each partition has one log, served by whichever broker
//! is its leader; a request for a partition to another broker is answered
//! `NOT_LEADER_OR_FOLLOWER`; a broker taken down closes its connections and refuses new
//! ones, and leadership does not move by itself (as Kafka's controller would move it:
//! the test moves it, then takes the old leader down).

mod common;
use common::bin;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use kd_testkit::env::{assert_all_delivered_in_order, first_deliveries, send_events, Sent};
use kd_testkit::env::{DLQ, TOPIC};
use kd_testkit::{eventually, FakeAws, Kafka, Tenant, Worker, WorkerConfig};
use rdkafka::mocking::{MockCluster, MockCoordinator};

const PARTITIONS: i32 = 3;
const DELIVERED: &str = "kinesis_destination_events_delivered_total";

/// Moves every partition of the input and dead-letter topics, and the group's
/// coordinator, to `broker`.
fn lead_from(
    mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    group: &str,
    broker: i32,
) {
    for p in 0..PARTITIONS {
        mock.partition_leader(TOPIC, p, Some(broker))
            .expect("move a leader");
    }
    mock.partition_leader(DLQ, 0, Some(broker))
        .expect("move the dead-letter topic's leader");
    mock.coordinator(MockCoordinator::Group(group.to_owned()), broker)
        .expect("move the group coordinator");
}

/// Sends one round: a valid event for each of 30 users, and 3 malformed ones (each
/// to be dead-lettered `invalid_json`), keyed so they spread over the partitions.
async fn round(kafka: &Kafka, n: usize) -> (Vec<Sent>, Vec<(i32, i64)>) {
    let events: Vec<(String, String, usize)> = (0..30)
        .map(|u| ("src_m".to_owned(), format!("u{u}"), n))
        .collect();
    let sent = send_events(kafka, &events).await;
    let mut malformed = Vec::new();
    for k in 0..3 {
        let at = kafka
            .send(
                TOPIC,
                Some(&format!("bad{k}")),
                format!("{{\"type\": \"track\", \"round\": {n}").as_bytes(),
                &[("source_id", "src_m")],
            )
            .await;
        malformed.push((at.partition, at.offset));
    }
    (sent, malformed)
}

/// Three brokers. Events and malformed records (dead letters) flow while every
/// partition's leader, the dead-letter topic's leader and the group coordinator move
/// from broker 1 to 2, broker 1 is lost for a while, then everything moves to 3 and
/// broker 2 is lost; then the dead-letter topic's leader answers too late. The consumer
/// and the dead-letter producer follow the leaders, commits go to the new coordinator
/// and keep up while the old one is down, and every dead letter is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_move_and_brokers_are_lost_while_events_and_dead_letters_flow() {
    let mock = MockCluster::new(3).expect("mock cluster");
    mock.create_topic(TOPIC, PARTITIONS, 3).unwrap();
    mock.create_topic(DLQ, 1, 3).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let kafka = Kafka::new(&bootstrap);
    let fake = FakeAws::start().await;
    fake.create_stream("moving", 4);
    let t = Tenant::new("src_m", "111111111111", "us-east-1", "moving");
    // The clients give up on an answer after 1 s (librdkafka's default is 60 s), so
    // that slow answers (below) time out.
    let cfg = WorkerConfig::new(&bootstrap, &fake.endpoint())
        .set("kafka.librdkafka", "\"socket.timeout.ms\" = \"1000\"");
    cfg.write_tenants(&[t.settings()]);
    cfg.write();
    lead_from(&mock, &cfg.group_id, 1);
    let mut worker = Worker::start_ready(bin(), &cfg);

    let mut sent = Vec::new();
    let mut malformed = Vec::new();
    let mut moved_at = Vec::new();
    for n in 0..36 {
        match n {
            4 => {
                lead_from(&mock, &cfg.group_id, 2);
                mock.broker_down(1).unwrap();
                moved_at.push((
                    Instant::now(),
                    kafka.committed(&cfg.group_id, TOPIC, PARTITIONS),
                ));
            }
            12 => mock.broker_up(1).unwrap(),
            14 => {
                lead_from(&mock, &cfg.group_id, 3);
                mock.broker_down(2).unwrap();
                moved_at.push((
                    Instant::now(),
                    kafka.committed(&cfg.group_id, TOPIC, PARTITIONS),
                ));
            }
            20 => mock.broker_up(2).unwrap(),
            // The dead-letter topic moves to broker 2 (the producer connects there with
            // the next dead letters); then broker 2 stores each produce at once and
            // answers after 3 s, for 5 s: past the clients' socket timeout, so the producer
            // drops the connection and sends the dead letter again while the first
            // copy is already stored.
            21 => mock.partition_leader(DLQ, 0, Some(2)).unwrap(),
            22 => mock
                .broker_round_trip_time(2, Duration::from_millis(3000))
                .unwrap(),
            32 => mock.broker_round_trip_time(2, Duration::ZERO).unwrap(),
            _ => {}
        }
        let (s, m) = round(&kafka, n).await;
        sent.extend(s);
        malformed.extend(m);
        // While the old leader is down, what was produced after the move is
        // delivered: fetched from the new leader.
        if n == 10 || n == 19 {
            let want = sent.len();
            eventually(
                Duration::from_secs(30),
                "events produced after the move delivered",
                || {
                    let got = first_deliveries(&fake.records_of("moving")).len();
                    async move { (got >= want).then_some(()) }
                },
            )
            .await;
            // And committed through the new coordinator, past where commits were
            // at the move.
            let (_, before) = moved_at.last().unwrap();
            let before = before.clone();
            eventually(
                Duration::from_secs(30),
                "commits move on through the new coordinator",
                || {
                    let now = kafka.committed(&cfg.group_id, TOPIC, PARTITIONS);
                    let moved = now.iter().zip(&before).all(|(n, b)| n > b);
                    async move { moved.then_some(()) }
                },
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (move1, move2) = (moved_at[0].0, moved_at[1].0);
    eprintln!(
        "moves at +0 s and +{:?}; {} events, {} malformed",
        move2 - move1,
        sent.len(),
        malformed.len()
    );

    kafka
        .wait_committed_to_end(&cfg.group_id, TOPIC, PARTITIONS)
        .await;
    let records = fake.records_of("moving");
    assert_all_delivered_in_order(&sent, &records);
    assert_eq!(worker.metric(DELIVERED), records.len() as f64);

    let letters = kafka.read_topic(DLQ, malformed.len() + 10, Duration::from_secs(20));
    let mut seen: HashMap<(i32, i64), usize> = HashMap::new();
    for m in &letters {
        assert_eq!(
            Kafka::header(m, "dlq.reason").as_deref(),
            Some("invalid_json")
        );
        let at = (
            Kafka::header(m, "dlq.partition").unwrap().parse().unwrap(),
            Kafka::header(m, "dlq.offset").unwrap().parse().unwrap(),
        );
        *seen.entry(at).or_default() += 1;
    }
    // Each dead letter is there. The mock cluster checks the sequence numbers of
    // transactional producers only (`rd_kafka_mock_validate_records`), so the
    // idempotent dead-letter producer's copy sent again after a late answer is stored
    // again here, where Kafka (and Tansu: `broker_faults.rs`) stores it once.
    for at in &malformed {
        assert!(seen.contains_key(at), "the dead letter of {at:?}");
    }
    let doubled = seen.values().filter(|&&n| n > 1).count();
    assert_eq!(seen.len(), malformed.len(), "no other dead letter");
    eprintln!(
        "dead letters: {} of {} doubled by the mock",
        doubled,
        malformed.len()
    );
    assert_eq!(worker.get("/readyz").map(|r| r.0), Some(200));
    worker.stop();
}
