//! A test world for the worker against the AWS fake: a Tansu broker with the input and
//! dead-letter topics, the fake, a Kafka client, and the assertions every delivery test
//! makes (all delivered, per-user order among first deliveries, commits never past an
//! unwritten event).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::json;

use crate::{
    eventually, FakeAws, FakeRecord, Kafka, Moto, Produced, RecordingProxy, Streams, Tansu,
    TcpProxy, Tenant, Worker, WorkerConfig,
};

pub const TOPIC: &str = "segment-events";
pub const DLQ: &str = "segment-events-dlq";
pub const PARTITIONS: i32 = 3;

pub struct FakeEnv {
    pub tansu: Tansu,
    pub fake: FakeAws,
    pub kafka: Kafka,
    pub proxy: Option<TcpProxy>,
}

/// One sent event: where it went in Kafka, its ID, its user and its place in the
/// user's sequence.
#[derive(Debug, Clone)]
pub struct Sent {
    pub at: Produced,
    pub id: String,
}

impl FakeEnv {
    pub async fn start() -> FakeEnv {
        FakeEnv::with(Tansu::start(), None).await
    }

    /// A world whose broker is reached only through a [`TcpProxy`] (it advertises the
    /// proxy's address), so a test can cut or black-hole the path to it: workers take
    /// [`proxy_bootstrap`](Self::proxy_bootstrap).
    pub async fn behind_proxy() -> FakeEnv {
        let broker_port = crate::free_port();
        let proxy = TcpProxy::start(0, broker_port).await;
        let tansu = Tansu::start_on(broker_port, Some(proxy.port));
        FakeEnv::with(tansu, Some(proxy)).await
    }

    /// The proxy's address, as `bootstrap.servers`.
    pub fn proxy_bootstrap(&self) -> String {
        let proxy = self.proxy.as_ref().expect("a world behind a proxy");
        format!("127.0.0.1:{}", proxy.port)
    }

    pub async fn with(tansu: Tansu, proxy: Option<TcpProxy>) -> FakeEnv {
        let kafka = with_topics(&tansu);
        FakeEnv {
            tansu,
            fake: FakeAws::start().await,
            kafka,
            proxy,
        }
    }

    /// A tenant whose stream (with `shards` shards) exists in the fake.
    pub fn tenant(&self, source: &str, stream: &str, shards: u32) -> Tenant {
        let mut t = Tenant::new(source, "111111111111", "us-east-1", stream);
        t.shards = shards;
        self.fake.create_stream(stream, shards);
        t
    }

    pub fn config(&self, tenants: &[&Tenant]) -> WorkerConfig {
        let cfg = WorkerConfig::new(&self.tansu.bootstrap(), &self.fake.endpoint());
        cfg.write_tenants(&tenants.iter().map(|t| t.settings()).collect::<Vec<_>>());
        cfg
    }

    /// Sends `count` sample events of `sources` (comma-separated, round-robin) over
    /// `users` users each into the input topic, with the `produce` command of `bin`
    /// (batched as librdkafka does by default; `extra` adds flags such as
    /// `--compression lz4`).
    pub fn produce(
        &self,
        bin: &std::path::Path,
        sources: &str,
        count: u32,
        users: u32,
        extra: &[&str],
    ) {
        crate::produce(
            bin,
            &self.tansu.bootstrap(),
            TOPIC,
            sources,
            count,
            users,
            extra,
        );
    }

    /// Sends event number `seq` of `user` for `source`.
    pub async fn send(&self, source: &str, user: &str, seq: usize) -> Sent {
        let id = format!("{source}/{user}/{seq}");
        let value = json!({"type": "track", "event": "Tested", "userId": user,
            "messageId": id, "properties": {"seq": seq}})
        .to_string();
        let at = self
            .kafka
            .send(
                TOPIC,
                Some(user),
                value.as_bytes(),
                &[("source_id", source)],
            )
            .await;
        Sent { at, id }
    }

    /// Sends events given as (source, user, seq), in order, many in flight at once (so
    /// the producer batches them).
    pub async fn send_all(&self, events: &[(String, String, usize)]) -> Vec<Sent> {
        self.send_all_via(&self.kafka, events).await
    }

    /// [`send_all`](Self::send_all) through another client (one that compresses).
    pub async fn send_all_via(
        &self,
        kafka: &Kafka,
        events: &[(String, String, usize)],
    ) -> Vec<Sent> {
        send_events(kafka, events).await
    }

    /// Sends `per_user` events for each of `users` users of `source`, users interleaved,
    /// batched.
    pub async fn send_many(&self, source: &str, users: usize, per_user: usize) -> Vec<Sent> {
        let events: Vec<(String, String, usize)> = (0..per_user)
            .flat_map(|seq| {
                (0..users).map(move |u| (source.to_owned(), format!("{source}-u{u}"), seq))
            })
            .collect();
        self.send_all(&events).await
    }

    pub async fn wait_committed_to_end(&self, group: &str) {
        self.kafka
            .wait_committed_to_end(group, TOPIC, PARTITIONS)
            .await;
    }
}

