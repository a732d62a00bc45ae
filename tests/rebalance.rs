//! Rebalances with the cooperative protocol (the default `partition.assignment.strategy`).
//!
//! These run against librdkafka's own mock cluster rather than Tansu: Tansu's group
//! coordinator answers a JoinGroup at once, without waiting for the other members to
//! join again, so the leader assigns from members' stale lists of owned partitions and
//! the cooperative protocol can hand one partition to two members. Kafka (and the mock
//! cluster) wait for every member before the leader assigns.

mod common;
use common::bin;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use kd_testkit::env::{assert_all_delivered_in_order, send_events, Sent, DLQ, TOPIC};
use kd_testkit::{eventually, ownership, FakeAws, Fault, Kafka, Tenant, Worker, WorkerConfig};
use rdkafka::mocking::MockCluster;

const PARTITIONS: i32 = 6;
const WINDOW: Duration = Duration::from_secs(25);

/// The partitions a worker holds now, from its JSON log.
fn held_now(worker: &Worker) -> HashSet<i32> {
    ownership(&worker.logs())
        .into_iter()
        .filter(|(_, _, end)| end.is_none())
        .map(|(p, _, _)| p)
        .collect()
}

fn dead_lettered(workers: &[&Worker]) -> f64 {
    workers
        .iter()
        .map(|w| {
            w.metric("kinesis_destination_events_dead_lettered_total{reason=\"retries_exhausted\"}")
        })
        .sum()
}

