use super::batched::record_outcomes;
use super::*;
use crate::api::RecordResult;
use kd_tenants::WriteMode;

fn tenant(use_put_records: serde_json::Value) -> TenantSettings {
    kd_tenants::test_settings(serde_json::json!({"stream": "st",
        "maxRecordSizeKiB": 4096, "usePutRecords": use_put_records}))
}

fn writer() -> KinesisWriter {
    let base = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build();
    KinesisWriter::new(
        CredentialCache::new(base, crate::CredentialSettings::default()),
        RateLimits::default(),
        RequestBudget::new(8, 1.0, 1.0),
        Duration::from_millis(10),
    )
    .unwrap()
}

/// Every event in flight holds a `put_record` future in its task, and every batch a
/// `send_batch` future and a writer: at 20,000 events in flight a kilobyte each is
/// 20 MB. The large parts (the HTTP call, a credential lookup, an invalidation) are
/// boxed only while they run.
#[tokio::test]
async fn what_each_event_and_batch_in_flight_holds_stays_small() {
    let w = writer();
    assert_eq!(
        std::mem::size_of::<KinesisWriter>(),
        std::mem::size_of::<usize>()
    );
    let t = Arc::new(tenant(serde_json::Value::Null));
    let key = PartitionKey::new("u").unwrap();
    let data = Bytes::from(vec![1u8; 10]);
    let put = w.put_record(&t, &key, &data);
    assert!(
        std::mem::size_of_val(&put) <= 768,
        "put_record's future: {} bytes",
        std::mem::size_of_val(&put)
    );
    let batch = w.clone().send_batch(Vec::new());
    assert!(
        std::mem::size_of_val(&batch) <= 512,
        "send_batch's future: {} bytes",
        std::mem::size_of_val(&batch)
    );
}

#[test]
fn records_up_to_10_mib_of_batching_tenants_are_batched() {
    let w = writer();
    let (auto, on, off) = (
        tenant(serde_json::Value::Null),
        tenant(true.into()),
        tenant(false.into()),
    );
    assert_eq!(auto.write_mode, WriteMode::Auto, "auto by default");
    assert_eq!(tenant("auto".into()).write_mode, WriteMode::Auto);
    assert!(w.batches(&auto, 1024 * 1024));
    assert!(w.batches(&on, 1024 * 1024));
    // A PutRecords request takes records up to 10 MiB (a stream raised to it).
    assert!(w.batches(&on, 10 * 1024 * 1024));
    assert!(!w.batches(&on, 10 * 1024 * 1024 + 1));
    assert!(!w.batches(&off, 10));
}

#[tokio::test(start_paused = true)]
async fn a_role_that_refused_put_records_is_written_record_by_record_for_an_hour() {
    let w = writer();
    let (auto, on) = (tenant(serde_json::Value::Null), tenant(true.into()));
    w.remember_put_records_refused(&auto);
    assert!(!w.batches(&auto, 10));
    assert!(
        w.batches(&on, 10),
        "true forces PutRecords whatever was refused"
    );
    tokio::time::advance(PUT_RECORDS_RETRY_AFTER - Duration::from_secs(1)).await;
    assert!(!w.batches(&auto, 10));
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(
        w.batches(&auto, 10),
        "PutRecords is tried again after an hour"
    );
}

/// 600 records of a new tenant, written at once into a stream of 20 shards: the
/// first answer proves the tenant, and the records still waiting for its trial
/// budget (one shard's, 950 a second) go on at the stream's pace instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_tenants_waiting_writes_leave_the_trial_once_one_is_accepted() {
    let fake = kd_testkit::FakeAws::start().await;
    fake.create_stream("wide", 20);
    let cache = crate::credentials::cache_tests::cache(&fake, Default::default());
    let w = KinesisWriter::new(
        cache,
        RateLimits::default(),
        RequestBudget::new(64, 1.0, 1.0),
        Duration::from_millis(5),
    )
    .unwrap();
    let t = Arc::new(kd_tenants::test_settings(
        serde_json::json!({"sourceId": "s_new", "stream": "wide", "shards": 20}),
    ));
    let started = Instant::now();
    let writes: Vec<_> = (0..600)
        .map(|i| {
            let (w, t) = (w.clone(), t.clone());
            tokio::spawn(async move {
                let key = PartitionKey::new(&format!("user-{i}")).unwrap();
                w.put_record(&t, &key, &Bytes::from_static(b"{}")).await
            })
        })
        .collect();
    for write in writes {
        write.await.unwrap().unwrap();
    }
    let took = started.elapsed();
    assert_eq!(fake.records_of("wide").len(), 600);
    // All 600 on trial would take 600 / 950 s, less the burst: over half a second.
    assert!(
        took < Duration::from_millis(400),
        "{took:?}: the writes stayed on trial"
    );
    assert!(w.inner.proofs.holds(&t));
}

fn written() -> RecordResult {
    RecordResult {
        shard: None,
        error_code: None,
        error_message: None,
    }
}

fn refused(code: &str) -> RecordResult {
    RecordResult {
        shard: None,
        error_code: Some(code.into()),
        error_message: Some("Rate exceeded for shard".into()),
    }
}

#[test]
fn each_record_of_a_put_records_answer_gets_its_own_outcome_in_order() {
    let results = [
        written(),
        refused("ProvisionedThroughputExceededException"),
        written(),
        refused("KMSAccessDeniedException"),
    ];
    let out = record_outcomes(&results, 4, &|| "PutRecords to stream st".into());
    assert!(out[0].is_ok());
    let throttled = out[1].as_ref().unwrap_err();
    assert_eq!(throttled.code, "ProvisionedThroughputExceededException");
    assert_eq!(throttled.class, ErrorClass::Retryable);
    assert!(out[2].is_ok());
    let kms = out[3].as_ref().unwrap_err();
    assert_eq!(kms.class, ErrorClass::Permanent, "{kms}");
    assert!(kms.message.starts_with("PutRecords to stream st"), "{kms}");
}

#[test]
fn records_missing_from_the_answer_are_retried_not_taken_as_written() {
    let out = record_outcomes(&[written()], 3, &|| "ctx".into());
    assert!(out[0].is_ok());
    for missing in &out[1..] {
        let e = missing.as_ref().unwrap_err();
        assert_eq!(e.code, "InternalFailure");
        assert_eq!(e.class, ErrorClass::Retryable);
    }
}

/// Every event waiting for its write holds this future in its lane's task: with
/// 20,000 in flight, each KiB is 20 MiB. The SDK's STS call inside (~13 KiB) is
/// boxed and only allocated while a role is being assumed.
#[test]
fn a_write_waiting_in_its_lane_holds_a_small_future() {
    let w = writer();
    let t = Arc::new(tenant(serde_json::Value::Null));
    let key = PartitionKey::new("k").unwrap();
    let data = Bytes::from_static(b"x");
    let write = w.put_record(&t, &key, &data);
    let size = std::mem::size_of_val(&write);
    assert!(size <= 4096, "{size} bytes");
    let session = w.inner.credentials.session(&t);
    assert!(std::mem::size_of_val(&session) <= 1024);
}
