//! The throughput benchmark: figures, not pass/fail (`#[ignore]`d by `cargo test`; run
//! by `scripts/bench.sh`, which prints the table it writes).
//!
//! Each scenario gets a fresh broker (Tansu, as every test) and AWS fake. Its
//! events are produced first, with the `produce` command (librdkafka's ordinary batching); then a bare rdkafka consumer
//! reads the same topic from the same broker (the ceiling: what one pod could read at
//! most), then the worker (release build, its defaults but for the write mode) drains
//! it. Reported: events/s from the first to the last write, that as a share of the
//! ceiling, the worker's CPU time per event (from /proc/<pid>/stat), its peak RSS, and
//! the p50/p99 delivery latency (an event's `timestamp` to its write; events wait in the
//! backlog, so this is mostly queueing). With `../shared/peers/vector` present, Vector
//! 0.58 reads the same single-tenant topic into its own stream on the same fake.

mod common;
use common::bin;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use kd_testkit::env::{wait_metric, FakeEnv as Env, TOPIC};
use kd_testkit::{FakeRecord, Fault, Tenant, Worker};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// The number in environment variable `name`, or `default`.
fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Events per scenario (`BENCH_EVENTS` to change).
fn events() -> u32 {
    env_number("BENCH_EVENTS", 200_000)
}

/// Shards of the single tenant's stream. Kinesis takes at most 1,000 records/s per
/// shard and the worker keeps to it; 2,000 users hashed over 64 shards put ~1.8× the
/// average on the busiest one, which would cap a 64-shard stream near 43,000 events/s
/// whatever the writer (the fake does not throttle in the bench, so a writer that does
/// not keep to shard limits would look faster than Kinesis would let it be). 256 shards
/// leave the stream's capacity well above what one pod reads.
const SINGLE_TENANT_SHARDS: u32 = 256;

/// Tenants of the many-tenants scenario (`BENCH_TENANTS` to change): every pod sees
/// every active tenant, and keeps a session and a stream limiter for each.
fn many_tenants() -> usize {
    env_number("BENCH_TENANTS", 100_000)
}

/// Events each tenant of the many-tenants scenario sends.
const MANY_TENANTS_EVENTS: u32 = 3;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    PutRecord,
    PutRecords,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::PutRecord => "PutRecord",
            Mode::PutRecords => "PutRecords",
        }
    }
}

struct Row {
    scenario: String,
    who: &'static str,
    events: usize,
    rate: f64,
    /// Events/s between the 10th and the 90th percentile of the writes.
    steady: f64,
    /// From the first write to the first 100 ms in which the writes came at 90% of the
    /// steady rate or more.
    full_speed_after_ms: f64,
    ceiling: f64,
    /// The bare consumer's CPU per event (this process's, while it alone ran).
    ceiling_cpu_us: f64,
    cpu_us: f64,
    rss_mib: u64,
    p50_ms: f64,
    p99_ms: f64,
    /// Tenants in the settings, and from the worker's start: seconds until it was
    /// ready, and its resident memory then (MiB).
    loaded: Option<(usize, f64, u64)>,
}

impl Row {
    fn print_header() {
        println!(
            "| scenario | writer | events | events/s | steady events/s | full speed after | % of ceiling (bare consumer: events/s, its CPU µs/event) | CPU µs/event | peak RSS MiB | latency p50 / p99 |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
    }

    fn print(&self) {
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.1} s | {:.0}% ({:.0}, {:.1} µs) | {:.1} | {} | {:.0} ms / {:.0} ms |",
            self.scenario,
            self.who,
            self.events,
            self.rate,
            self.steady,
            self.full_speed_after_ms / 1000.0,
            100.0 * self.rate / self.ceiling,
            self.ceiling,
            self.ceiling_cpu_us,
            self.cpu_us,
            self.rss_mib,
            self.p50_ms,
            self.p99_ms
        );
    }
}

/// Reads `count` records of the input topic from the start with a bare consumer (the
/// worker's librdkafka defaults, nothing done per record): records/s from the first to
/// the last, and the CPU per record of this process meanwhile (nothing else of it runs
/// then): the floor under the worker's own CPU per event.
fn bare_consumer_rate(bootstrap: &str, count: usize) -> (f64, f64) {
    let cpu_before = kd_testkit::cpu_seconds_of(std::process::id());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("bench-ceiling-{}", kd_testkit::free_port()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("bare consumer");
    consumer.subscribe(&[TOPIC]).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut n, mut first, mut last) = (0usize, None, Instant::now());
    while n < count && Instant::now() < deadline {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            n += 1;
            last = Instant::now();
            first.get_or_insert(last);
        }
    }
    assert_eq!(n, count, "the bare consumer read every record");
    drop(consumer);
    let cpu = kd_testkit::cpu_seconds_of(std::process::id()) - cpu_before;
    (
        n as f64 / (last - first.unwrap_or(last)).as_secs_f64(),
        cpu * 1e6 / n as f64,
    )
}

