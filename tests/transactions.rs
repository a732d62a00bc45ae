//! Transactional producers (Kafka Streams, Kafka Connect with exactly-once, Debezium):
//! records of aborted transactions are never delivered, committed ones are, in order,
//! and the transaction markers never hold a partition's commits back.
//!
//! On Tansu, with the project's patch (`tools/tansu`): Tansu 0.6.0's storage writes the
//! commit and abort markers and keeps the last stable offset (a `read_committed` fetch
//! stops at the first open transaction), but its broker did not route `EndTxn` and its
//! fetch listed no aborted transactions; the patch routes one and lists the other, as
//! Kafka does. The markers and the aborted transactions' records are then in the
//! partitions as Kafka writes them, and librdkafka passes over them as it does on Kafka.
//! Not here: a transaction still open when the worker reads. Tansu's last stable offset
//! did not hold a read_committed fetch back at an open transaction's first record (its
//! records were delivered before the commit), and the commit of a second producer's
//! transaction timed out; the first is the broker's part of read_committed, not the
//! worker's, and neither is patched.

mod common;
use common::bin;
use std::collections::HashMap;
use std::time::Duration;

use kd_testkit::env::{first_deliveries, FakeEnv, TOPIC};
use kd_testkit::Worker;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// A transactional producer of test events (with librdkafka's defaults otherwise).
struct TxnProducer(BaseProducer);

impl TxnProducer {
    fn new(bootstrap: &str, id: &str) -> TxnProducer {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("transactional.id", id)
            .create()
            .expect("transactional producer");
        producer
            .init_transactions(Duration::from_secs(30))
            .expect("init transactions");
        TxnProducer(producer)
    }

    fn begin(&self) {
        self.0.begin_transaction().expect("begin a transaction");
    }

    /// Queues one event of `source` for `user`, with this message ID and `seq`.
    fn send(&self, source: &str, user: &str, id: &str, seq: usize) {
        let value = serde_json::json!({"type": "track", "event": "Tested", "userId": user,
            "messageId": id, "properties": {"seq": seq}})
        .to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: "source_id",
            value: Some(source),
        });
        self.0
            .send(
                BaseRecord::to(TOPIC)
                    .key(user)
                    .payload(&value)
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .expect("queue a record");
    }

    /// Waits for the transaction's records to be written (a `BaseProducer` serves its
    /// delivery reports only when polled, which abort requires first).
    fn flush(&self) {
        self.0
            .flush(Duration::from_secs(30))
            .expect("records written");
    }

    fn commit(&self) {
        self.flush();
        self.0
            .commit_transaction(Duration::from_secs(30))
            .expect("commit the transaction");
    }

    fn abort(&self) {
        self.flush();
        self.0
            .abort_transaction(Duration::from_secs(30))
            .expect("abort the transaction");
    }
}

/// Twenty users; transactions committed and aborted in turn, the last one committed (so
/// the last record of every partition is a commit marker). Every committed event is
/// delivered, in order per user; no aborted one is; the commits reach the end of every
/// partition, past the last marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_are_never_delivered_and_commits_pass_every_marker() {
    let env = FakeEnv::start().await;
    let t = env.tenant("src_x", "transactions", 2);
    let cfg = env.config(&[&t]);
    cfg.write();
    let mut worker = Worker::start_ready(bin(), &cfg);
    let bootstrap = env.tansu.bootstrap();

    let (committed, aborted) = tokio::task::spawn_blocking(move || {
        let producer = TxnProducer::new(&bootstrap, "kd-test-transactions");
        let (mut committed, mut aborted) = (Vec::new(), Vec::new());
        let mut seq = 0;
        for txn in 0..8 {
            let commit = txn % 3 != 1 || txn == 7;
            producer.begin();
            for u in 0..20 {
                let user = format!("x{u}");
                let id = if commit {
                    format!("src_x/{user}/{seq}")
                } else {
                    format!("src_x/{user}/aborted-{txn}")
                };
                producer.send("src_x", &user, &id, seq);
                if commit {
                    committed.push(id);
                } else {
                    aborted.push(id);
                }
            }
            if commit {
                producer.commit();
                seq += 1;
            } else {
                producer.abort();
            }
        }
        (committed, aborted)
    })
    .await
    .unwrap();
    assert_eq!(aborted.len(), 40);

    env.wait_committed_to_end(&cfg.group_id).await;
    let records = env.fake.records_of("transactions");
    let delivered = first_deliveries(&records);
    let ids: Vec<&str> = delivered
        .iter()
        .filter_map(|v| v["messageId"].as_str())
        .collect();
    let leaked: Vec<&&str> = ids.iter().filter(|id| id.contains("aborted")).collect();
    assert!(leaked.is_empty(), "aborted records delivered: {leaked:?}");
    for id in &committed {
        assert!(ids.contains(&id.as_str()), "{id} never arrived");
    }
    assert_eq!(ids.len(), committed.len());
    let mut last: HashMap<String, i64> = HashMap::new();
    for v in &delivered {
        let user = v["userId"].as_str().unwrap().to_owned();
        let seq = v["properties"]["seq"].as_i64().unwrap();
        let prev = last.insert(user.clone(), seq);
        assert!(prev.is_none_or(|p| p < seq), "{user}: {prev:?} then {seq}");
    }
    let end = env.kafka.end_offsets(TOPIC, 3);
    let markers_and_aborted = end.iter().sum::<i64>() as usize - committed.len();
    eprintln!(
        "transactions: committed to the ends {end:?}, past {markers_and_aborted} markers and aborted records"
    );
    // A marker for each partition a transaction wrote to: 8 to 24 of them.
    let markers = markers_and_aborted - aborted.len();
    assert!((8..=24).contains(&markers), "{markers} markers");

    kd_testkit::assert_nothing_dead_lettered(&worker.metrics());
    worker.stop();
}
