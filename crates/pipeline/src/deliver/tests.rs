//! The retry loop against a scripted writer, in tokio's paused time: the windows are
//! hours long in production and seconds here, and no test waits for them.

use std::collections::HashMap;
use std::sync::Mutex;

use rdkafka::message::{OwnedMessage, Timestamp};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::*;

/// Answers every write with what `answer` says for the stream written to, and
/// remembers which stream each attempt went to.
/// What a scripted write answers, given the stream it went to.
type Answer = Box<dyn Fn(&str) -> Result<(), AwsError> + Send + Sync>;

struct Scripted {
    answer: Answer,
    streams: Mutex<Vec<String>>,
    /// How long the first write takes (a wait for stream capacity, say).
    first_takes: Duration,
}

impl RecordWriter for Arc<Scripted> {
    async fn put(
        &self,
        tenant: &Arc<TenantSettings>,
        _key: &PartitionKey,
        _data: &Bytes,
    ) -> Result<(), AwsError> {
        let stream = tenant.stream.as_str().to_owned();
        let first = {
            let mut streams = self.streams.lock().unwrap();
            streams.push(stream.clone());
            streams.len() == 1
        };
        if first {
            tokio::time::sleep(self.first_takes).await;
        }
        (self.answer)(&stream)
    }
}

fn error(class: ErrorClass, code: &str) -> AwsError {
    AwsError {
        request_id: None,
        class,
        code: code.into(),
        message: "scripted".into(),
    }
}

fn throttled(_: &str) -> Result<(), AwsError> {
    Err(error(
        ErrorClass::Retryable,
        "ProvisionedThroughputExceededException",
    ))
}

fn tenant(stream: &str) -> Arc<TenantSettings> {
    Arc::new(kd_tenants::test_settings(json!({"sourceId": "src_a",
        "roleAddress": "arn:aws:iam::111111111111:role/kinesis", "stream": stream})))
}

fn store(tenants: &[Arc<TenantSettings>]) -> Arc<TenantStore> {
    let store = Arc::new(TenantStore::new());
    set(&store, tenants);
    store
}

fn set(store: &TenantStore, tenants: &[Arc<TenantSettings>]) {
    let map: HashMap<Arc<str>, TenantEntry> = tenants
        .iter()
        .map(|t| (t.source_id.shared(), TenantEntry::Valid(t.clone())))
        .collect();
    store.replace(kd_tenants::Snapshot::new(map));
}

const WINDOW: Duration = Duration::from_secs(3600);
const PERMANENT: Duration = Duration::from_secs(180);

fn retrying(
    answer: fn(&str) -> Result<(), AwsError>,
    tenants: Arc<TenantStore>,
) -> (Retrying<Arc<Scripted>>, Arc<Scripted>) {
    let writer = Arc::new(Scripted {
        answer: Box::new(answer),
        streams: Mutex::default(),
        first_takes: Duration::ZERO,
    });
    let retry = RetryPolicy {
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(30),
        retry_window: WINDOW,
        min_retry: Duration::from_secs(300),
        permanent_window: PERMANENT,
    };
    (
        Retrying {
            writer: writer.clone(),
            retry,
            tenants,
            failures: crate::log_limit::LogLimit::per_minute(),
        },
        writer,
    )
}