/// How fast the writes came: records/s from the first write to the last and between
/// the 10th and 90th percentile, and how long after the first write they first came
/// at 90% of that steady rate over 100 ms.
struct Pace {
    rate: f64,
    steady: f64,
    full_speed_after_ms: f64,
    /// Records written in each 100 ms from the first write.
    per_bin: Vec<usize>,
}

fn pace(records: &[FakeRecord]) -> Pace {
    let mut times: Vec<Instant> = records.iter().map(|r| r.at).collect();
    times.sort();
    let (first, last) = (times[0], times[times.len() - 1]);
    let rate = times.len() as f64 / (last - first).as_secs_f64().max(1e-3);
    let (p10, p90) = (times.len() / 10, times.len() * 9 / 10);
    let steady = (p90 - p10) as f64 / (times[p90] - times[p10]).as_secs_f64().max(1e-3);
    const BIN: Duration = Duration::from_millis(100);
    let mut per_bin = vec![0usize; ((last - first).as_millis() / BIN.as_millis() + 1) as usize];
    for t in &times {
        per_bin[((*t - first).as_millis() / BIN.as_millis()) as usize] += 1;
    }
    let full = per_bin
        .iter()
        .position(|&n| n as f64 >= 0.9 * steady * BIN.as_secs_f64())
        .unwrap_or(per_bin.len());
    Pace {
        rate,
        steady,
        full_speed_after_ms: (full as u128 * BIN.as_millis()) as f64,
        per_bin,
    }
}

/// The pace of the writes (see [`pace`]), and delivery latency percentiles (ms) from
/// each event's `timestamp` (set when it was produced) to its write.
fn write_figures(records: &[FakeRecord]) -> (Pace, f64, f64) {
    let pace = pace(records);
    let mut latencies: Vec<f64> = records
        .iter()
        .filter_map(|r| {
            let ts = r.json()["timestamp"].as_str()?.to_owned();
            let produced = aws_smithy_types::DateTime::from_str(
                &ts,
                aws_smithy_types::date_time::Format::DateTime,
            )
            .ok()?;
            let produced = SystemTime::try_from(produced).ok()?;
            Some(r.at_wall.duration_since(produced).ok()?.as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    (pace, at(0.50), at(0.99))
}

/// A scenario's input: `tenants` tenants (streams of `shards` shards, answered after
/// `sink`) of `users` users each, the events produced, and the ceiling measured.
struct Input {
    env: Env,
    tenants: Vec<Tenant>,
    /// Events produced.
    events: u32,
    ceiling: f64,
    ceiling_cpu_us: f64,
}

async fn input(tenants: usize, users: u32, shards: u32, mode: Mode, sink: Duration) -> Input {
    let env = Env::start().await;
    let tenants: Vec<Tenant> = (0..tenants)
        .map(|i| {
            let mut t = env.tenant(&format!("src_{i}"), &format!("s{i}"), shards);
            // Batches on the worker's default (`auto`); record by record as a tenant
            // whose role allows nothing else asks for it.
            t.use_put_records = match mode {
                Mode::PutRecords => None,
                Mode::PutRecord => Some(false),
            };
            if !sink.is_zero() {
                env.fake
                    .fail_for(&t.stream, Fault::Latency(sink), Duration::from_secs(3600));
            }
            t
        })
        .collect();
    let sources: Vec<&str> = tenants.iter().map(|t| t.source_id.as_str()).collect();
    env.produce(bin(), &sources.join(","), events(), users, &[]);
    let (ceiling, ceiling_cpu_us) = bare_consumer_rate(&env.tansu.bootstrap(), events() as usize);
    Input {
        env,
        tenants,
        events: events(),
        ceiling,
        ceiling_cpu_us,
    }
}

/// One tenant with one user on a one-shard stream answered after `sink`, `events` events,
/// with KPL aggregation on or off.
async fn hot_user_input(aggregate: bool, events: u32, sink: Duration) -> Input {
    let env = Env::start().await;
    let mut t = env.tenant("src_hot", "hot", 1);
    t.use_put_records = None;
    t.aggregate = aggregate;
    env.fake
        .fail_for(&t.stream, Fault::Latency(sink), Duration::from_secs(3600));
    env.produce(bin(), "src_hot", events, 1, &[]);
    let (ceiling, ceiling_cpu_us) = bare_consumer_rate(&env.tansu.bootstrap(), events as usize);
    Input {
        env,
        tenants: vec![t],
        events,
        ceiling,
        ceiling_cpu_us,
    }
}

/// `tenants` tenants (one-shard streams, batching on the default) sending `per_tenant`
/// events each, tenant after tenant in turns (every tenant active at once, as a pod
/// sees them), produced by librdkafka with its default batching.
fn many_tenants_input(env: Env, tenants: usize, per_tenant: u32) -> Input {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let tenants: Vec<Tenant> = (0..tenants)
        .map(|i| {
            let mut t = env.tenant(&format!("t{i}"), &format!("st{i}"), 1);
            t.use_put_records = None;
            t
        })
        .collect();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", env.tansu.bootstrap())
        .set("acks", "all")
        .create()
        .expect("producer");
    let now = aws_smithy_types::DateTime::from(std::time::SystemTime::now())
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default();
    let started = Instant::now();
    for round in 0..per_tenant {
        for t in &tenants {
            let user = format!("{}-user-{round}", t.source_id);
            let value = serde_json::json!({"type": "track", "event": "Bench", "userId": user,
                "messageId": format!("{}/{round}", t.source_id), "timestamp": now,
                "properties": {"round": round}})
            .to_string();
            let key = format!("{}:{user}", t.source_id);
            let mut record = BaseRecord::to(TOPIC).payload(&value).key(&key).headers(
                OwnedHeaders::new().insert(Header {
                    key: "source_id",
                    value: Some(t.source_id.as_str()),
                }),
            );
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        record = r;
                        producer.poll(Duration::from_millis(10));
                    }
                }
            }
            producer.poll(Duration::ZERO);
        }
    }
    producer.flush(Duration::from_secs(120)).expect("flush");
    let events = tenants.len() as u32 * per_tenant;
    eprintln!(
        "sent {events} events of {} tenants in {:.2}s",
        tenants.len(),
        started.elapsed().as_secs_f64()
    );
    let (ceiling, ceiling_cpu_us) = bare_consumer_rate(&env.tansu.bootstrap(), events as usize);
    Input {
        env,
        tenants,
        events,
        ceiling,
        ceiling_cpu_us,
    }
}