/// Three workers; one tenant's stream fails every write (its events retry, holding every
/// partition's commits back); another's events flow. One worker is scaled away: the
/// other two keep their partitions and their in-flight work (no duplicates there), and
/// the failing events, including those the scaled-away worker was retrying, are
/// dead-lettered when their window, counted from when they were produced, runs out,
/// not a window later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_away_a_worker_keeps_the_others_work_and_the_events_retry_windows() {
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic(TOPIC, PARTITIONS, 1).unwrap();
    mock.create_topic(DLQ, 1, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let kafka = Kafka::new(&bootstrap);
    let fake = FakeAws::start().await;
    fake.create_stream("ok", 4);
    fake.create_stream("down", 1);
    fake.fail_for(
        "down",
        Fault::Error {
            status: 503,
            code: "ServiceUnavailable".into(),
        },
        Duration::from_secs(3600),
    );
    let ok = Tenant::new("src_ok", "111111111111", "us-east-1", "ok");
    let down = Tenant::new("src_down", "111111111111", "us-east-1", "down");
    let cfg = WorkerConfig::new(&bootstrap, &fake.endpoint())
        .set("log", "format = \"json\"")
        .set(
            "delivery",
            &format!("retry_window_secs = {}", WINDOW.as_secs()),
        )
        .set("delivery", "min_retry_secs = 1")
        .set("delivery", "initial_backoff_ms = 100")
        .set("delivery", "max_backoff_ms = 1000")
        .set("delivery", "shutdown_timeout_secs = 2");
    cfg.write_tenants(&[ok.settings(), down.settings()]);
    cfg.write();

    let mut workers: Vec<Worker> = (0..3).map(|_| Worker::start(bin(), &cfg)).collect();
    for w in &mut workers {
        w.wait_ready(Duration::from_secs(60));
    }
    // Wait for the cooperative rebalances to settle: every partition held by exactly
    // one worker, each worker holding some.
    eventually(
        Duration::from_secs(90),
        "partitions spread over three workers",
        || async {
            let held: Vec<HashSet<i32>> = workers.iter().map(held_now).collect();
            let total: usize = held.iter().map(HashSet::len).sum();
            let all: HashSet<i32> = held.iter().flatten().copied().collect();
            (total == PARTITIONS as usize
                && all.len() == total
                && held.iter().all(|h| !h.is_empty()))
            .then_some(())
        },
    )
    .await;

    // The failing tenant's events, one per user, on every partition.
    let produced = Instant::now();
    let failing: Vec<(String, String, usize)> = (0..30)
        .map(|u| ("src_down".to_owned(), format!("d{u}"), 0))
        .collect();
    let failing = send_events(&kafka, &failing).await;
    let partitions: HashSet<i32> = failing.iter().map(|s| s.at.partition).collect();
    assert_eq!(
        partitions.len(),
        PARTITIONS as usize,
        "failing events on every partition"
    );

    // The healthy tenant's events flow meanwhile; after 8 s the third worker leaves.
    let mut sent: Vec<Sent> = Vec::new();
    let mut stopped_at = None;
    let mut kept: HashSet<i32> = HashSet::new();
    let mut duplicates_before = 0;
    for round in 0..48 {
        let events: Vec<(String, String, usize)> = (0..12)
            .map(|u| ("src_ok".to_owned(), format!("u{u}"), round))
            .collect();
        sent.extend(send_events(&kafka, &events).await);
        if stopped_at.is_none() && produced.elapsed() >= Duration::from_secs(8) {
            kept = held_now(&workers[0])
                .union(&held_now(&workers[1]))
                .copied()
                .collect();
            duplicates_before = duplicates(&fake, &sent).0;
            workers[2].sigterm();
            stopped_at = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let status = workers[2].wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}");

    // Every failing event is dead-lettered once its window, counted from when it was
    // produced, has run out: the third worker's too, though the worker that took them
    // over started trying them only after the rebalance (some 12 s later).
    let (a, b) = (&workers[0], &workers[1]);
    let want = failing.len() as f64;
    let mut first = None;
    let last = eventually(
        Duration::from_secs(90),
        "failing events dead-lettered",
        || {
            let n = dead_lettered(&[a, b]);
            if n > 0.0 && first.is_none() {
                first = Some(produced.elapsed());
            }
            async move { (n >= want).then(|| produced.elapsed()) }
        },
    )
    .await;
    let first = first.unwrap_or(last);
    eprintln!(
        "scale-away: third worker stopped {:.1}s after the failing events were produced; \
         dead letters from {:.1}s to {:.1}s (window {}s)",
        (stopped_at.unwrap() - produced).as_secs_f64(),
        first.as_secs_f64(),
        last.as_secs_f64(),
        WINDOW.as_secs()
    );
    assert!(
        first >= WINDOW - Duration::from_secs(1),
        "dead-lettered before the window: {first:?}"
    );
    assert!(
        last <= WINDOW + Duration::from_secs(9),
        "the window started again at the rebalance: last dead letter {last:?} after production"
    );
    let dead = kafka.read_topic(DLQ, failing.len(), Duration::from_secs(30));
    assert_eq!(dead.len(), failing.len());
    for d in &dead {
        assert_eq!(
            Kafka::header(d, "dlq.reason").as_deref(),
            Some("retries_exhausted")
        );
        let error = Kafka::header(d, "dlq.error").unwrap_or_default();
        assert!(error.contains("after the event was produced"), "{error}");
    }

    kafka
        .wait_committed_to_end(&cfg.group_id, TOPIC, PARTITIONS)
        .await;
    let records = fake.records_of("ok");
    assert_all_delivered_in_order(&sent, &records);
    // The two remaining workers kept every partition they held: no revoke, so their
    // in-flight work went on and nothing of theirs was read or written twice. Only the
    // scaled-away worker's partitions were read again from their last commit (held back
    // by the failing events), and their events written again.
    let kept_now: HashSet<i32> = held_now(a).union(&held_now(b)).copied().collect();
    assert!(kept.is_subset(&kept_now), "kept {kept:?}, now {kept_now:?}");
    assert_eq!(
        kept_now.len(),
        PARTITIONS as usize,
        "the two workers took over all partitions"
    );
    let (total, by_partition) = duplicates(&fake, &sent);
    let on_kept: usize = kept
        .iter()
        .map(|p| by_partition.get(p).copied().unwrap_or(0))
        .sum();
    eprintln!(
        "scale-away: {} events, duplicates {duplicates_before} before, {total} after \
         ({on_kept} on the partitions the others kept)",
        sent.len()
    );
    for w in [a, b] {
        let revoked = w.logs().matches("partitions revoked").count();
        assert_eq!(revoked, 0, "{}", w.logs());
    }
    assert_eq!(duplicates_before, 0);
    assert_eq!(
        on_kept, 0,
        "work on kept partitions was redone: {by_partition:?}"
    );
    for w in &mut workers[..2] {
        w.stop();
    }
}

/// Records written more than once: in total and per Kafka partition of the event.
fn duplicates(fake: &FakeAws, sent: &[Sent]) -> (usize, HashMap<i32, usize>) {
    let partition_of: HashMap<&str, i32> = sent
        .iter()
        .map(|s| (s.id.as_str(), s.at.partition))
        .collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut by_partition: HashMap<i32, usize> = HashMap::new();
    let mut total = 0;
    for r in fake.records_of("ok") {
        let id = r.json()["messageId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if !seen.insert(id.clone()) {
            total += 1;
            let p = partition_of.get(id.as_str()).copied().unwrap_or(-1);
            *by_partition.entry(p).or_default() += 1;
        }
    }
    (total, by_partition)
}
