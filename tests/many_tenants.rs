//! Many tenants: settings from a compacted topic, the credential cache under concurrency
//! and short credential lifetimes, fairness towards small tenants next to a big or a slow
//! one. Against Tansu and the AWS fake of `kd-testkit`.

mod common;
use common::bin;
use std::time::Duration;

use kd_testkit::env::{assert_all_delivered_in_order, wait_metric, FakeEnv as Env, DLQ};
use kd_testkit::{metric_value, Kafka, Worker, CALLER_ACCOUNT};
use serde_json::json;

const SETTINGS: &str = "tenant-settings";

/// One event for each of 12 users of `source`, all with sequence number `seq`.
async fn round(env: &Env, source: &str, seq: usize) -> Vec<kd_testkit::env::Sent> {
    let mut sent = Vec::new();
    for u in 0..12 {
        sent.push(env.send(source, &format!("{source}-u{u}"), seq).await);
    }
    sent
}

async fn publish(env: &Env, source: &str, settings: Option<serde_json::Value>) {
    let value = settings.map(|s| s.to_string()).unwrap_or_default();
    env.kafka
        .send(SETTINGS, Some(source), value.as_bytes(), &[])
        .await;
}

/// Waits until every worker has applied `records` settings records in all.
async fn wait_settings(workers: &[&Worker], records: f64) {
    for w in workers {
        wait_metric(
            w,
            "kinesis_destination_tenant_settings_records_total",
            records,
            Duration::from_secs(30),
        )
        .await;
    }
}

/// Ten small tenants `src_{name}0..9` with two-shard streams `{name}-0..9`: their
/// settings and their source IDs, comma-separated for `produce`.
fn ten_small_tenants(env: &Env, name: &str) -> (Vec<kd_testkit::Tenant>, String) {
    let tenants: Vec<_> = (0..10)
        .map(|i| env.tenant(&format!("src_{name}{i}"), &format!("{name}-{i}"), 2))
        .collect();
    let sources = tenants
        .iter()
        .map(|t| t.source_id.as_str())
        .collect::<Vec<_>>()
        .join(",");
    (tenants, sources)
}