/// Tenants loaded besides the 20 that send, in the scenario that routes among a million.
const IDLE_TENANTS_LOADED: usize = 999_980;

/// Status topic of the scenarios with per-tenant status on.
const STATUS_TOPIC: &str = "kd-status";
/// Their status interval: several windows close during a run.
const STATUS_INTERVAL_SECS: u64 = 5;

async fn worker_row(scenario: &str, input: &Input, status: bool) -> Row {
    worker_row_loaded(scenario, input, status, 0).await
}

/// [`worker_row`] with `idle` more tenants in the settings, who send nothing (their
/// streams do not exist): what a pod's snapshot of every tenant costs in memory, start
/// time and speed.
async fn worker_row_loaded(scenario: &str, input: &Input, status: bool, idle: usize) -> Row {
    let refs: Vec<&Tenant> = input.tenants.iter().collect();
    let mut cfg = input.env.config(&refs);
    if idle > 0 {
        let mut all: Vec<serde_json::Value> = input.tenants.iter().map(Tenant::settings).collect();
        all.extend((0..idle).map(|i| {
            let region = ["us-east-1", "us-west-2", "eu-west-1"][i % 3];
            serde_json::json!({"sourceId": format!("idle_{i:07}"),
                "roleAddress": format!("arn:aws:iam::{:012}:role/segment-kinesis", 200_000_000_000u64 + i as u64),
                "region": region,
                "stream": format!("idle-{i}"), "shards": 1 + i % 8})
        }));
        cfg.write_tenants_raw(&serde_json::to_string(&all).expect("json"));
    }
    if status {
        input.env.tansu.create_topic(STATUS_TOPIC, 3);
        cfg = cfg
            .set("status", &format!("topic = \"{STATUS_TOPIC}\""))
            .set("status", &format!("interval_secs = {STATUS_INTERVAL_SECS}"));
    }
    cfg.write();
    let started = Instant::now();
    // BENCH_WRAPPER="heaptrack -o FILE" runs the worker under a profiler.
    let wrapper = std::env::var("BENCH_WRAPPER").unwrap_or_default();
    let wrapper: Vec<&str> = wrapper.split_whitespace().collect();
    let mut worker = Worker::start_under(&wrapper, bin(), &cfg, &[]);
    worker.wait_ready(Duration::from_secs(120));
    let loaded = (
        input.tenants.len() + idle,
        started.elapsed().as_secs_f64(),
        worker.rss_bytes() / (1024 * 1024),
    );
    let cpu_before = worker.cpu_seconds();
    if std::env::var_os("BENCH_SAMPLE").is_some() {
        // Every 100 ms: received, delivered, in flight, rate-limit waits, skips.
        let deadline = Instant::now() + Duration::from_secs(900);
        let mut samples = Vec::new();
        while Instant::now() < deadline {
            let m = worker.metrics();
            let v = |name: &str| kd_testkit::metric_value(&m, name);
            let delivered = v("kinesis_destination_events_delivered_total");
            samples.push(format!(
                "{:.0}/{:.0}/{:.0}/{:.1}/{:.0}",
                v("kinesis_destination_events_received_total"),
                delivered,
                v("kinesis_destination_in_flight_events"),
                v("kinesis_destination_rate_limit_wait_seconds_total"),
                v("kinesis_destination_fairness_skips_total"),
            ));
            if delivered >= input.events as f64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "{scenario}: received/delivered/in flight/rate-limit s/skips every 100 ms: {}",
            samples.join(" ")
        );
        for line in worker
            .logs()
            .lines()
            .filter(|l| l.contains("skipping") || l.contains("backpressure") || l.contains("again"))
        {
            eprintln!("{scenario}: worker: {line}");
        }
    }
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        input.events as f64,
        Duration::from_secs(900),
    )
    .await;
    let cpu = worker.cpu_seconds() - cpu_before;
    let m = worker.metrics();
    eprintln!(
        "{scenario}: {} tenants, {} AssumeRole calls, {} ListShards calls",
        input.tenants.len(),
        input.env.fake.requests("AssumeRole"),
        input.env.fake.requests("ListShards"),
    );
    let value = |name: &str| kd_testkit::metric_value(&m, name);
    let calls = value("kinesis_destination_put_duration_seconds_count{outcome=\"ok\"}");
    eprintln!(
        "{scenario}: {} PutRecords calls of {:.1} records on average, {calls} calls taking {:.1} ms on average, {:.1} s waiting for rate limits, {} pauses, {} fairness skips",
        value("kinesis_destination_put_records_batch_records_count"),
        value("kinesis_destination_put_records_batch_records_sum")
            / value("kinesis_destination_put_records_batch_records_count").max(1.0),
        1000.0 * value("kinesis_destination_put_duration_seconds_sum{outcome=\"ok\"}") / calls.max(1.0),
        value("kinesis_destination_rate_limit_wait_seconds_total"),
        worker.logs().matches("\"backpressure\"").count()
            + worker.logs().matches(" backpressure").count(),
        value("kinesis_destination_fairness_skips_total"),
    );
    let records = input.env.fake.records();
    let (pace, p50_ms, p99_ms) = write_figures(&records);
    eprintln!("{scenario}: records written per 100 ms: {:?}", pace.per_bin);
    // Aggregated records hold several events each: the rates count events.
    let per_record = input.events as f64 / records.len().max(1) as f64;
    // How long one user's consecutive records are apart at the sink (per-user order
    // allows one in flight): the lanes' cycle.
    let mut by_lane: std::collections::HashMap<(String, String), Vec<Instant>> = Default::default();
    for r in &records {
        by_lane
            .entry((r.stream.clone(), r.partition_key.clone()))
            .or_default()
            .push(r.at);
    }
    let mut gaps: Vec<f64> = by_lane
        .values_mut()
        .flat_map(|times| {
            times.sort();
            times
                .windows(2)
                .map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0)
                .collect::<Vec<_>>()
        })
        .collect();
    gaps.sort_by(f64::total_cmp);
    // The busiest shard's share against the average one: what Kinesis's per-shard
    // limit lets the stream take at most.
    let mut per_shard: std::collections::HashMap<(&str, &str), usize> = Default::default();
    for r in &records {
        *per_shard.entry((&r.stream, &r.shard_id)).or_default() += 1;
    }
    if let Some(busiest) = per_shard.values().max() {
        eprintln!(
            "{scenario}: {} shards written, busiest {busiest} records ({:.2}× the average)",
            per_shard.len(),
            *busiest as f64 * per_shard.len() as f64 / records.len().max(1) as f64
        );
    }
    if !gaps.is_empty() {
        eprintln!(
            "{scenario}: {} lanes, gap between a user's records p50 {:.1} ms, p90 {:.1} ms",
            by_lane.len(),
            gaps[gaps.len() / 2],
            gaps[gaps.len() * 9 / 10]
        );
    }
    let row = Row {
        scenario: scenario.to_owned(),
        who: "kinesis-destination",
        events: input.events as usize,
        rate: pace.rate * per_record,
        steady: pace.steady * per_record,
        full_speed_after_ms: pace.full_speed_after_ms,
        ceiling: input.ceiling,
        ceiling_cpu_us: input.ceiling_cpu_us,
        cpu_us: cpu * 1e6 / input.events as f64,
        rss_mib: worker.peak_rss_bytes() / (1024 * 1024),
        p50_ms,
        p99_ms,
        loaded: Some(loaded),
    };
    worker.stop();
    if status {
        status_figures(scenario, input);
    }
    row
}

