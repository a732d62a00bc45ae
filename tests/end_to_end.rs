//! End-to-end tests of `kinesis-destination run` against real services: a Tansu broker
//! and a moto AWS emulator (behind a proxy that records AssumeRole calls), started per
//! test on free ports.

mod common;
use common::{bin, replay};
use kd_event::EventType;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use kd_testkit::env::{MotoEnv as Env, DLQ, PARTITIONS, TOPIC};
use kd_testkit::{eventually, Kafka, Produced, Tansu, Tenant, Worker, WorkerConfig};
use serde_json::{json, Value};

async fn wait_metric(worker: &Worker, name: &str, at_least: f64) {
    kd_testkit::env::wait_metric(worker, name, at_least, Duration::from_secs(60)).await;
}

/// An event as bytes, with deliberately unusual spacing so that any re-serialisation
/// would show.
fn event(kind: &str, ids: Value, n: usize) -> Vec<u8> {
    let mut v =
        json!({"type": kind, "messageId": format!("m-{n}"), "properties": {"n": n, "ünï": "çødé"}});
    for (k, val) in ids.as_object().unwrap() {
        v[k] = val.clone();
    }
    let compact = v.to_string();
    format!("  {}\n", compact.replacen(':', " : ", 1)).into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_every_event_to_its_own_tenants_stream() {
    let env = Env::start().await;
    let a = Tenant::new("src_a", "111111111111", "us-east-1", "events");
    let mut b = Tenant::new("src_b", "222222222222", "eu-west-1", "events");
    b.secret_id = Some("s3cr3t-b".into());
    b.shards = 2;
    let c = Tenant::new("src_c", "111111111111", "eu-west-1", "events-c");
    let tenants = [a.clone(), b.clone(), c.clone()];
    for t in &tenants {
        env.streams.create(t).await;
    }
    let cfg = env.config();
    cfg.write_tenants(&tenants.iter().map(Tenant::settings).collect::<Vec<_>>());
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);

    // (tenant, exact bytes, expected partition key)
    let mut expected: Vec<(String, Vec<u8>, String)> = Vec::new();
    let mut n = 0;
    for t in &tenants {
        for kind in EventType::ALL.map(EventType::as_str) {
            for by_header in [true, false] {
                n += 1;
                let user = format!("user-{}-{n}", t.source_id);
                let ids = if by_header {
                    json!({"userId": user})
                } else {
                    json!({"userId": user, "projectId": t.source_id})
                };
                let bytes = event(kind, ids, n);
                let source = by_header.then_some(t.source_id.as_str());
                env.send(&bytes, source, &user).await;
                expected.push((t.source_id.clone(), bytes, user));
            }
        }
        // A numeric userId, a userId over 256 characters, an anonymous user.
        n += 1;
        let bytes = event("identify", json!({"userId": 4_200_000 + n}), n);
        env.send(&bytes, Some(&t.source_id), "num").await;
        expected.push((t.source_id.clone(), bytes, (4_200_000 + n).to_string()));
        n += 1;
        let long = "L".repeat(300) + &n.to_string();
        let bytes = event("track", json!({"userId": long}), n);
        env.send(&bytes, Some(&t.source_id), "long").await;
        let shortened = kd_testkit_key(&long);
        assert_eq!(shortened.chars().count(), 256);
        expected.push((t.source_id.clone(), bytes, shortened));
        n += 1;
        let bytes = event(
            "page",
            json!({"anonymousId": format!("anon-{n}"), "userId": ""}),
            n,
        );
        env.send(&bytes, Some(&t.source_id), "anon").await;
        expected.push((t.source_id.clone(), bytes, format!("anon-{n}")));
    }
    let total = expected.len() as f64;
    wait_metric(&worker, "kinesis_destination_events_delivered_total", total).await;

    for t in &tenants {
        let records = env.streams.read(t).await;
        let mut got: Vec<(Vec<u8>, String)> = records
            .iter()
            .map(|r| (r.data.clone(), r.partition_key.clone()))
            .collect();
        let mut want: Vec<(Vec<u8>, String)> = expected
            .iter()
            .filter(|(s, _, _)| *s == t.source_id)
            .map(|(_, d, k)| (d.clone(), k.clone()))
            .collect();
        got.sort();
        want.sort();
        assert_eq!(
            got.len(),
            want.len(),
            "record count in {}'s stream",
            t.source_id
        );
        assert!(
            got == want,
            "{}'s stream holds exactly its events, byte for byte, with the README's partition keys",
            t.source_id
        );
    }

    // One AssumeRole per tenant, with its role and external ID.
    let calls = env.proxy.assume_role_calls();
    let mut per_key: HashMap<(String, Option<String>), usize> = HashMap::new();
    for c in &calls {
        *per_key
            .entry((c.role_arn.clone(), c.external_id.clone()))
            .or_default() += 1;
    }
    let want: HashMap<(String, Option<String>), usize> = tenants
        .iter()
        .map(|t| ((t.role_arn(), Some(t.external_id().to_owned())), 1))
        .collect();
    assert_eq!(per_key, want, "AssumeRole calls: {calls:?}");

    let m = worker.metrics();
    assert_eq!(
        kd_testkit::metric_value(&m, "kinesis_destination_events_received_total"),
        total
    );
    assert_eq!(
        kd_testkit::metric_value(&m, "kinesis_destination_events_delivered_total"),
        total
    );
    // Every written event's latency from its record timestamp, each under a minute here.
    assert_eq!(
        kd_testkit::metric_value(&m, "kinesis_destination_delivery_latency_seconds_count"),
        total
    );
    let latency_sum =
        kd_testkit::metric_value(&m, "kinesis_destination_delivery_latency_seconds_sum");
    assert!(
        latency_sum > 0.0 && latency_sum < 60.0 * total,
        "latency sum {latency_sum}"
    );
    assert_eq!(
        kd_testkit::metric_value(
            &m,
            "kinesis_destination_delivery_latency_seconds_bucket{le=\"60\"}"
        ),
        total
    );
    assert_eq!(
        kd_testkit::metric_value(&m, "kinesis_destination_assume_role_total{outcome=\"ok\"}"),
        3.0
    );
    assert_eq!(
        kd_testkit::metric_value(&m, "kinesis_destination_credential_cache_misses_total"),
        3.0
    );
    assert_eq!(
        kd_testkit::metric_value(&m, "kinesis_destination_credential_cache_hits_total"),
        total - 3.0
    );
    assert_eq!(
        kd_testkit::metric_value(
            &m,
            "kinesis_destination_put_duration_seconds_count{outcome=\"ok\"}"
        ),
        total
    );
    kd_testkit::assert_nothing_dead_lettered(&m);
    assert!(
        !m.contains("source=\""),
        "no per-source labels unless turned on:\n{m}"
    );
    assert!(
        !m.contains("s3cr3t-b") && !worker.logs().contains("s3cr3t-b"),
        "secret leaked"
    );
    env.wait_committed_to_end(&cfg.group_id).await;

    // The tail command reads a tenant's stream as that tenant.
    let out = std::process::Command::new(bin())
        .args([
            "tail",
            "--format",
            "record",
            "--source-id",
            "src_b",
            "--config",
        ])
        .arg(cfg.path())
        .env("AWS_ACCESS_KEY_ID", "t")
        .env("AWS_SECRET_ACCESS_KEY", "t")
        .output()
        .expect("tail runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("tail prints JSON lines"))
        .collect();
    let b_count = expected.iter().filter(|(s, _, _)| s == "src_b").count();
    assert_eq!(lines.len(), b_count);
    for l in &lines {
        assert!(
            l["data"]["type"].is_string() && l["partitionKey"].is_string(),
            "{l}"
        );
    }

    // check: settings, AssumeRole and the stream, for a tenant that works and one that
    // does not exist.
    let check = |source: &str| {
        std::process::Command::new(bin())
            .args(["check", "--source-id", source, "--config"])
            .arg(cfg.path())
            .env("AWS_ACCESS_KEY_ID", "t")
            .env("AWS_SECRET_ACCESS_KEY", "t")
            .output()
            .expect("check runs")
    };
    let ok = check("src_b");
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("PASS ")).count(),
        5,
        "{out}"
    );
    assert!(
        out.contains("PASS write mode: PutRecord, record by record (usePutRecords false)"),
        "{out}"
    );
    assert!(!out.contains("s3cr3t-b"), "{out}");
    let missing = check("src_nobody");
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stdout).starts_with("FAIL settings"));

    worker.stop();
}

