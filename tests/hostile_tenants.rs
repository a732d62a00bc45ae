//! Hostile tenants and outsiders: a tenant that names another tenant's stream spends
//! none of its capacity, an outage in one AWS region delays no other region, and slow
//! connections to the HTTP port cannot starve the probes.

mod common;
use common::bin;
use std::time::{Duration, Instant};

use kd_testkit::env::{wait_metric, FakeEnv as Env, DLQ};
use kd_testkit::{FakeRecord, Kafka, Tenant, Worker, CALLER_ACCOUNT};
use serde_json::json;

/// The tests measure throughput and latency: one at a time, or they measure each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let _alone = ONE_AT_A_TIME.lock().await;
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

/// Opens connections to `port` from `address` and keeps them as slow clients do, until
/// `until`: half send nothing, half trickle a request head a byte every 300 ms. A
/// connection the worker closes is opened again at once.
async fn slow_clients(address: std::net::IpAddr, port: u16, sockets: usize, until: Instant) -> u64 {
    use tokio::io::AsyncWriteExt;
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..sockets {
        let opened = opened.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind((address, 0).into()).unwrap();
                let Ok(mut stream) = socket.connect(([127, 0, 0, 1], port).into()).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: yyyyyyyyyyyyyyyyyyyyyyyy";
                let mut sent = 0;
                while Instant::now() < until {
                    if i % 2 == 1 && sent < head.len() {
                        if stream.write_all(&head[sent..sent + 1]).await.is_err() {
                            break;
                        }
                        sent += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    // Closed by the worker: a read returns at once.
                    let mut probe = [0u8; 1];
                    if let Ok(Ok(0)) =
                        tokio::time::timeout(Duration::from_millis(1), stream.peek(&mut probe))
                            .await
                    {
                        break;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    opened.load(std::sync::atomic::Ordering::Relaxed)
}

/// `GET /healthz` on a new connection, as the kubelet probes: how long it took, or
/// `None` when no answer came within 2 s.
fn probe(port: u16) -> Option<Duration> {
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    answer
        .starts_with("HTTP/1.1 200")
        .then(|| started.elapsed())
}

/// Slow connections from 40 addresses (20 sockets each, reopened as soon as they are
/// closed) for 12 s, while the worker delivers: `/healthz` answers a new connection
/// within 100 ms every time, and every event is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_connections_from_many_addresses_cannot_starve_the_probes() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let env = Env::start().await;
    let t = env.tenant("src_busy", "busy", 2);
    let cfg = env.config(&[&t]);
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);
    let port = worker.http_port;

    let flood_for = Duration::from_secs(12);
    let until = Instant::now() + flood_for;
    let flood: Vec<_> = (2..42u8)
        .map(|i| tokio::spawn(slow_clients([127, 0, 0, i].into(), port, 20, until)))
        .collect();
    // Let the flood fill every place the old server had before probing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let probes = tokio::task::spawn_blocking(move || {
        let mut took = Vec::new();
        while Instant::now() + Duration::from_millis(500) < until {
            took.push(probe(port));
            std::thread::sleep(Duration::from_millis(100));
        }
        took
    });
    let mut sent = Vec::new();
    for round in 0..10 {
        sent.extend(
            env.send_many("src_busy", 20, 5)
                .await
                .into_iter()
                .map(|s| (round, s)),
        );
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    let took = probes.await.unwrap();
    let mut opened = 0;
    for f in flood {
        opened += f.await.unwrap();
    }
    let answered: Vec<Duration> = took.iter().flatten().copied().collect();
    let mut sorted = answered.clone();
    sorted.sort();
    let worst = sorted.last().copied().unwrap_or_default();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
    let m = worker.metrics();
    eprintln!(
        "flood: {opened} slow connections from 40 addresses in {flood_for:?}; /healthz \
         answered {} of {} probes, median {median:?}, worst {worst:?}; closed by the worker: {} over the \
         per-address cap, {} to make room",
        answered.len(),
        took.len(),
        kd_testkit::metric_value(&m, "kinesis_destination_http_connections_closed_total{reason=\"per_address\"}"),
        kd_testkit::metric_value(&m, "kinesis_destination_http_connections_closed_total{reason=\"evicted\"}"),
    );
    assert!(took.len() >= 50, "{} probes", took.len());
    assert_eq!(answered.len(), took.len(), "unanswered probes: {took:?}");
    assert!(
        worst < Duration::from_millis(100),
        "worst {worst:?}: {took:?}"
    );

    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        sent.len() as f64,
        Duration::from_secs(60),
    )
    .await;
    let sent: Vec<_> = sent.into_iter().map(|(_, s)| s).collect();
    kd_testkit::env::assert_all_delivered_in_order(&sent, &env.fake.records_of("busy"));
    kd_testkit::assert_nothing_dead_lettered(&worker.metrics());
    worker.stop();
}

/// `per_user` events for each of `users` users of each source, users interleaved.
fn spread(
    sources: &[&str],
    users: usize,
    per_user: usize,
    from: usize,
) -> Vec<(String, String, usize)> {
    let mut out = Vec::new();
    for seq in from..from + per_user {
        for u in 0..users {
            for s in sources {
                out.push(((*s).to_owned(), format!("{s}-u{u}"), seq));
            }
        }
    }
    out
}