/// What per-tenant status cost in records and bytes (each pod's windows, plus the
/// one closed early at shutdown).
fn status_figures(scenario: &str, input: &Input) {
    let records = input
        .env
        .kafka
        .read_topic(STATUS_TOPIC, usize::MAX, Duration::from_secs(10));
    let bytes: usize = records
        .iter()
        .map(|m| rdkafka::Message::payload(m).map_or(0, <[u8]>::len))
        .sum();
    eprintln!(
        "{scenario}: status on ({STATUS_INTERVAL_SECS} s windows): {} records, {:.1} MiB, {:.0} bytes per record",
        records.len(),
        bytes as f64 / (1024.0 * 1024.0),
        bytes as f64 / records.len().max(1) as f64
    );
}

fn vector_binary() -> Option<PathBuf> {
    let path = std::env::var("KD_BENCH_VECTOR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/vector"));
    path.exists().then_some(path)
}

/// Vector reading the same topic (its own consumer group) into its own stream of the
/// same fake, with credentials the fake issued (its STS client ignores `endpoint`). Its
/// partition key is `messageId`: Vector drops events without the key field, and a
/// fifth of the sample events are anonymous (no `userId`).
async fn vector_row(vector: &Path, scenario: &str, input: &Input, sink: Duration) -> Row {
    let env = &input.env;
    env.fake.create_stream("theirs", 64);
    if !sink.is_zero() {
        env.fake
            .fail_for("theirs", Fault::Latency(sink), Duration::from_secs(3600));
    }
    let (key, secret, token) = env
        .fake
        .issue_credentials("arn:aws:iam::111111111111:role/vector");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        r#"data_dir = "{data}"
[sources.k]
type = "kafka"
bootstrap_servers = "{bootstrap}"
group_id = "vector-bench"
topics = ["{TOPIC}"]
auto_offset_reset = "earliest"
decoding.codec = "json"
[sinks.kin]
type = "aws_kinesis_streams"
inputs = ["k"]
stream_name = "theirs"
region = "us-east-1"
endpoint = "{endpoint}"
encoding.codec = "json"
partition_key_field = "messageId"
auth.access_key_id = "{key}"
auth.secret_access_key = "{secret}"
auth.session_token = "{token}"
"#,
        data = dir.path().display(),
        bootstrap = env.tansu.bootstrap(),
        endpoint = env.fake.endpoint(),
    );
    let config_path = dir.path().join("vector.toml");
    std::fs::write(&config_path, config).expect("vector config");
    let log = std::fs::File::create(dir.path().join("vector.log")).expect("log");
    let mut child: Child = Command::new(vector)
        .arg("--config")
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("vector starts");
    let pid = child.id();
    let want = events() as usize;
    let deadline = Instant::now() + Duration::from_secs(900);
    while env.fake.records_of("theirs").len() < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cpu = kd_testkit::cpu_seconds_of(pid);
    let rss = kd_testkit::peak_rss_of(pid);
    let _ = child.kill();
    let _ = child.wait();
    let records = env.fake.records_of("theirs");
    assert!(
        records.len() >= want,
        "vector wrote {} of {want}: {}",
        records.len(),
        std::fs::read_to_string(dir.path().join("vector.log")).unwrap_or_default()
    );
    let (pace, p50_ms, p99_ms) = write_figures(&records);
    eprintln!("{scenario}: records written per 100 ms: {:?}", pace.per_bin);
    Row {
        scenario: scenario.to_owned(),
        who: "Vector 0.58",
        events: records.len(),
        rate: pace.rate,
        steady: pace.steady,
        full_speed_after_ms: pace.full_speed_after_ms,
        ceiling: input.ceiling,
        ceiling_cpu_us: input.ceiling_cpu_us,
        // Vector's CPU from its start (it starts reading at once).
        cpu_us: cpu * 1e6 / records.len() as f64,
        rss_mib: rss / (1024 * 1024),
        p50_ms,
        p99_ms,
        loaded: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run by scripts/bench.sh"]
async fn throughput_table() {
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || name.contains(only.as_str());
    let mut rows = Vec::new();
    for sink_ms in [0u64, 20] {
        let sink = Duration::from_millis(sink_ms);
        for mode in [Mode::PutRecord, Mode::PutRecords] {
            let name = format!("20 tenants × 100 users, {}, {sink_ms} ms sink", mode.name());
            if !wanted(&name) {
                continue;
            }
            let input = input(20, 100, 64, mode, sink).await;
            let row = worker_row(&name, &input, false).await;
            row.print();
            rows.push(row);
            // The same with a million tenants in the settings: routing among them.
            let loaded = format!("{name}, {IDLE_TENANTS_LOADED} more tenants loaded");
            if mode == Mode::PutRecords && sink.is_zero() && wanted(&loaded) {
                let input = self::input(20, 100, 64, mode, sink).await;
                let row = worker_row_loaded(&loaded, &input, false, IDLE_TENANTS_LOADED).await;
                row.print();
                rows.push(row);
            }
            // The same with per-tenant status on: its cost.
            let name = format!("{name}, status on");
            if mode == Mode::PutRecords && sink.is_zero() && wanted(&name) {
                let input = self::input(20, 100, 64, mode, sink).await;
                let row = worker_row(&name, &input, true).await;
                row.print();
                rows.push(row);
            }
        }
        let name = format!("1 tenant × 2,000 users, PutRecords, {sink_ms} ms sink");
        if !wanted(&name) {
            continue;
        }
        let input = input(1, 2000, SINGLE_TENANT_SHARDS, Mode::PutRecords, sink).await;
        let row = worker_row(&name, &input, false).await;
        row.print();
        rows.push(row);
        if let Some(vector) = vector_binary() {
            let row = vector_row(&vector, &name, &input, sink).await;
            row.print();
            rows.push(row);
        }
    }
    for (aggregate, events) in [(true, 20_000), (false, 1_000)] {
        let name = format!(
            "1 tenant × 1 user, 1 shard, 20 ms sink, {}",
            if aggregate {
                "aggregated"
            } else {
                "not aggregated"
            }
        );
        if !wanted(&name) {
            continue;
        }
        let input = hot_user_input(aggregate, events, Duration::from_millis(20)).await;
        let row = worker_row(&name, &input, false).await;
        row.print();
        rows.push(row);
    }
    let tenants = many_tenants();
    let name = format!(
        "{} tenants × {MANY_TENANTS_EVENTS} events, PutRecords, 0 ms sink",
        tenants
    );
    for status in [false, true] {
        let name = if status {
            format!("{name}, status on")
        } else {
            name.clone()
        };
        if wanted(&name) {
            let input = many_tenants_input(Env::start().await, tenants, MANY_TENANTS_EVENTS);
            let row = worker_row(&name, &input, status).await;
            row.print();
            rows.push(row);
        }
    }
    println!();
    println!(
        "## throughput ({} events per scenario; {} in the many-tenants one; 20,000 and 1,000 for one user)",
        events(),
        tenants as u32 * MANY_TENANTS_EVENTS
    );
    Row::print_header();
    for row in &rows {
        row.print();
    }
    println!();
    println!("## tenants loaded: the worker's start and memory");
    println!("| scenario | tenants in the settings | ready after | resident when ready | peak RSS | events/s | CPU µs/event |");
    println!("|---|---|---|---|---|---|---|");
    for row in &rows {
        if let Some((tenants, ready_s, ready_mib)) = row.loaded {
            println!(
                "| {} | {tenants} | {ready_s:.1} s | {ready_mib} MiB | {} MiB | {:.0} | {:.1} |",
                row.scenario, row.rss_mib, row.rate, row.cpu_us
            );
        }
    }
    let theirs: Vec<&Row> = rows.iter().filter(|r| r.who == "Vector 0.58").collect();
    if !theirs.is_empty() {
        println!();
        println!("## against Vector 0.58 (same input, same run)");
        println!("| scenario | whole run: ours / Vector | ratio | steady: ours / Vector | ratio | full speed after: ours / Vector | CPU µs/event: ours / Vector |");
        println!("|---|---|---|---|---|---|---|");
        for v in theirs {
            let Some(o) = rows
                .iter()
                .find(|r| r.scenario == v.scenario && r.who != v.who)
            else {
                continue;
            };
            println!(
                "| {} | {:.0} / {:.0} | **{:.2}×** | {:.0} / {:.0} | **{:.2}×** | {:.1} s / {:.1} s | {:.1} / {:.1} |",
                v.scenario,
                o.rate,
                v.rate,
                o.rate / v.rate,
                o.steady,
                v.steady,
                o.steady / v.steady,
                o.full_speed_after_ms / 1000.0,
                v.full_speed_after_ms / 1000.0,
                o.cpu_us,
                v.cpu_us
            );
        }
    }
}

/// What `status --source-id` takes to read one tenant's 24 hours: `BENCH_STATUS_TENANTS`
/// tenants (default 200) with a record per minute for 24 hours in a 12-partition status
/// topic, timestamped as the pods would have produced them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run by scripts/bench.sh"]
async fn status_read_of_one_tenant_over_a_day() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    const PARTITIONS: i32 = 12;
    const WINDOWS: u64 = 24 * 60;
    let tenants: usize = env_number("BENCH_STATUS_TENANTS", 200);
    let env = Env::start().await;
    env.tansu.create_topic(STATUS_TOPIC, PARTITIONS as u32);
    let cfg = env
        .config(&[])
        .set("status", &format!("topic = \"{STATUS_TOPIC}\""));
    cfg.write();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", env.tansu.bootstrap())
        .set("linger.ms", "20")
        .create()
        .expect("producer");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let first = (now / 60 - WINDOWS) * 60;
    let started = Instant::now();
    let mut bytes = 0usize;
    let mut in_its_partition = 0usize;
    let target_partition = kd_status::partition::of("src_0", PARTITIONS);
    for w in 0..WINDOWS {
        let start = first + w * 60;
        for t in 0..tenants {
            let source = format!("src_{t}");
            let mut r = kd_status::StatusRecord {
                v: 1,
                source_id: source.clone(),
                pod: format!("pod-{}", t % 3),
                window_start: kd_status::time::rfc3339(start),
                window_secs: 60,
                ..Default::default()
            };
            r.counts.received = 100;
            r.counts.delivered = 100;
            r.counts.latency_ms.counts[2] = 100;
            r.last_delivery = Some(kd_status::time::rfc3339(start + 59));
            let value = serde_json::to_vec(&r).unwrap();
            bytes += value.len();
            let partition = kd_status::partition::of(&source, PARTITIONS);
            if partition == target_partition {
                in_its_partition += 1;
            }
            let mut record = BaseRecord::to(STATUS_TOPIC)
                .key(&source)
                .payload(&value)
                .partition(partition)
                .timestamp(((start + 60) * 1000) as i64);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        record = back;
                        producer.poll(Duration::from_millis(10));
                    }
                }
            }
            producer.poll(Duration::ZERO);
        }
    }
    producer.flush(Duration::from_secs(300)).expect("flush");
    let records = WINDOWS as usize * tenants;
    eprintln!(
        "status bench: {records} records ({:.0} MiB) produced in {:.1}s",
        bytes as f64 / (1024.0 * 1024.0),
        started.elapsed().as_secs_f64()
    );
    let read = Instant::now();
    let out = Command::new(bin())
        .args(["status", "--config"])
        .arg(cfg.path())
        .args(["--source-id", "src_0", "--since", "24h", "--format", "json"])
        .output()
        .unwrap();
    let took = read.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let delivered = summary["total"]["delivered"].as_u64().unwrap();
    // `--since 24h` starts within the first window: it counts from there on.
    assert!(delivered >= 100 * (WINDOWS - 1), "{delivered}");
    println!();
    println!("## status read: one tenant's 24 hours (`status --source-id ID --since 24h`)");
    println!("| tenants | records in the topic | records in its partition | read and merged in |");
    println!("|---|---|---|---|");
    println!(
        "| {tenants} | {records} | {in_its_partition} | {:.2} s |",
        took.as_secs_f64()
    );
}