/// An event produced `age` ago (by the wall clock), read from partition 0.
fn job(tracker: &OffsetTracker, tenant: Arc<TenantSettings>, age: Duration) -> Job {
    let produced = SystemTime::now() - age;
    let millis = produced
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let msg = OwnedMessage::new(
        Some(br#"{"type":"track","userId":"u1"}"#.to_vec()),
        Some(b"u1".to_vec()),
        "events".into(),
        Timestamp::CreateTime(millis),
        0,
        7,
        None,
    );
    Job {
        msg: Record::from_message(&msg, "events".into()),
        ticket: tracker.read("events", 0, 7).unwrap(),
        tenant,
        key: PartitionKey::new("u1").unwrap(),
    }
}

fn tracker() -> OffsetTracker {
    let t = OffsetTracker::new(CancellationToken::new());
    t.assign([("events", 0)]);
    t
}

/// Writes `job` and says how long (in paused time) it took.
async fn timed(r: &Retrying<Arc<Scripted>>, job: &Job) -> (Outcome, Duration) {
    let start = Instant::now();
    let outcome = r.write(job).await;
    (outcome, start.elapsed())
}

fn reason(outcome: &Outcome) -> Option<Reason> {
    match outcome {
        Outcome::DeadLetter(dl) => Some(dl.reason),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn retryable_failures_are_retried_until_the_window_after_production_runs_out() {
    let t = tenant("s");
    let (r, writer) = retrying(throttled, store(std::slice::from_ref(&t)));
    let (outcome, took) = timed(&r, &job(&tracker(), t, Duration::ZERO)).await;
    assert_eq!(
        reason(&outcome),
        Some(Reason::RetriesExhausted),
        "{outcome:?}"
    );
    // The event's age is taken from the wall clock, which moves a little (real time)
    // while tokio's stands still: a second of slack.
    assert!(
        took >= WINDOW - Duration::from_secs(1),
        "gave up after {took:?}"
    );
    assert!(
        took <= WINDOW + Duration::from_secs(30),
        "one backoff late at most: {took:?}"
    );
    let attempts = writer.streams.lock().unwrap().len();
    assert!(attempts > 100, "retried all along: {attempts} attempts");
}

#[tokio::test(start_paused = true)]
async fn an_event_taken_over_late_in_its_window_gets_only_what_is_left() {
    let t = tenant("s");
    let (r, _) = retrying(throttled, store(std::slice::from_ref(&t)));
    let (outcome, took) = timed(&r, &job(&tracker(), t, Duration::from_secs(3000))).await;
    assert_eq!(reason(&outcome), Some(Reason::RetriesExhausted));
    assert!(
        took >= Duration::from_secs(599) && took <= Duration::from_secs(630),
        "the 600 s left of its window, not a new one: {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_backlog_older_than_the_window_is_still_retried_for_the_least_time() {
    let t = tenant("s");
    let (r, _) = retrying(throttled, store(std::slice::from_ref(&t)));
    let (outcome, took) = timed(&r, &job(&tracker(), t, Duration::from_secs(5 * 3600))).await;
    assert_eq!(reason(&outcome), Some(Reason::RetriesExhausted));
    let Outcome::DeadLetter(dl) = &outcome else {
        unreachable!()
    };
    assert!(
        dl.error.contains("1800") && dl.error.contains("s after the event was produced"),
        "{}",
        dl.error
    );
    assert!(
        took >= Duration::from_secs(300) && took <= Duration::from_secs(330),
        "min_retry, not an immediate dead letter: {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn permanent_failures_are_confirmed_for_their_own_window_then_rejected() {
    let t = tenant("s");
    let (r, _) = retrying(
        |_| Err(error(ErrorClass::Permanent, "AccessDeniedException")),
        store(std::slice::from_ref(&t)),
    );
    let (outcome, took) = timed(&r, &job(&tracker(), t, Duration::ZERO)).await;
    assert_eq!(reason(&outcome), Some(Reason::DestinationRejected));
    assert!(
        took >= PERMANENT && took <= PERMANENT + Duration::from_secs(30),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_write_that_succeeds_after_failures_is_written() {
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let t = tenant("s");
    let (r, writer) = retrying(
        |s| {
            if CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 5 {
                throttled(s)
            } else {
                Ok(())
            }
        },
        store(std::slice::from_ref(&t)),
    );
    let outcome = r.write(&job(&tracker(), t, Duration::ZERO)).await;
    assert!(matches!(outcome, Outcome::Written), "{outcome:?}");
    assert_eq!(writer.streams.lock().unwrap().len(), 6);
}

#[tokio::test(start_paused = true)]
async fn a_fixed_stream_in_the_settings_is_used_from_the_next_attempt() {
    let broken = tenant("missing");
    let tenants = store(std::slice::from_ref(&broken));
    let (r, writer) = retrying(
        |stream| match stream {
            "missing" => Err(error(ErrorClass::Permanent, "ResourceNotFoundException")),
            _ => Ok(()),
        },
        tenants.clone(),
    );
    let fix = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        set(&tenants, &[tenant("fixed")]);
    });
    let outcome = r.write(&job(&tracker(), broken, Duration::ZERO)).await;
    fix.await.unwrap();
    assert!(matches!(outcome, Outcome::Written), "{outcome:?}");
    let streams = writer.streams.lock().unwrap().clone();
    assert_eq!(streams.last().map(String::as_str), Some("fixed"));
    assert!(streams[..streams.len() - 1].iter().all(|s| s == "missing"));
}

#[tokio::test(start_paused = true)]
async fn a_tenant_removed_while_its_event_waits_is_an_unknown_source() {
    let t = tenant("s");
    let tenants = store(std::slice::from_ref(&t));
    let (r, _) = retrying(throttled, tenants.clone());
    let remove = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        set(&tenants, &[]);
    });
    let outcome = r.write(&job(&tracker(), t, Duration::ZERO)).await;
    remove.await.unwrap();
    assert_eq!(reason(&outcome), Some(Reason::UnknownSource));
}

#[tokio::test(start_paused = true)]
async fn a_revoked_partition_cancels_the_retries_without_an_outcome_to_acknowledge() {
    let t = tenant("s");
    let (r, _) = retrying(throttled, store(std::slice::from_ref(&t)));
    let tracker = tracker();
    let job = job(&tracker, t, Duration::ZERO);
    let cancel = job.ticket.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        cancel.cancel();
    });
    let start = Instant::now();
    let outcome = r.write(&job).await;
    assert!(matches!(outcome, Outcome::Cancelled), "{outcome:?}");
    assert!(start.elapsed() < Duration::from_secs(6));
}

#[tokio::test(start_paused = true)]
async fn the_least_time_counts_from_the_first_failure_not_from_a_long_first_wait() {
    let t = tenant("s");
    let (mut r, _) = retrying(throttled, store(std::slice::from_ref(&t)));
    // The first write of a backlog event waits 10 minutes (for stream capacity, say)
    // before it is throttled: it still gets its 5 minutes of retries after that.
    Arc::get_mut(&mut r.writer).unwrap().first_takes = Duration::from_secs(600);
    let (outcome, took) = timed(&r, &job(&tracker(), t, Duration::from_secs(5 * 3600))).await;
    assert_eq!(reason(&outcome), Some(Reason::RetriesExhausted));
    assert!(
        took >= Duration::from_secs(900) && took <= Duration::from_secs(930),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_event_without_a_timestamp_says_so_when_it_gives_up() {
    let t = tenant("s");
    let (r, _) = retrying(throttled, store(std::slice::from_ref(&t)));
    let tracker = tracker();
    let mut job = job(&tracker, t, Duration::ZERO);
    let msg = OwnedMessage::new(
        job.msg.payload().map(<[u8]>::to_vec),
        None,
        "events".into(),
        Timestamp::NotAvailable,
        0,
        7,
        None,
    );
    job.msg = Record::from_message(&msg, "events".into());
    let outcome = r.write(&job).await;
    let Outcome::DeadLetter(dl) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(dl.error.contains("no usable timestamp"), "{}", dl.error);
}

fn aggregating(max_kib: u32) -> Arc<TenantSettings> {
    Arc::new(
        kd_tenants::parse_tenant(&json!({
            "sourceId": "src_a",
            "roleAddress": "arn:aws:iam::111111111111:role/kinesis",
            "region": "us-east-1",
            "stream": "s",
            "aggregate": true,
            "maxRecordSizeKiB": max_kib,
        }))
        .unwrap(),
    )
}

/// A job of `tenant` at `offset` of partition `partition`, with `bytes` of payload.
fn sized_job(
    tracker: &OffsetTracker,
    tenant: &Arc<TenantSettings>,
    partition: i32,
    offset: i64,
    bytes: usize,
) -> Job {
    let msg = OwnedMessage::new(
        Some(vec![b'x'; bytes]),
        Some(b"u1".to_vec()),
        "events".into(),
        Timestamp::NotAvailable,
        partition,
        offset,
        None,
    );
    Job {
        msg: Record::from_message(&msg, "events".into()),
        ticket: tracker.read("events", partition, offset).unwrap(),
        tenant: tenant.clone(),
        key: PartitionKey::new("u1").unwrap(),
    }
}

#[test]
fn events_join_an_aggregate_only_of_the_same_settings_partition_and_size() {
    let tracker = OffsetTracker::new(CancellationToken::new());
    tracker.assign([("events", 0), ("events", 1)]);
    let known = |t: &TenantSettings| t.default_max_record_bytes();
    let t = aggregating(1024);
    let group = vec![sized_job(&tracker, &t, 0, 1, 100)];
    assert!(joins_aggregate(
        &group,
        &sized_job(&tracker, &t, 0, 2, 100),
        10,
        known
    ));
    assert!(
        !joins_aggregate(&group, &sized_job(&tracker, &t, 0, 2, 100), 1, known),
        "the group is full"
    );
    assert!(
        !joins_aggregate(&group, &sized_job(&tracker, &t, 1, 2, 100), 10, known),
        "another partition"
    );
    let reloaded = aggregating(1024);
    assert!(
        !joins_aggregate(
            &group,
            &sized_job(&tracker, &reloaded, 0, 2, 100),
            10,
            known
        ),
        "settings reloaded since the group's first event"
    );
    let plain = tenant("s");
    let group_plain = vec![sized_job(&tracker, &plain, 0, 3, 100)];
    assert!(!joins_aggregate(
        &group_plain,
        &sized_job(&tracker, &plain, 0, 4, 100),
        10,
        known
    ));
    // Size: within the stream's record size, and never over 1 MiB.
    let small = aggregating(1);
    let g = vec![sized_job(&tracker, &small, 0, 5, 400)];
    assert!(joins_aggregate(
        &g,
        &sized_job(&tracker, &small, 0, 6, 400),
        10,
        known
    ));
    assert!(!joins_aggregate(
        &g,
        &sized_job(&tracker, &small, 0, 6, 700),
        10,
        known
    ));
    // A stream not described yet is taken to accept 1 MiB; one described as raised to
    // 10 MiB takes a larger aggregate.
    let big = tenant("s2");
    let big = Arc::new(TenantSettings {
        aggregate: true,
        ..(*big).clone()
    });
    let g = vec![sized_job(&tracker, &big, 0, 7, 600 * 1024)];
    let next = sized_job(&tracker, &big, 0, 8, 600 * 1024);
    assert!(
        !joins_aggregate(&g, &next, 10, known),
        "1.2 MiB: over what every stream accepts"
    );
    assert!(joins_aggregate(&g, &next, 10, |_| 10 * 1024 * 1024));
}