/// How long until `count` more events than `before` are delivered.
async fn time_to_deliver(worker: &Worker, before: f64, count: usize, since: Instant) -> Duration {
    wait_metric(
        worker,
        "kinesis_destination_events_delivered_total",
        before + count as f64,
        Duration::from_secs(120),
    )
    .await;
    since.elapsed()
}

/// eu-west-1 hangs (Kinesis and STS read requests and never answer) while its tenants
/// have events to write and new ones start. With 8 request places and 2 AssumeRole
/// places, one region may hold half of each (`region_share = 0.5`): us-east-1 tenants,
/// warm and cold, one of them in an account that also writes to eu-west-1, are written
/// as fast as before the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_region_does_not_delay_another() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let env = Env::start().await;
    let regional = |source: &str, region: &str, account: &str| {
        let mut t = Tenant::new(source, account, region, source);
        t.shards = 4;
        env.fake.create_stream(source, 4);
        t
    };
    // eu_0's stream is in the same account as us_warm's: an account's calls to the
    // region that hangs must not hold back its calls to another.
    let eu: Vec<Tenant> = (0..3)
        .map(|i| {
            let account = match i {
                0 => "111111111111".to_owned(),
                _ => format!("30000000000{i}"),
            };
            regional(&format!("eu_{i}"), "eu-west-1", &account)
        })
        .collect();
    let eu_cold: Vec<Tenant> = (0..3)
        .map(|i| {
            regional(
                &format!("eu_cold_{i}"),
                "eu-west-1",
                &format!("40000000000{i}"),
            )
        })
        .collect();
    let us = regional("us_warm", "us-east-1", "111111111111");
    let us_cold: Vec<Tenant> = (0..4)
        .map(|i| {
            regional(
                &format!("us_cold_{i}"),
                "us-east-1",
                &format!("50000000000{i}"),
            )
        })
        .collect();
    let all: Vec<&Tenant> = eu
        .iter()
        .chain(&eu_cold)
        .chain([&us])
        .chain(&us_cold)
        .collect();
    let cfg = env
        .config(&all)
        .set("aws", "max_concurrent_requests = 8")
        .set("aws", "max_concurrent_assume_role = 2")
        .set("aws", "region_share = 0.5")
        .set("aws", "api_timeout_ms = 3000")
        .set("delivery", "initial_backoff_ms = 20")
        .set("delivery", "max_backoff_ms = 200");
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);
    let eu_names: Vec<&str> = eu.iter().map(|t| t.source_id.as_str()).collect();

    // Before the outage: the eu tenants' sessions are cached, and us_warm's 400
    // events take this long.
    let mut sent = env.send_all(&spread(&eu_names, 20, 1, 0)).await;
    sent.extend(env.send_all(&spread(&["us_warm"], 40, 1, 0)).await);
    time_to_deliver(&worker, 0.0, 100, Instant::now()).await;
    let before = worker.metric("kinesis_destination_events_delivered_total");
    let started = Instant::now();
    sent.extend(env.send_all(&spread(&["us_warm"], 40, 10, 1)).await);
    let healthy = time_to_deliver(&worker, before, 400, started).await;

    // The outage: eu tenants' writes and new eu tenants' AssumeRole calls hang.
    env.fake.black_hole_region("eu-west-1", true);
    let eu_cold_names: Vec<&str> = eu_cold.iter().map(|t| t.source_id.as_str()).collect();
    sent.extend(env.send_all(&spread(&eu_names, 20, 5, 1)).await);
    sent.extend(env.send_all(&spread(&eu_cold_names, 5, 1, 0)).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = worker.metric("kinesis_destination_events_delivered_total");
    let started = Instant::now();
    let us_cold_names: Vec<&str> = us_cold.iter().map(|t| t.source_id.as_str()).collect();
    sent.extend(env.send_all(&spread(&["us_warm"], 40, 10, 11)).await);
    sent.extend(env.send_all(&spread(&us_cold_names, 5, 1, 0)).await);
    let during = time_to_deliver(&worker, before, 400 + 20, started).await;
    let eu_written_during: usize = eu
        .iter()
        .map(|t| env.fake.records_of(&t.stream).len())
        .sum();
    eprintln!(
        "us-east-1: 400 events of a warm tenant in {healthy:?} before eu-west-1 hung; \
         400 of it and 20 of 4 new tenants in {during:?} while it hung \
         (eu-west-1: {eu_written_during} records, all from before)"
    );
    assert_eq!(eu_written_during, 60, "nothing answers in eu-west-1");
    assert!(
        during < healthy * 2 + Duration::from_secs(1),
        "us-east-1 took {during:?} during the outage against {healthy:?} before"
    );

    // The outage ends: every eu event is written, in order.
    env.fake.black_hole_region("eu-west-1", false);
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        sent.len() as f64,
        Duration::from_secs(120),
    )
    .await;
    let records: Vec<FakeRecord> = all
        .iter()
        .flat_map(|t| env.fake.records_of(&t.stream))
        .collect();
    kd_testkit::env::assert_all_delivered_in_order(&sent, &records);
    kd_testkit::assert_nothing_dead_lettered(&worker.metrics());
    worker.stop();
}