/// Events of the instruction count: fixed, so the count is comparable from run to run.
const COUNTED_EVENTS: u32 = 20_000;

/// The `summary:` (or `totals:`) line of a callgrind dump: instructions executed.
fn callgrind_instructions(dump: &Path) -> u64 {
    let text = std::fs::read_to_string(dump).expect("callgrind dump");
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("a summary line in the callgrind dump")
}

/// Asks the callgrind running `pid` to zero its counters (`-z`) or dump them (`-d`).
fn callgrind_control(flag: &str, pid: u32) {
    let status = Command::new("callgrind_control")
        .arg(flag)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .status()
        .expect("callgrind_control runs");
    assert!(status.success(), "callgrind_control {flag} {pid}: {status}");
}

/// Instructions in functions whose name holds `name` and what they call (callgrind's
/// inclusive count), from `callgrind_annotate`; 0 if it is not there.
fn inclusive_instructions(dump: &Path, name: &str) -> u64 {
    let Ok(out) = Command::new("callgrind_annotate")
        .args(["--inclusive=yes", "--threshold=100"])
        .arg(dump)
        .output()
    else {
        return 0;
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(name))
        .filter_map(|l| l.split_whitespace().next()?.replace(',', "").parse().ok())
        .max()
        .unwrap_or(0)
}