/// Waits until the streams of the ten small tenants `name` hold `count` records in all.
async fn wait_small_tenants_delivered(env: &Env, name: &str, count: usize, timeout: Duration) {
    kd_testkit::eventually(timeout, "small tenants delivered", || {
        let n: usize = (0..10)
            .map(|i| env.fake.records_of(&format!("{name}-{i}")).len())
            .sum();
        async move { (n >= count).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_topic_changes_apply_without_restart_and_workers_converge() {
    let env = Env::start().await;
    env.tansu.create_topic(SETTINGS, 1);
    let a = env.tenant("src_a", "a-one", 2);
    let b = env.tenant("src_b", "b-one", 2);
    publish(&env, "src_a", Some(a.settings())).await;
    publish(&env, "src_b", Some(b.settings())).await;

    let mut cfg = env.config(&[]);
    cfg.tenants_topic = Some(SETTINGS.into());
    cfg.write();
    let mut w1 = Worker::start(bin(), &cfg);
    let mut w2 = Worker::start(bin(), &cfg);
    w1.wait_ready(Duration::from_secs(60));
    w2.wait_ready(Duration::from_secs(60));
    for w in [&w1, &w2] {
        assert_eq!(
            w.metric("kinesis_destination_tenant_settings{state=\"valid\"}"),
            2.0,
            "both pods loaded both tenants"
        );
    }
    // The one-shot commands find tenants in the settings topic too.
    let command = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(cfg.path())
            .env("AWS_ACCESS_KEY_ID", "t")
            .env("AWS_SECRET_ACCESS_KEY", "t")
            .output()
            .expect("command runs")
    };
    let check = command(&["check", "--source-id", "src_a"]);
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("PASS ")).count(),
        5,
        "{out}"
    );
    let tail = command(&["tail", "--source-id", "src_nobody"]);
    assert_eq!(tail.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&tail.stderr)
            .contains("no tenant \"src_nobody\" in topic tenant-settings"),
        "{}",
        String::from_utf8_lossy(&tail.stderr)
    );
    let delivered = |ws: [&Worker; 2]| {
        ws.iter()
            .map(|w| w.metric("kinesis_destination_events_delivered_total"))
            .sum::<f64>()
    };
    let wait_delivered = |n: f64| {
        let (w1, w2) = (&w1, &w2);
        async move {
            kd_testkit::eventually(Duration::from_secs(30), "events delivered", || {
                let d = delivered([w1, w2]);
                async move { (d >= n).then_some(()) }
            })
            .await
        }
    };
    // Users spread over every partition, so both pods route with the settings.
    let first = round(&env, "src_a", 0).await;
    round(&env, "src_b", 0).await;
    wait_delivered(24.0).await;
    assert_all_delivered_in_order(&first, &env.fake.records_of("a-one"));

    // New stream for A: the next events go there.
    let mut a2 = a.clone();
    a2.stream = "a-two".into();
    env.fake.create_stream("a-two", 2);
    publish(&env, "src_a", Some(a2.settings())).await;
    wait_settings(&[&w1, &w2], 3.0).await;
    let moved = round(&env, "src_a", 1).await;
    wait_delivered(36.0).await;
    assert_all_delivered_in_order(&moved, &env.fake.records_of("a-two"));
    assert_eq!(
        env.fake.records_of("a-one").len(),
        12,
        "nothing more in the old stream"
    );

    // New role and secret for A: assumed with the new external ID; old credentials unused.
    let mut a3 = a2.clone();
    a3.account = "555555555555".into();
    a3.secret_id = Some("rotated-secret".into());
    env.fake.set_trust_policy(
        &a3.role_arn(),
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Principal": {"AWS": format!("arn:aws:iam::{CALLER_ACCOUNT}:root")},
            "Action": "sts:AssumeRole",
            "Condition": {"StringEquals": {"sts:ExternalId": "rotated-secret"}}}]}),
    );
    publish(&env, "src_a", Some(a3.settings())).await;
    wait_settings(&[&w1, &w2], 4.0).await;
    let rotated = round(&env, "src_a", 2).await;
    wait_delivered(48.0).await;
    let records = env.fake.records_of("a-two");
    assert_all_delivered_in_order(&rotated, &records);
    let ids: std::collections::HashSet<&str> = rotated.iter().map(|s| s.id.as_str()).collect();
    for r in records
        .iter()
        .filter(|r| ids.contains(r.json()["messageId"].as_str().unwrap_or("")))
    {
        assert_eq!(
            env.fake.role_of(&r.access_key),
            Some(a3.role_arn()),
            "written with the new role"
        );
    }
    assert!(
        env.fake
            .assume_role_calls()
            .iter()
            .any(|c| c.role_arn == a3.role_arn()
                && c.external_id.as_deref() == Some("rotated-secret"))
    );

    // B removed with a tombstone: its events are dead-lettered unknown_source.
    publish(&env, "src_b", None).await;
    wait_settings(&[&w1, &w2], 5.0).await;
    for w in [&w1, &w2] {
        wait_metric(
            w,
            "kinesis_destination_tenant_settings{state=\"valid\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            w.metric("kinesis_destination_tenant_settings{state=\"valid\"}"),
            1.0
        );
    }
    let removed = round(&env, "src_b", 1).await;
    let dead = env
        .kafka
        .read_topic(DLQ, removed.len(), Duration::from_secs(30));
    assert_eq!(dead.len(), removed.len());
    assert!(dead
        .iter()
        .all(|m| Kafka::header(m, "dlq.reason").as_deref() == Some("unknown_source")));

    for w in [&mut w1, &mut w2] {
        w.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_events_of_a_new_tenant_cost_one_assume_role() {
    let env = Env::start().await;
    let t = env.tenant("src_new", "new", 4);
    // Per-source metrics for this source only (an allow-list keeps labels bounded).
    let cfg = env
        .config(&[&t])
        .set("metrics", "source_labels = [\"src_new\"]");
    cfg.write();
    // Queued before the worker starts, so 50 lanes ask for credentials at once.
    let sent = env.send_many("src_new", 50, 1).await;
    let mut worker = Worker::start_ready(bin(), &cfg);
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        50.0,
        Duration::from_secs(30),
    )
    .await;
    assert_all_delivered_in_order(&sent, &env.fake.records_of("new"));
    assert_eq!(env.fake.assume_role_calls().len(), 1);
    let m = worker.metrics();
    assert_eq!(
        metric_value(&m, "kinesis_destination_credential_cache_misses_total"),
        1.0
    );
    // Every other lookup is a hit: one per event at least, and at most three (a new
    // tenant's records look their session up before their trial write, their batch
    // again, and a record may bring it for the stream's first listing).
    let hits = metric_value(&m, "kinesis_destination_credential_cache_hits_total");
    assert!((49.0..=150.0).contains(&hits), "{hits} cache hits");
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_credentials_are_refreshed_before_they_expire() {
    let env = Env::start().await;
    let t = env.tenant("src_short", "short", 2);
    // Four-second credentials: refreshed at half their life, never used expired.
    env.fake.set_credential_lifetime(Duration::from_secs(4));
    let cfg = env.config(&[&t]);
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);
    let mut sent = Vec::new();
    for seq in 0..50 {
        for u in 0..4 {
            sent.push(env.send("src_short", &format!("u{u}"), seq).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        200.0,
        Duration::from_secs(30),
    )
    .await;
    assert_all_delivered_in_order(&sent, &env.fake.records_of("short"));
    let calls = env.fake.assume_role_calls().len();
    assert!(
        calls >= 4,
        "about one AssumeRole per 2 s over 10 s, got {calls}"
    );
    let m = worker.metrics();
    assert!(!m.contains("put_errors_total{"), "no write failed:\n{m}");
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_tenants_flow_while_a_hundredfold_tenant_drains() {
    let env = Env::start().await;
    // The big tenant's one-shard stream takes under 1,000 records a second: its 10,000
    // events need more than ten seconds. Ten small tenants send 100 each.
    let big = env.tenant("src_big", "big", 1);
    let (small, small_sources) = ten_small_tenants(&env, "small");
    // Fairness as configured by default (`tenant_share = 0.5`), with partitions whose
    // cap (budget plus a share: 3,000) the big tenant's backlog passes. Alone in its
    // partitions it is judged there after half a second; until then reading goes on
    // (its backlog fits in the totals), so the small tenants' events are reached
    // either way, by reading on or by skipping the big tenant's.
    let cfg = env
        .config(&[&big].into_iter().chain(&small).collect::<Vec<_>>())
        .set("delivery", "max_in_flight_per_partition = 2000");
    cfg.write();
    // The small tenants' events come after all of the big one's, in the same partitions:
    // the worst case, where reading in order would make them wait for the whole backlog.
    env.produce(bin(), "src_big", 10_000, 300, &["--compression", "lz4"]);
    env.produce(bin(), &small_sources, 1_000, 10, &["--compression", "lz4"]);

    let mut worker = Worker::start_ready(bin(), &cfg);
    wait_small_tenants_delivered(&env, "small", 1000, Duration::from_secs(60)).await;
    let big_then = env.fake.records_of("big").len();
    eprintln!("fairness: small tenants done when the big one had {big_then} of 10,000 written");
    assert!(
        big_then < 4000,
        "small tenants waited for the big one ({big_then} written)"
    );

    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        11_000.0,
        Duration::from_secs(120),
    )
    .await;
    let records = env.fake.records_of("big");
    assert_eq!(
        kd_testkit::env::first_deliveries(&records).len(),
        10_000,
        "every big event arrived"
    );
    // Events skipped, if any were, were read again.
    let skips = worker.metric("kinesis_destination_fairness_skips_total");
    let rereads = worker.metric("kinesis_destination_fairness_rereads_total");
    eprintln!("fairness: {skips} events skipped, {rereads} partitions read again");
    assert!(skips == 0.0 || rereads > 0.0);
    env.wait_committed_to_end(&cfg.group_id).await;
    assert_users_in_order(&records);
    worker.stop();
}

/// Each user's first deliveries are in the order `produce` numbered them.
fn assert_users_in_order(records: &[kd_testkit::FakeRecord]) {
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    for v in kd_testkit::env::first_deliveries(records) {
        let user = v["userId"]
            .as_str()
            .or(v["anonymousId"].as_str())
            .unwrap_or_default()
            .to_owned();
        let seq = v["properties"]["seq"].as_i64().unwrap_or(-1);
        let prev = last.insert(user.clone(), seq).unwrap_or(-1);
        assert!(seq > prev, "user {user}: {seq} after {prev}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_slow_tenant_at_its_partitions_cap_is_skipped_and_read_again() {
    let env = Env::start().await;
    // Alone in flight at the start of every partition, with a backlog far past each
    // partition's cap (2,000 + a share of 1,000), on a four-shard stream: about 1,300
    // events a second per partition, so the 3,000 at the cap do not drain within 2 s.
    // It is skipped at the cap once its rate is measured (or at twice the cap), and the
    // small tenants behind it are reached without waiting for its backlog.
    let big = env.tenant("src_lone", "lone", 4);
    let (small, small_sources) = ten_small_tenants(&env, "behind");
    let cfg = env
        .config(&[&big].into_iter().chain(&small).collect::<Vec<_>>())
        .set("delivery", "max_in_flight_per_partition = 2000");
    cfg.write();
    env.produce(bin(), "src_lone", 24_000, 300, &["--compression", "lz4"]);
    env.produce(bin(), &small_sources, 1_000, 10, &["--compression", "lz4"]);

    let mut worker = Worker::start_ready(bin(), &cfg);
    wait_small_tenants_delivered(&env, "behind", 1000, Duration::from_secs(60)).await;
    let big_then = env.fake.records_of("lone").len();
    let skips = worker.metric("kinesis_destination_fairness_skips_total");
    eprintln!("lone tenant: small tenants done when it had {big_then} of 24,000 written, {skips} of its events skipped");
    assert!(
        big_then < 16_000,
        "the small tenants waited for the lone tenant's backlog ({big_then} written)"
    );
    assert!(
        skips > 0.0,
        "the lone tenant was skipped at its partitions' cap"
    );
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        25_000.0,
        Duration::from_secs(120),
    )
    .await;
    let records = env.fake.records_of("lone");
    assert_eq!(
        kd_testkit::env::first_deliveries(&records).len(),
        24_000,
        "every skipped event was read again and written"
    );
    assert!(worker.metric("kinesis_destination_fairness_rereads_total") > 0.0);
    env.wait_committed_to_end(&cfg.group_id).await;
    assert_users_in_order(&records);
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tenant_holds_at_most_its_share_of_the_requests_on_the_wire() {
    let env = Env::start().await;
    // Every write to the slow tenant's stream takes 2 s (not a timeout: it succeeds).
    let slow = env.tenant("src_slow", "slow", 2);
    env.fake.fail_for(
        "slow",
        kd_testkit::Fault::Latency(Duration::from_secs(2)),
        Duration::from_secs(600),
    );
    let (quick, quick_sources) = ten_small_tenants(&env, "quick");
    // 16 requests on the wire at once: with 200 users, the slow tenant alone could keep
    // all of them busy for 2 s at a time. Its share (default 0.5) leaves 8 for the rest.
    let cfg = env
        .config(&[&slow].into_iter().chain(&quick).collect::<Vec<_>>())
        .set("aws", "max_concurrent_requests = 16");
    cfg.write();
    env.produce(bin(), "src_slow", 2_000, 200, &[]);
    env.produce(bin(), &quick_sources, 1_000, 10, &[]);

    let mut worker = Worker::start_ready(bin(), &cfg);
    wait_small_tenants_delivered(&env, "quick", 1000, Duration::from_secs(20)).await;
    let slow_then = env.fake.records_of("slow").len();
    eprintln!("slow tenant: quick tenants done when the slow one had {slow_then} of 2,000 written");
    assert!(
        slow_then < 1000,
        "the slow tenant was not slow ({slow_then} written)"
    );

    // Once it is fast again, everything of the slow tenant arrives too.
    env.fake.clear_faults("slow");
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        3_000.0,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(env.fake.records_of("slow").len(), 2_000);
    env.wait_committed_to_end(&cfg.group_id).await;
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_refusing_the_workers_own_credentials_takes_readiness_away() {
    let env = Env::start().await;
    let warm = env.tenant("src_warm", "warm", 1);
    let cold = env.tenant("src_cold", "cold", 1);
    let cfg = env
        .config(&[&warm, &cold])
        .set("aws", "assume_role_failure_ttl_secs = 1")
        .set("delivery", "initial_backoff_ms = 50")
        .set("delivery", "max_backoff_ms = 500");
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);
    let mut sent_warm = env.send_many("src_warm", 3, 1).await;
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        3.0,
        Duration::from_secs(30),
    )
    .await;
    // The worker's access key is revoked: a tenant without a cached session cannot be
    // served, and readiness says why.
    env.fake.reject_caller(true);
    let sent_cold = env.send_many("src_cold", 3, 2).await;
    let reason = kd_testkit::eventually(Duration::from_secs(30), "not ready", || async {
        match worker.get("/readyz") {
            Some((503, body)) => Some(body),
            _ => None,
        }
    })
    .await;
    assert!(
        reason.contains("worker's own AWS credentials") && !reason.contains("InvalidClientTokenId"),
        "{reason}"
    );
    assert!(worker.logs().contains("InvalidClientTokenId"));
    // A tenant with a cached session is still served meanwhile.
    sent_warm.extend(env.send_many("src_warm", 3, 1).await);
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        6.0,
        Duration::from_secs(30),
    )
    .await;
    assert!(env.fake.records_of("cold").is_empty());
    // The credentials are fixed: the waiting events are delivered, ready again.
    env.fake.reject_caller(false);
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        12.0,
        Duration::from_secs(30),
    )
    .await;
    assert_all_delivered_in_order(&sent_cold, &env.fake.records_of("cold"));
    assert_all_delivered_in_order(&sent_warm, &env.fake.records_of("warm"));
    kd_testkit::eventually(Duration::from_secs(10), "ready again", || async {
        (worker.get("/readyz").map(|r| r.0) == Some(200)).then_some(())
    })
    .await;
    kd_testkit::assert_nothing_dead_lettered(&worker.metrics());
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_of_many_tenants_keeps_assume_role_calls_within_their_bound() {
    let env = Env::start().await;
    env.fake.set_sts_latency(Duration::from_millis(300));
    let tenants: Vec<_> = (0..60)
        .map(|i| env.tenant(&format!("src_cold{i}"), &format!("cold-{i}"), 1))
        .collect();
    let cfg = env
        .config(&tenants.iter().collect::<Vec<_>>())
        .set("aws", "max_concurrent_assume_role = 8")
        // Every tenant is in us-east-1: all the places may go to its STS.
        .set("aws", "region_share = 1.0");
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);
    // One event of each tenant: 60 sessions to assume at once.
    let events: Vec<(String, String, usize)> = (0..60)
        .map(|i| (format!("src_cold{i}"), "u".to_owned(), 0))
        .collect();
    env.send_all(&events).await;
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        60.0,
        Duration::from_secs(60),
    )
    .await;
    let most = env.fake.max_concurrent_assume_role();
    eprintln!("cold start: at most {most} AssumeRole calls at once (bound 8)");
    assert!((6..=8).contains(&most), "{most} AssumeRole calls at once");
    assert_eq!(env.fake.requests("AssumeRole"), 60);
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_down_with_more_events_than_the_whole_budget_does_not_stop_the_others() {
    let env = Env::start().await;
    // Its stream is down for the whole test; its 30,000 events over all three
    // partitions are more than the worker holds in flight at most (20,000 by default),
    // and no partition alone holds enough of them to reach its own budget.
    let down = env.tenant("src_down", "down", 4);
    env.fake.fail_for(
        "down",
        kd_testkit::Fault::Error {
            status: 503,
            code: "ServiceUnavailable".into(),
        },
        Duration::from_secs(3600),
    );
    let (small, small_sources) = ten_small_tenants(&env, "small");
    let cfg = env.config(&[&down].into_iter().chain(&small).collect::<Vec<_>>());
    cfg.write();
    env.produce(bin(), "src_down", 30_000, 600, &["--compression", "lz4"]);
    env.produce(bin(), &small_sources, 1_000, 10, &["--compression", "lz4"]);

    let mut worker = Worker::start_ready(bin(), &cfg);
    wait_small_tenants_delivered(&env, "small", 1000, Duration::from_secs(60)).await;
    let m = worker.metrics();
    let held = metric_value(&m, "kinesis_destination_in_flight_events");
    let skips = metric_value(&m, "kinesis_destination_fairness_skips_total");
    eprintln!("down tenant across the budget: others delivered with {held} events in flight, {skips} of its events skipped");
    assert!(skips > 0.0, "the down tenant's events were skipped");
    assert!(
        held <= 30_000.0,
        "in flight bounded by the budget plus its overdraft: {held}"
    );
    assert!(env.fake.records_of("down").is_empty());
    worker.stop();
}
