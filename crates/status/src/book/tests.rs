use super::*;

fn place(offset: i64) -> impl FnOnce() -> Place {
    move || Place {
        message_id: Some(format!("m{offset}")),
        topic: "events".into(),
        partition: 0,
        offset,
    }
}

fn book() -> StatusBook {
    StatusBook::new("pod-a".into(), Duration::from_secs(60))
}

const DENIED: Failure<'static> = Failure {
    code: "AccessDeniedException",
    message: "User is not authorized to perform: kinesis:PutRecords",
    request_id: Some("c0ffee"),
    throttle: false,
};

#[test]
fn a_window_closes_into_one_record_per_tenant_with_traffic() {
    let b = book();
    let (ok, bad): (Arc<str>, Arc<str>) = ("ok".into(), "bad".into());
    for _ in 0..5 {
        b.received(&ok);
        b.delivered(&ok, Some(Duration::from_millis(40)));
    }
    b.received(&bad);
    for attempt in 0..4 {
        b.retried(&bad, &DENIED, place(attempt));
    }
    b.dead_lettered(
        "bad",
        "destination_rejected",
        "AccessDeniedException: denied",
        place(9),
    );
    b.dead_lettered("stranger", "unknown_source", "no such source", place(10));
    assert_eq!(
        b.len(),
        2,
        "a dead letter of a source never seen adds nothing"
    );

    let mut records = b.close(1_800_000_000, 60);
    records.sort_by(|a, b| a.source_id.cmp(&b.source_id));
    assert_eq!(records.len(), 2);
    let (bad_r, ok_r) = (&records[0], &records[1]);
    assert_eq!(ok_r.counts.delivered, 5);
    assert_eq!(ok_r.counts.latency_quantile_ms(0.99), Some(50));
    assert_eq!(ok_r.window_start, "2027-01-15T08:00:00Z");
    assert_eq!(ok_r.pod, "pod-a");
    assert_eq!(State::of(&ok_r.counts), State::Delivering);
    assert_eq!(bad_r.counts.retried["AccessDeniedException"], 4);
    assert_eq!(bad_r.counts.dead_lettered["destination_rejected"], 1);
    assert_eq!(State::of(&bad_r.counts), State::Failing);
    let e = bad_r.last_error.as_ref().unwrap();
    assert_eq!(
        e.code, "AccessDeniedException",
        "a dead letter after retries keeps the AWS error that caused it"
    );
    assert_eq!(e.request_id.as_deref(), Some("c0ffee"));
    assert_eq!(bad_r.samples.len(), SAMPLES_PER_WINDOW);
    assert!(
        bad_r
            .samples
            .iter()
            .any(|s| s.reason == "destination_rejected" && s.offset == 9),
        "the dead letter takes a retried attempt's place: {:?}",
        bad_r.samples
    );
    assert!(bad_r.samples.iter().all(|s| s.message_id.is_some()));

    // Nothing new: no records, both tenants idle, still remembered.
    assert!(b.close(1_800_000_060, 60).is_empty());
    assert_eq!(b.len(), 2);
    assert_eq!(b.view("bad").unwrap().state, State::Idle);
    assert_eq!(
        b.view("bad").unwrap().last_error.unwrap().code,
        "AccessDeniedException",
        "the last error outlives its window"
    );
    let invalid: Arc<str> = "invalid".into();
    b.received(&invalid);
    b.dead_lettered(
        "invalid",
        "invalid_settings",
        "roleAddress: not an ARN",
        place(11),
    );
    assert_eq!(
        b.view("invalid").unwrap().last_error.unwrap().code,
        "invalid_settings"
    );
}

#[test]
fn the_pod_view_shows_the_open_window_and_the_last_error_with_its_request_id() {
    let b = book();
    let t: Arc<str> = "t".into();
    b.received(&t);
    b.retried(&t, &DENIED, place(1));
    let v = b.view("t").unwrap();
    assert_eq!(v.state, State::Failing);
    assert_eq!(v.current.retried["AccessDeniedException"], 1);
    let e = v.last_error.unwrap();
    assert_eq!(e.request_id.as_deref(), Some("c0ffee"));
    assert!(e.message.contains("kinesis:PutRecords"));
    b.delivered(&t, None);
    assert_eq!(b.view("t").unwrap().state, State::Degraded);
    assert!(b.view("nobody").is_none());
}

#[test]
fn throttles_are_counted_and_errors_cannot_break_lines_or_grow() {
    let b = book();
    let t: Arc<str> = "t".into();
    let long = "x\n".repeat(1000);
    let throttled = Failure {
        code: "ProvisionedThroughputExceededException",
        message: &long,
        request_id: None,
        throttle: true,
    };
    b.received(&t);
    b.retried(&t, &throttled, place(1));
    let r = b.close(0, 60).pop().unwrap();
    assert_eq!(r.counts.throttled, 1);
    let e = r.last_error.unwrap();
    assert!(!e.message.contains('\n'));
    assert!(e.message.chars().count() <= 300, "{}", e.message.len());
    assert!(r.samples[0].error.chars().count() <= 300);
}

#[test]
fn signing_material_quoted_by_aws_is_not_kept() {
    let b = book();
    let t: Arc<str> = "t".into();
    b.received(&t);
    let quoted = Failure {
        code: "SignatureDoesNotMatch",
        message: "The request signature we calculated does not match. The Canonical String \
                  for this request should have been 'POST / x-amz-security-token:IQoJb3JpZ2luX2VjEXAMPLE'",
        request_id: None,
        throttle: false,
    };
    b.retried("t", &quoted, place(1));
    let e = b.view("t").unwrap().last_error.unwrap();
    assert!(!e.message.contains("IQoJb3JpZ2lu"), "{}", e.message);
    assert!(
        e.message.ends_with("[request details not kept]"),
        "{}",
        e.message
    );
}

#[test]
fn without_a_status_topic_windows_close_into_states_alone() {
    let b = book();
    let (ok, bad): (Arc<str>, Arc<str>) = ("ok".into(), "bad".into());
    b.received(&ok);
    b.delivered(&ok, Some(Duration::from_millis(40)));
    b.received(&bad);
    b.retried(&bad, &DENIED, place(1));
    b.dead_lettered("bad", "destination_rejected", "denied", place(2));
    b.close_without_records();
    // The pod view shows the closed window's state; the last error is kept.
    assert_eq!(b.view("bad").unwrap().state, State::Failing);
    assert_eq!(b.view("ok").unwrap().state, State::Delivering);
    assert_eq!(
        b.view("bad").unwrap().last_error.unwrap().code,
        "AccessDeniedException"
    );
    // The windows were closed: the next close has nothing to make records of.
    assert!(b.close(1_800_000_000, 60).is_empty());
    assert_eq!(b.len(), 2);
}