/// Until the worker has delivered `count` events in all (polled once a second: each
/// poll of /metrics is counted too).
async fn delivered(worker: &Worker, count: u32) {
    let deadline = Instant::now() + Duration::from_secs(900);
    while worker.metric("kinesis_destination_events_delivered_total") < count as f64 {
        assert!(Instant::now() < deadline, "{count} events not delivered");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Instructions the worker executes per event (valgrind's callgrind counts them, so the
/// figure is the same from run to run on a busy machine, unlike seconds): 20 tenants ×
/// 100 users, batched, 0 ms sink; 2,000 events first (credentials, shard maps,
/// connections), then 20,000 produced and counted from just before the first to the
/// last write. Also the instructions of 5 idle seconds (timers, librdkafka's threads),
/// which run for as long as the counted run lasts under valgrind (far longer than
/// without), and SHA-256 done in software: valgrind's CPU has no SHA extensions, which
/// the worker uses where the CPU has them (`sha_ni` in /proc/cpuinfo), signing each
/// request body in a fraction of that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run by scripts/bench.sh"]
async fn instructions_per_event() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("## instructions per event: valgrind is not installed; not measured");
        return;
    }
    let mut rows = Vec::new();
    for mode in [Mode::PutRecords, Mode::PutRecord] {
        if std::env::var("BENCH_ONLY").is_ok_and(|only| !mode.name().contains(&only)) {
            continue;
        }
        rows.push((mode, instructions_of(mode).await));
    }
    println!();
    println!("## instructions per event (callgrind; {COUNTED_EVENTS} events after {WARM_UP}, 20 tenants × 100 users, 0 ms sink)");
    println!("| write mode | instructions | per event | of which SHA-256 in software | of which idle (over the run's time under valgrind) | per event without either |");
    println!("|---|---|---|---|---|---|");
    for (mode, c) in rows {
        let per_event = |n: f64| n.max(0.0) / COUNTED_EVENTS as f64;
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} ({:.0}/s × {:.0} s) | **{:.0}** |",
            mode.name(),
            c.total,
            per_event(c.total as f64),
            per_event(c.sha as f64),
            per_event(c.idle_per_sec * c.secs),
            c.idle_per_sec,
            c.secs,
            per_event(c.total as f64 - c.sha as f64 - c.idle_per_sec * c.secs)
        );
    }
}