/// The partition-key shortening the README describes, as the event crate does it.
fn kd_testkit_key(id: &str) -> String {
    kd_event::PartitionKey::new(id).unwrap().into_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_each_bad_input_with_its_reason_and_delivers_the_rest() {
    let env = Env::start().await;
    let good = Tenant::new("src_good", "111111111111", "us-east-1", "good");
    let mut small = Tenant::new("src_small", "111111111111", "us-east-1", "small");
    small.max_record_kib = Some(1);
    env.streams.create(&good).await;
    env.streams.create(&small).await;
    let cfg = env.config();
    let mut bad_settings = Tenant::new("src_bad", "333333333333", "mars-north-1", "x").settings();
    bad_settings["secretId"] = json!("topsecret-value");
    cfg.write_tenants(&[good.settings(), small.settings(), bad_settings.clone()]);
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);

    let pad = "x".repeat(2048);
    let cases: Vec<(Option<&str>, Vec<u8>, Option<&str>)> = vec![
        (
            Some("src_good"),
            br#"{"type":"track","userId":"u1"}"#.to_vec(),
            None,
        ),
        (
            Some("src_good"),
            b"{not json".to_vec(),
            Some("invalid_json"),
        ),
        (
            Some("src_good"),
            br#"{"type":"page","userId":"u2"}"#.to_vec(),
            None,
        ),
        (
            None,
            br#"{"type":"track","userId":"u3"}"#.to_vec(),
            Some("missing_source_id"),
        ),
        (
            Some("src_nobody"),
            br#"{"type":"track","userId":"u4"}"#.to_vec(),
            Some("unknown_source"),
        ),
        (
            Some("src_bad"),
            br#"{"type":"track","userId":"u5"}"#.to_vec(),
            Some("invalid_settings"),
        ),
        (
            Some("src_good"),
            br#"{"type":"track","userId":""}"#.to_vec(),
            Some("missing_partition_key"),
        ),
        (
            Some("src_small"),
            format!(r#"{{"type":"track","userId":"u6","p":"{pad}"}}"#).into_bytes(),
            Some("record_too_large"),
        ),
        (
            Some("src_good"),
            br#"{"type":"pageview","userId":"u7"}"#.to_vec(),
            Some("unsupported_type"),
        ),
        (
            Some("src_small"),
            br#"{"type":"alias","userId":"u8"}"#.to_vec(),
            None,
        ),
    ];
    let mut produced = Vec::new();
    for (i, (source, value, _)) in cases.iter().enumerate() {
        produced.push(env.send(value, *source, &format!("k{i}")).await);
    }
    let bad_count = cases.iter().filter(|c| c.2.is_some()).count();
    let dead = env
        .kafka
        .read_topic(DLQ, bad_count, Duration::from_secs(60));
    assert_eq!(dead.len(), bad_count, "dead letters: {}", worker.logs());
    for ((source, value, reason), at) in cases.iter().zip(&produced) {
        let Some(reason) = reason else { continue };
        let dl = dead
            .iter()
            .find(|m| {
                Kafka::header(m, "dlq.partition") == Some(at.partition.to_string())
                    && Kafka::header(m, "dlq.offset") == Some(at.offset.to_string())
            })
            .unwrap_or_else(|| panic!("no dead letter for {reason} at {at:?}"));
        assert_eq!(Kafka::header(dl, "dlq.reason").as_deref(), Some(*reason));
        assert_eq!(Kafka::header(dl, "dlq.topic").as_deref(), Some(TOPIC));
        assert_eq!(
            Kafka::value(dl),
            &value[..],
            "{reason}: original value kept"
        );
        assert_eq!(
            Kafka::header(dl, "source_id").as_deref(),
            *source,
            "{reason}: original headers kept"
        );
        let error = Kafka::header(dl, "dlq.error").unwrap_or_default();
        assert!(
            !error.is_empty() && !error.contains('\n'),
            "{reason}: {error:?}"
        );
        assert!(!error.contains("topsecret"), "secret in dlq.error: {error}");
        let m = worker.metrics();
        assert_eq!(
            kd_testkit::metric_value(
                &m,
                &format!("kinesis_destination_events_dead_lettered_total{{reason=\"{reason}\"}}")
            ),
            1.0,
            "{reason}"
        );
    }
    wait_metric(&worker, "kinesis_destination_events_delivered_total", 3.0).await;
    assert_eq!(env.streams.read(&good).await.len(), 2);
    assert_eq!(env.streams.read(&small).await.len(), 1);
    assert_eq!(
        worker.metric("kinesis_destination_events_received_total"),
        cases.len() as f64
    );
    env.wait_committed_to_end(&cfg.group_id).await;
    assert!(!worker.logs().contains("topsecret"), "secret in logs");

    // The unknown source is set up after all: its dead letter is replayed and delivered.
    let nobody = Tenant::new("src_nobody", "111111111111", "us-east-1", "nobody");
    env.streams.create(&nobody).await;
    let mut all = vec![good.settings(), small.settings(), nobody.settings()];
    all.push(bad_settings.clone());
    cfg.write_tenants(&all);
    wait_metric(
        &worker,
        "kinesis_destination_tenant_settings{state=\"valid\"}",
        3.0,
    )
    .await;
    let stderr = replay(&["--reason", "unknown_source"], &cfg.path());
    assert!(stderr.contains("replayed 1 of 7"), "{stderr}");
    wait_metric(&worker, "kinesis_destination_events_delivered_total", 4.0).await;
    let replayed = env.streams.read(&nobody).await;
    assert_eq!(replayed.len(), 1);
    assert_eq!(
        replayed[0].data, cases[4].1,
        "the original value, byte for byte"
    );
    // A dead letter claiming to come from a topic the worker does not read (someone
    // wrote it to the dead-letter topic by hand) is refused, not produced there; one cut
    // to fit is left alone.
    env.kafka
        .send(
            DLQ,
            Some("k"),
            br#"{"type":"track","userId":"u9"}"#,
            &[
                ("source_id", "src_nobody"),
                ("dlq.reason", "unknown_source"),
                ("dlq.topic", "payments"),
            ],
        )
        .await;
    env.kafka
        .send(
            DLQ,
            Some("k"),
            br#"{"type":"track","us"#,
            &[
                ("source_id", "src_nobody"),
                ("dlq.reason", "unknown_source"),
                ("dlq.topic", TOPIC),
                ("dlq.truncated", "true"),
            ],
        )
        .await;
    let stderr = replay(
        &["--reason", "unknown_source", "--from-offset", "7"],
        &cfg.path(),
    );
    assert!(
        stderr.contains("replayed 0 of 2")
            && stderr.contains("refused 1")
            && stderr.contains("left 1 truncated"),
        "{stderr}"
    );
    assert!(env
        .kafka
        .read_topic("payments", 1, Duration::from_secs(2))
        .is_empty());
    // Sent where the operator says, it is replayed (and, src_nobody being set up now,
    // delivered).
    let stderr = replay(
        &[
            "--reason",
            "unknown_source",
            "--from-offset",
            "7",
            "--to-topic",
            TOPIC,
        ],
        &cfg.path(),
    );
    assert!(stderr.contains("replayed 1 of 2"), "{stderr}");
    wait_metric(&worker, "kinesis_destination_events_delivered_total", 5.0).await;
    assert_eq!(env.streams.read(&nobody).await.len(), 2);
    // The worker is still healthy after all that.
    assert_eq!(worker.get("/healthz").map(|r| r.0), Some(200));
    worker.stop();
}

/// Every event whose offset is below the committed offset of its partition must be in
/// the stream: commits never pass an event that was not written.
async fn assert_commits_cover_only_written(
    env: &Env,
    group: &str,
    tenant: &Tenant,
    sent: &[(Produced, String)],
) -> usize {
    let committed = env.kafka.committed(group, TOPIC, PARTITIONS);
    let written: HashSet<String> = env
        .streams
        .read(tenant)
        .await
        .iter()
        .filter_map(|r| r.json()["messageId"].as_str().map(str::to_owned))
        .collect();
    let mut covered = 0;
    for (at, id) in sent {
        if at.offset < committed[at.partition as usize] {
            covered += 1;
            assert!(
                written.contains(id),
                "offset {at:?} committed but {id} not written"
            );
        }
    }
    covered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigkill_mid_stream_lose_nothing() {
    let env = Env::start().await;
    let mut t = Tenant::new("src_r", "111111111111", "us-east-1", "restarts");
    t.shards = 2;
    env.streams.create(&t).await;
    let cfg = env.config();
    cfg.write_tenants(&[t.settings()]);
    cfg.write();

    let total = 900;
    let mut sent: Vec<(Produced, String)> = Vec::new();
    let mut worker = Worker::start_ready(bin(), &cfg);

    // Events keep arriving while the worker is stopped and started.
    let mut next = 0;
    // In batches, as a producer with librdkafka's defaults sends them.
    let mut send_batch = async |count: usize, sent: &mut Vec<(Produced, String)>| {
        let mut ids = Vec::new();
        let mut records = Vec::new();
        for _ in 0..count {
            let id = format!("r-{next}");
            let user = format!("u{}", next % 17);
            let bytes = json!({"type": "track", "userId": user, "messageId": id}).to_string();
            records.push((
                user,
                bytes.into_bytes(),
                vec![("source_id".to_owned(), "src_r".to_owned())],
            ));
            ids.push(id);
            next += 1;
        }
        let at = env.kafka.send_many(TOPIC, &records).await;
        sent.extend(at.into_iter().zip(ids));
    };
    send_batch(300, &mut sent).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.sigterm();
    worker.assert_exits_cleanly(Duration::from_secs(40));
    assert!(worker.logs().contains("stopped"));
    assert_commits_cover_only_written(&env, &cfg.group_id, &t, &sent).await;

    send_batch(300, &mut sent).await;
    let mut worker = Worker::start_ready(bin(), &cfg);
    send_batch(100, &mut sent).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.sigkill();
    assert_commits_cover_only_written(&env, &cfg.group_id, &t, &sent).await;

    send_batch(total - 700, &mut sent).await;
    let mut worker = Worker::start(bin(), &cfg);
    worker.wait_ready(Duration::from_secs(60));
    let ids: HashSet<String> = sent.iter().map(|(_, id)| id.clone()).collect();
    eventually(
        Duration::from_secs(90),
        "every event written at least once",
        || async {
            let written: HashSet<String> = env
                .streams
                .read(&t)
                .await
                .iter()
                .filter_map(|r| r.json()["messageId"].as_str().map(str::to_owned))
                .collect();
            ids.is_subset(&written).then_some(())
        },
    )
    .await;
    env.wait_committed_to_end(&cfg.group_id).await;
    let covered = assert_commits_cover_only_written(&env, &cfg.group_id, &t, &sent).await;
    assert_eq!(covered, total);
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_file_edits_apply_without_restart() {
    let env = Env::start().await;
    let a = Tenant::new("src_a", "111111111111", "us-east-1", "a");
    let b = Tenant::new("src_b", "222222222222", "us-west-2", "b");
    env.streams.create(&a).await;
    env.streams.create(&b).await;
    let cfg = env.config();
    cfg.write_tenants(&[a.settings()]);
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);
    let ev = |n: usize| {
        json!({"type": "track", "userId": format!("u{n}"), "messageId": format!("m{n}")})
            .to_string()
            .into_bytes()
    };

    env.send(&ev(1), Some("src_b"), "k").await;
    wait_metric(
        &worker,
        "kinesis_destination_events_dead_lettered_total{reason=\"unknown_source\"}",
        1.0,
    )
    .await;

    // A new tenant: its next events are delivered without a restart.
    cfg.write_tenants(&[a.settings(), b.settings()]);
    wait_metric(
        &worker,
        "kinesis_destination_tenant_settings{state=\"valid\"}",
        2.0,
    )
    .await;
    env.send(&ev(2), Some("src_b"), "k").await;
    env.send(&ev(3), Some("src_a"), "k").await;
    wait_metric(&worker, "kinesis_destination_events_delivered_total", 2.0).await;
    assert_eq!(env.streams.read(&b).await.len(), 1);

    // A broken file: the last good settings stay in force.
    cfg.write_tenants_raw("[{\"sourceId\": ");
    wait_metric(
        &worker,
        "kinesis_destination_tenant_settings_errors_total",
        1.0,
    )
    .await;
    env.send(&ev(4), Some("src_a"), "k").await;
    env.send(&ev(5), Some("src_b"), "k").await;
    wait_metric(&worker, "kinesis_destination_events_delivered_total", 4.0).await;

    // One tenant made invalid: its events dead-letter, the other goes on.
    let mut bad_b = b.settings();
    bad_b["region"] = json!("nowhere-1");
    cfg.write_tenants(&[a.settings(), bad_b]);
    wait_metric(
        &worker,
        "kinesis_destination_tenant_settings{state=\"invalid\"}",
        1.0,
    )
    .await;
    env.send(&ev(6), Some("src_b"), "k").await;
    env.send(&ev(7), Some("src_a"), "k").await;
    wait_metric(
        &worker,
        "kinesis_destination_events_dead_lettered_total{reason=\"invalid_settings\"}",
        1.0,
    )
    .await;
    wait_metric(&worker, "kinesis_destination_events_delivered_total", 5.0).await;
    assert_eq!(env.streams.read(&a).await.len(), 3);
    assert_eq!(env.streams.read(&b).await.len(), 2);
    env.wait_committed_to_end(&cfg.group_id).await;
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shard_tenant_is_held_to_shard_capacity() {
    // moto writes a few hundred records a second, slower than one shard's capacity, so
    // the writes go to the fast AWS fake, which records when each one arrived.
    let tansu = Tansu::start();
    tansu.create_topic(TOPIC, PARTITIONS as u32);
    tansu.create_topic(DLQ, 1);
    let fake = kd_testkit::FakeAws::start().await;
    let t = Tenant::new("src_one", "111111111111", "us-east-1", "one-shard");
    fake.create_stream(&t.stream, 1);
    let cfg = WorkerConfig::new(&tansu.bootstrap(), &fake.endpoint());
    cfg.write_tenants(&[t.settings()]);
    cfg.write();
    // 3,000 events queued before the worker starts, through the produce command.
    kd_testkit::produce(bin(), &tansu.bootstrap(), TOPIC, "src_one", 3000, 200, &[]);

    let mut worker = Worker::start_ready(bin(), &cfg);
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        3000.0,
    )
    .await;
    let records = fake.records();
    assert_eq!(records.len(), 3000);
    let first = records.iter().map(|r| r.at).min().unwrap();
    let last = records.iter().map(|r| r.at).max().unwrap();
    // One shard takes 1,000 records/s: a second's burst, then 2,000 more at that pace.
    let span = last - first;
    assert!(
        span >= Duration::from_millis(1800),
        "3,000 records written within {span:?}"
    );
    // No one-second window holds more than the burst plus a second's worth (with slack
    // for requests that arrive bunched).
    let mut at: Vec<Instant> = records.iter().map(|r| r.at).collect();
    at.sort();
    let mut j = 0;
    for i in 0..at.len() {
        while at[i] - at[j] > Duration::from_secs(1) {
            j += 1;
        }
        assert!(i - j < 2300, "{} records within one second", i - j + 1);
    }
    let waited = worker.metric("kinesis_destination_rate_limit_wait_seconds_total");
    assert!(
        waited > 0.5,
        "the limiter did the pacing (waited {waited}s in all)"
    );
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_records_batches_deliver_byte_for_byte_in_order() {
    let env = Env::start().await;
    let mut t = Tenant::new("src_batch", "111111111111", "us-east-1", "batched");
    t.shards = 2;
    t.use_put_records = Some(true);
    env.streams.create(&t).await;
    let cfg = env.config();
    cfg.write_tenants(&[t.settings()]);
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);

    // 10 users, 30 events each, users interleaved, every event type.
    let mut want: Vec<(Vec<u8>, String)> = Vec::new();
    let mut n = 0;
    for _ in 0..30 {
        for u in 0..10 {
            n += 1;
            let user = format!("batch-user-{u}");
            let bytes = event(
                EventType::ALL[n % EventType::ALL.len()].as_str(),
                json!({"userId": user}),
                n,
            );
            env.send(&bytes, Some("src_batch"), &user).await;
            want.push((bytes, user));
        }
    }
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        want.len() as f64,
    )
    .await;
    // moto returns each shard's records in sequence order: per user (one key, one
    // shard) that is the order they were written in.
    let records = env.streams.read(&t).await;
    let got: Vec<(Vec<u8>, String)> = records
        .iter()
        .map(|r| (r.data.clone(), r.partition_key.clone()))
        .collect();
    for u in 0..10 {
        let user = format!("batch-user-{u}");
        let of_user = |v: &[(Vec<u8>, String)]| -> Vec<Vec<u8>> {
            v.iter()
                .filter(|(_, k)| *k == user)
                .map(|(d, _)| d.clone())
                .collect()
        };
        assert!(
            of_user(&got) == of_user(&want),
            "{user}'s events arrived byte for byte and in order"
        );
    }
    assert_eq!(got.len(), want.len());
    let m = worker.metrics();
    let calls = kd_testkit::metric_value(&m, "kinesis_destination_put_records_batch_records_count");
    let batched = kd_testkit::metric_value(&m, "kinesis_destination_put_records_batch_records_sum");
    assert_eq!(
        batched,
        want.len() as f64,
        "every record went by PutRecords"
    );
    assert!(
        calls < want.len() as f64,
        "{calls} PutRecords calls for {} records",
        want.len()
    );
    eprintln!(
        "PutRecords: {} records in {calls} calls against moto",
        want.len()
    );
    kd_testkit::assert_nothing_dead_lettered(&m);
    env.wait_committed_to_end(&cfg.group_id).await;
    worker.stop();
}
