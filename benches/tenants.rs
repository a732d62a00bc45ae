//! Many tenants: loads 100,000 and then 1,000,000 tenants from a file and 100,000
//! through the topic provider, and prints load time, resident memory, route lookups
//! and events routed per second at each size, and memory per cached credential. Figures, not pass/fail: run with `scripts/bench.sh` (or
//! `cargo bench --bench tenants`; the topic part needs `tansu` on the PATH).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kd_aws::{AwsSettings, CredentialCache, CredentialSettings};
use kd_tenants::{Snapshot, TenantEntry, TenantStore};
use kd_testkit::{FakeAws, Tansu};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

/// Heap bytes are counted (what the snapshot holds, unlike resident memory, which keeps
/// what the allocator has not given back: the parsed file's).
#[global_allocator]
static ALLOCATOR: kd_testkit::CountingAllocator = kd_testkit::CountingAllocator;

fn live() -> i64 {
    kd_testkit::live_bytes() as i64
}

/// Tenants of the topic provider and the credential figures.
const TENANTS: usize = 100_000;
/// Tenants loaded from a file, one size after the other.
const FILE_TENANTS: [usize; 2] = [100_000, 1_000_000];

fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn tenant(i: usize) -> serde_json::Value {
    let region = ["us-east-1", "us-west-2", "eu-west-1"][i % 3];
    let mut t = json!({"sourceId": format!("src_{i:06}"),
        "roleAddress": format!("arn:aws:iam::{:012}:role/segment-kinesis", 100_000_000_000u64 + i as u64),
        "region": region,
        "stream": format!("events-{i}"), "shards": 1 + i % 8});
    if i.is_multiple_of(10) {
        t["secretId"] = json!(format!("secret-{i}"));
    }
    t
}

fn file_provider(tenants: usize) -> Snapshot {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tenants.json");
    let all: Vec<_> = (0..tenants).map(tenant).collect();
    std::fs::write(&path, serde_json::to_vec(&all).expect("json")).expect("write");
    drop(all);
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let live_before = live();
    let started = Instant::now();
    let (snapshot, bytes) = kd_tenants::load_file(&path).expect("load");
    let took = started.elapsed();
    drop(bytes);
    let (after, held) = (rss(), live() - live_before);
    println!(
        "file provider:  {tenants} tenants ({:.1} MiB of JSON) loaded in {:.2} s; the snapshot holds {:.1} MiB ({} bytes per tenant); {:.0} MiB resident after (this process's, the generated file's memory included)",
        mib(size),
        took.as_secs_f64(),
        mib(held.max(0) as u64),
        held.max(0) / tenants as i64,
        mib(after)
    );
    snapshot
}