/// Creates the input and dead-letter topics on `tansu`; a client of it.
fn with_topics(tansu: &Tansu) -> Kafka {
    tansu.create_topic(TOPIC, PARTITIONS as u32);
    tansu.create_topic(DLQ, 1);
    Kafka::new(&tansu.bootstrap())
}

/// A test world against the AWS emulator instead of the fake: a Tansu broker with the
/// topics, moto behind a proxy that records AssumeRole calls, tenants' streams read
/// back as the tenants would.
pub struct MotoEnv {
    pub tansu: Tansu,
    _moto: Moto,
    pub proxy: RecordingProxy,
    pub streams: Streams,
    pub kafka: Kafka,
}

impl MotoEnv {
    pub async fn start() -> MotoEnv {
        let tansu = Tansu::start();
        let kafka = with_topics(&tansu);
        let moto = Moto::start();
        let proxy = RecordingProxy::start(&moto.endpoint()).await;
        let streams = Streams::new(&moto.endpoint());
        MotoEnv {
            tansu,
            _moto: moto,
            proxy,
            streams,
            kafka,
        }
    }

    /// A worker configuration for this world (AWS through the recording proxy).
    pub fn config(&self) -> WorkerConfig {
        WorkerConfig::new(&self.tansu.bootstrap(), &self.proxy.endpoint())
    }

    /// Sends `value` keyed by `key`, with a `source_id` header when `source` is given.
    pub async fn send(&self, value: &[u8], source: Option<&str>, key: &str) -> Produced {
        let headers: Vec<(&str, &str)> = source.map(|s| vec![("source_id", s)]).unwrap_or_default();
        self.kafka.send(TOPIC, Some(key), value, &headers).await
    }

    pub async fn wait_committed_to_end(&self, group: &str) {
        self.kafka
            .wait_committed_to_end(group, TOPIC, PARTITIONS)
            .await;
    }
}

pub async fn wait_metric(worker: &Worker, name: &str, at_least: f64, timeout: Duration) {
    eventually(timeout, name, || {
        let v = worker.metric(name);
        async move { (v >= at_least).then_some(()) }
    })
    .await;
}

/// The first delivery of each event, in arrival order.
pub fn first_deliveries(records: &[FakeRecord]) -> Vec<serde_json::Value> {
    let mut seen = HashSet::new();
    records
        .iter()
        .map(FakeRecord::json)
        .filter(|v| seen.insert(v["messageId"].as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// Every sent event is in `records`, and each user's first deliveries are in order.
pub fn assert_all_delivered_in_order(sent: &[Sent], records: &[FakeRecord]) {
    let firsts = first_deliveries(records);
    let ids: HashSet<&str> = firsts
        .iter()
        .filter_map(|v| v["messageId"].as_str())
        .collect();
    let missing: Vec<&str> = sent
        .iter()
        .map(|s| s.id.as_str())
        .filter(|id| !ids.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events never arrived, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let mut last: HashMap<String, i64> = HashMap::new();
    for v in &firsts {
        let user = v["userId"].as_str().unwrap_or_default().to_owned();
        let seq = v["properties"]["seq"].as_i64().unwrap_or(-1);
        let prev = last.insert(user.clone(), seq).unwrap_or(-1);
        assert!(
            seq > prev,
            "user {user}: event {seq} first arrived after event {prev}"
        );
    }
}

/// Every event whose offset is below its partition's committed offset has been written:
/// commits never pass an event that was not. Returns how many events that covers.
pub fn assert_commits_cover_only_written(
    env: &FakeEnv,
    group: &str,
    sent: &[Sent],
    records: &[FakeRecord],
) -> usize {
    let committed = env.kafka.committed(group, TOPIC, PARTITIONS);
    let written: HashSet<String> = records
        .iter()
        .filter_map(|r| r.json()["messageId"].as_str().map(str::to_owned))
        .collect();
    let mut covered = 0;
    for s in sent {
        if s.at.offset < committed[s.at.partition as usize] {
            covered += 1;
            assert!(
                written.contains(&s.id),
                "offset {:?} committed but {} not written",
                s.at,
                s.id
            );
        }
    }
    covered
}

/// Sends test events given as (source, user, seq) to the input topic through `kafka`,
/// in order, many in flight at once (so the producer batches them).
pub async fn send_events(kafka: &Kafka, events: &[(String, String, usize)]) -> Vec<Sent> {
    let records: Vec<_> = events
        .iter()
        .map(|(source, user, seq)| {
            let id = format!("{source}/{user}/{seq}");
            let value = json!({"type": "track", "event": "Tested", "userId": user,
                "messageId": id, "properties": {"seq": seq}})
            .to_string()
            .into_bytes();
            (
                user.clone(),
                value,
                vec![("source_id".to_owned(), source.clone())],
            )
        })
        .collect();
    let at = kafka.send_many(TOPIC, &records).await;
    at.into_iter()
        .zip(events)
        .map(|(at, (source, user, seq))| Sent {
            at,
            id: format!("{source}/{user}/{seq}"),
        })
        .collect()
}