/// Events to warm the worker up with before counting.
const WARM_UP: u32 = 2_000;

/// What one counted run gave.
struct Counted {
    total: u64,
    sha: u64,
    idle_per_sec: f64,
    secs: f64,
}

async fn instructions_of(mode: Mode) -> Counted {
    let env = Env::start().await;
    let tenants: Vec<Tenant> = (0..20)
        .map(|i| {
            let mut t = env.tenant(&format!("src_{i}"), &format!("s{i}"), 64);
            t.use_put_records = match mode {
                Mode::PutRecords => None,
                Mode::PutRecord => Some(false),
            };
            t
        })
        .collect();
    let refs: Vec<&Tenant> = tenants.iter().collect();
    let cfg = env.config(&refs);
    cfg.write();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("callgrind.out");
    let out_arg = format!("--callgrind-out-file={}", out.display());
    let mut worker = Worker::start_under(
        &["valgrind", "--tool=callgrind", &out_arg],
        bin(),
        &cfg,
        &[],
    );
    worker.wait_ready(Duration::from_secs(300));
    let pid = worker.pid();
    let sources: Vec<&str> = tenants.iter().map(|t| t.source_id.as_str()).collect();
    env.produce(bin(), &sources.join(","), WARM_UP, 100, &[]);
    delivered(&worker, WARM_UP).await;
    // What the worker does with nothing to do: its timers and librdkafka's threads.
    callgrind_control("-z", pid);
    let idle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    callgrind_control("-d", pid);
    let idle_secs = idle_started.elapsed().as_secs_f64();
    let idle = callgrind_instructions(&dir.path().join("callgrind.out.1"));
    callgrind_control("-z", pid);
    let started = Instant::now();
    env.produce(bin(), &sources.join(","), COUNTED_EVENTS, 100, &[]);
    delivered(&worker, WARM_UP + COUNTED_EVENTS).await;
    callgrind_control("-d", pid);
    let secs = started.elapsed().as_secs_f64();
    let dump = dir.path().join("callgrind.out.2");
    let total = callgrind_instructions(&dump);
    let sha = inclusive_instructions(&dump, "sha2::sha256::compress256");
    if sha == 0 {
        eprintln!("instructions: no sha2::sha256::compress256 in the profile (inlined, or callgrind_annotate missing): SHA-256 is counted with the rest");
    }
    // BENCH_CALLGRIND_OUT=FILE keeps the profile for callgrind_annotate.
    if let Ok(keep) = std::env::var("BENCH_CALLGRIND_OUT") {
        std::fs::copy(&dump, format!("{keep}.{}", mode.name())).expect("copy the callgrind dump");
    }
    worker.sigterm();
    worker.wait_exit(Duration::from_secs(120));
    Counted {
        total,
        sha,
        idle_per_sec: idle as f64 / idle_secs,
        secs,
    }
}