async fn topic_provider() {
    let tansu = Tansu::start();
    tansu.create_topic("tenant-settings", 4);
    // Batched as librdkafka does by default, many in flight at once.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", tansu.bootstrap())
        .create()
        .expect("producer");
    let started = Instant::now();
    let mut pending = Vec::new();
    for i in 0..TENANTS {
        let t = tenant(i);
        let key = t["sourceId"].as_str().unwrap_or_default().to_owned();
        let value = t.to_string();
        let record = FutureRecord::to("tenant-settings")
            .key(&key)
            .payload(&value);
        pending.push(
            producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .expect("queued"),
        );
        if pending.len() >= 5000 {
            for d in pending.drain(..) {
                d.await.expect("delivered").expect("acknowledged");
            }
        }
    }
    for d in pending.drain(..) {
        d.await.expect("delivered").expect("acknowledged");
    }
    eprintln!(
        "(produced {TENANTS} settings records in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let store = Arc::new(TenantStore::new());
    let before = rss();
    let started = Instant::now();
    let follower = tokio::spawn(kd_tenants::follow_topic(
        kd_tenants::TopicSettings {
            bootstrap_servers: tansu.bootstrap(),
            topic: "tenant-settings".into(),
            librdkafka: Default::default(),
            flush_interval: Duration::from_millis(100),
            auth: Default::default(),
        },
        store.clone(),
    ));
    while !store.is_loaded() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    let after = rss();
    println!(
        "topic provider: {} tenants read from a 4-partition topic in {:.2} s; resident memory +{:.1} MiB (snapshot and Kafka client)",
        store.snapshot().len(),
        took.as_secs_f64(),
        mib(after.saturating_sub(before))
    );
    follower.abort();
}

fn route_lookups(snapshot: &Snapshot, tenants: usize) {
    let ids: Vec<String> = (0..tenants)
        .map(|i| format!("src_{:06}", (i * 7919) % tenants))
        .collect();
    let n = 5_000_000;
    let started = Instant::now();
    let mut found = 0usize;
    for i in 0..n {
        if let Some(TenantEntry::Valid(_)) = snapshot.get(&ids[i % tenants]) {
            found += 1;
        }
    }
    let took = started.elapsed();
    assert_eq!(found, n);
    println!(
        "route lookups:  {:.1} million snapshot lookups per second among {tenants} tenants (one core)",
        n as f64 / took.as_secs_f64() / 1e6
    );
    // The whole routing step of one event: decode, look up, partition key, size check;
    // the events name tenants spread over the whole snapshot.
    let msgs: Vec<kd_pipeline::record::Record> = (0..1000)
        .map(|i| {
            let value = json!({"type": "track", "event": "Order Completed", "userId": format!("user-{i}"),
                "messageId": format!("m-{i}"), "properties": {"revenue": 42.5, "currency": "EUR", "items": [1, 2, 3]},
                "context": {"ip": "127.0.0.1", "library": {"name": "analytics.js", "version": "2.11.1"}}})
            .to_string();
            let headers = OwnedHeaders::new().insert(Header { key: "source_id", value: Some(ids[i].as_str()) });
            let msg = OwnedMessage::new(Some(value.into_bytes()), None, "t".into(), Timestamp::NotAvailable, 0, i as i64, Some(headers));
            kd_pipeline::record::Record::from_message(&msg, "t".into())
        })
        .collect();
    let n = 1_000_000;
    let from = kd_pipeline::route::SourceIdFrom {
        header: "source_id".into(),
        header_only: false,
    };
    let started = Instant::now();
    for i in 0..n {
        let r = kd_pipeline::route::route(&msgs[i % msgs.len()], snapshot, &from);
        assert!(r.is_ok());
    }
    let took = started.elapsed();
    println!(
        "routing:        {:.0} thousand events per second decoded and routed among {tenants} tenants (one core, ~300-byte events)",
        n as f64 / took.as_secs_f64() / 1e3
    );
}

async fn credential_memory() {
    let fake = FakeAws::start().await;
    let base = kd_aws::base_config(&AwsSettings {
        endpoint_url: Some(fake.endpoint()),
        api_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(3),
        use_fips: false,
        use_dual_stack: false,
    })
    .await;
    let cache = CredentialCache::new(base, CredentialSettings::default());
    let n = 10_000;
    let tenants: Vec<_> = (0..n)
        .map(|i| kd_tenants::parse_tenant(&tenant(i)).expect("valid"))
        .collect();
    let before = rss();
    let mut sessions = Vec::with_capacity(n);
    for t in &tenants {
        sessions.push(cache.session(t).await.expect("assumed"));
    }
    drop(sessions);
    let with_sessions = rss();
    println!(
        "credentials:    {} bytes per cached session, the fake's own record of the credentials it issued included ({n} tenants)",
        with_sessions.saturating_sub(before) / n as u64,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    std::env::set_var("AWS_ACCESS_KEY_ID", "bench");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "bench");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    for tenants in FILE_TENANTS {
        let snapshot = file_provider(tenants);
        route_lookups(&snapshot, tenants);
        drop(snapshot);
    }
    credential_memory().await;
    topic_provider().await;
}
