use super::*;
use base64::Engine;

#[test]
fn bodies_carry_the_stream_key_and_data_byte_for_byte() {
    let data: Vec<u8> = (0..=255u8).chain([0, 1, 2]).collect();
    let key = "user \"q\" \\ é\u{1}";
    let one: serde_json::Value = serde_json::from_slice(&put_record_body(
        StreamId::Name("st\"x"),
        Entry { key, data: &data },
    ))
    .unwrap();
    assert_eq!(one["StreamName"], "st\"x");
    assert_eq!(one["PartitionKey"], key);
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(one["Data"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, data);
    assert_eq!(one.as_object().unwrap().len(), 3);

    let sizes = [0usize, 1, 2, 3, 4, 1000];
    let datas: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![b'a'; n]).collect();
    let keys: Vec<String> = (0..sizes.len()).map(|i| format!("k{i}")).collect();
    let entries: Vec<Entry> = datas
        .iter()
        .zip(&keys)
        .map(|(d, k)| Entry { key: k, data: d })
        .collect();
    let many: serde_json::Value =
        serde_json::from_slice(&put_records_body(StreamId::Name("st"), &entries)).unwrap();
    let records = many["Records"].as_array().unwrap();
    assert_eq!(records.len(), sizes.len());
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["PartitionKey"], keys[i].as_str());
        let d = base64::engine::general_purpose::STANDARD
            .decode(r["Data"].as_str().unwrap())
            .unwrap();
        assert_eq!(d, datas[i], "record {i}");
    }
    let empty: serde_json::Value =
        serde_json::from_slice(&put_records_body(StreamId::Name("st"), &[])).unwrap();
    assert_eq!(empty["Records"], serde_json::json!([]));
    // A stream given by ARN is named by it alone.
    let arn =
        kd_tenants::StreamArn::parse("arn:aws:kinesis:eu-west-1:222222222222:stream/st").unwrap();
    let by_arn: serde_json::Value =
        serde_json::from_slice(&put_records_body(StreamId::Arn(&arn), &entries)).unwrap();
    assert_eq!(by_arn["StreamARN"], arn.as_str());
    assert!(by_arn.get("StreamName").is_none());
}

#[test]
fn error_codes_are_read_from_the_header_or_the_body_without_namespace_or_url() {
    let mut headers = http::HeaderMap::new();
    let body = br#"{"__type":"com.amazonaws.kinesis.v20131202#ResourceNotFoundException","message":"Stream st not found"}"#;
    assert_eq!(
        error_of(&headers, body),
        (
            Some("ResourceNotFoundException".into()),
            Some("Stream st not found".into())
        )
    );
    headers.insert(
        "x-amzn-ErrorType",
        "ProvisionedThroughputExceededException:http://internal.amazon.com/coral/com.amazon.coral.service/"
            .parse()
            .unwrap(),
    );
    let body = br#"{"Message":"Rate exceeded"}"#;
    assert_eq!(
        error_of(&headers, body),
        (
            Some("ProvisionedThroughputExceededException".into()),
            Some("Rate exceeded".into())
        )
    );
    // A proxy's page: no code, no message; the caller falls back on the status.
    assert_eq!(
        error_of(&http::HeaderMap::new(), b"<html>502</html>"),
        (None, None)
    );
}

/// The host the API would send `operation` to, resolved by the SDK's endpoint rules.
async fn host_of(
    fips: bool,
    dual_stack: bool,
    region: &str,
    arn: Option<&str>,
    data: bool,
) -> String {
    let base = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .use_fips(fips)
        .use_dual_stack(dual_stack)
        .build();
    let api = KinesisApi::new(&base, Default::default(), None).unwrap();
    let region = Region::parse(region).unwrap();
    let arn = arn.map(|a| kd_tenants::StreamArn::parse(a).unwrap());
    let stream = match &arn {
        Some(a) => StreamId::Arn(a),
        None => StreamId::Name("s"),
    };
    let op = if data {
        Operation::PutRecords
    } else {
        Operation::ListShards
    };
    let (uri, host) = api.endpoint(&region, stream, op).await.unwrap();
    assert_eq!(uri.authority().unwrap().as_str(), &*host);
    host.to_string()
}

#[tokio::test]
async fn endpoints_come_from_the_sdks_rules_for_every_partition() {
    for (fips, dual, region, host) in [
        (false, false, "eu-west-1", "kinesis.eu-west-1.amazonaws.com"),
        // GovCloud's Kinesis endpoint is FIPS already: the SDK's rules give no
        // kinesis-fips host there (the hand-written table did).
        (
            true,
            false,
            "us-gov-west-1",
            "kinesis.us-gov-west-1.amazonaws.com",
        ),
        (
            true,
            false,
            "us-east-1",
            "kinesis-fips.us-east-1.amazonaws.com",
        ),
        (
            false,
            false,
            "cn-north-1",
            "kinesis.cn-north-1.amazonaws.com.cn",
        ),
        (false, true, "us-east-1", "kinesis.us-east-1.api.aws"),
        (
            false,
            false,
            "us-iso-east-1",
            "kinesis.us-iso-east-1.c2s.ic.gov",
        ),
        (
            false,
            false,
            "us-isob-east-1",
            "kinesis.us-isob-east-1.sc2s.sgov.gov",
        ),
        (
            false,
            false,
            "eu-isoe-west-1",
            "kinesis.eu-isoe-west-1.cloud.adc-e.uk",
        ),
        (
            false,
            false,
            "us-isof-south-1",
            "kinesis.us-isof-south-1.csp.hci.ic.gov",
        ),
        (
            false,
            false,
            "eusc-de-east-1",
            "kinesis.eusc-de-east-1.amazonaws.eu",
        ),
    ] {
        assert_eq!(
            host_of(fips, dual, region, None, true).await,
            host,
            "{region}"
        );
    }
    // With a stream ARN, the account's own hosts, data and control apart (as the SDK).
    let arn = "arn:aws:kinesis:us-east-1:222222222222:stream/s";
    assert_eq!(
        host_of(false, false, "us-east-1", Some(arn), true).await,
        "222222222222.data-kinesis.us-east-1.amazonaws.com"
    );
    assert_eq!(
        host_of(false, false, "us-east-1", Some(arn), false).await,
        "222222222222.control-kinesis.us-east-1.amazonaws.com"
    );
}

#[test]
fn only_open_shards_have_a_range_for_writes() {
    let page: ListShardsOutput = serde_json::from_value(serde_json::json!({
        "Shards": [
            {"ShardId": "shardId-000000000000",
             "HashKeyRange": {"StartingHashKey": "0", "EndingHashKey": u128::MAX.to_string()},
             "SequenceNumberRange": {"StartingSequenceNumber": "1"}},
            {"ShardId": "shardId-000000000001",
             "HashKeyRange": {"StartingHashKey": "0", "EndingHashKey": "5"},
             "SequenceNumberRange": {"StartingSequenceNumber": "1", "EndingSequenceNumber": "9"}},
            {"ShardId": "shardId-000000000002",
             "HashKeyRange": {"StartingHashKey": "x", "EndingHashKey": "5"}}
        ],
        "NextToken": "page-2"
    }))
    .unwrap();
    let open: Vec<_> = page.shards.iter().filter_map(ShardOutput::open).collect();
    // The second was closed by a reshard; the third's range is not a number.
    assert_eq!(
        open,
        [OpenShard {
            start: 0,
            end: u128::MAX,
            number: 0
        }]
    );
    assert_eq!(page.next_token.as_deref(), Some("page-2"));
}

/// The API pointed at a fresh fake, and credentials the fake issued.
async fn against_fake() -> (kd_testkit::FakeAws, KinesisApi, Credentials) {
    let fake = kd_testkit::FakeAws::start().await;
    let base = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .endpoint_url(fake.endpoint())
        .build();
    let api = KinesisApi::new(&base, Default::default(), None).unwrap();
    let (key, secret, token) = fake.issue_credentials("arn:aws:iam::111111111111:role/r");
    let credentials = Credentials::new(key, secret, Some(token), None, "test");
    (fake, api, credentials)
}

#[tokio::test]
async fn shards_are_listed_over_every_page() {
    let (fake, api, credentials) = against_fake().await;
    // The fake answers 100 shards a page.
    fake.create_stream("wide", 250);
    let region = Region::parse("us-east-1").unwrap();
    let mut ranges = api
        .open_shards(&credentials, &region, StreamId::Name("wide"), &|| {
            "ListShards wide".into()
        })
        .await
        .unwrap();
    ranges.sort();
    assert_eq!(ranges.len(), 250);
    assert_eq!(ranges[0].start, 0);
    assert_eq!(ranges[249].end, u128::MAX);
    assert!(
        ranges.windows(2).all(|w| w[1].start == w[0].end + 1),
        "the ranges cover the whole hash-key space without gaps"
    );
    assert_eq!(fake.requests("ListShards"), 3);
}

#[tokio::test]
async fn a_listing_that_never_ends_is_cut_off_after_its_page_bound() {
    let (fake, api, credentials) = against_fake().await;
    // One page more than the bound, at 100 shards a page.
    fake.create_stream("endless", (MAX_LIST_SHARDS_PAGES * 100 + 1) as u32);
    let region = Region::parse("us-east-1").unwrap();
    let err = api
        .open_shards(&credentials, &region, StreamId::Name("endless"), &|| {
            "ListShards endless".into()
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("more than 100 pages"), "{err}");
    assert_eq!(fake.requests("ListShards"), MAX_LIST_SHARDS_PAGES as u64);
}

#[tokio::test]
async fn writes_land_as_sent_and_refusals_carry_the_services_code() {
    let (fake, api, credentials) = against_fake().await;
    fake.create_stream("st", 4);
    let region = Region::parse("us-east-1").unwrap();
    let ctx = || "PutRecord to stream st".to_owned();
    let data = br#"{"type":"track","n":"\u00e9"}"#;
    let written = api
        .put_record(
            &credentials,
            &region,
            StreamId::Name("st"),
            Entry {
                key: "user-1",
                data,
            },
            &ctx,
        )
        .await
        .unwrap();
    assert!(written.shard_id.starts_with("shardId-"), "{written:?}");
    let entries = [
        Entry {
            key: "a",
            data: b"first",
        },
        Entry {
            key: "b",
            data: b"",
        },
        Entry {
            key: "c",
            data: &[0, 255, 10],
        },
    ];
    let results = api
        .put_records(&credentials, &region, StreamId::Name("st"), &entries, &ctx)
        .await
        .unwrap();
    assert_eq!(results.len(), 3);
    assert!(
        results.iter().all(|r| r.error_code.is_none()),
        "{results:?}"
    );
    let records = fake.records_of("st");
    let got: Vec<(&str, &[u8])> = records
        .iter()
        .map(|r| (r.partition_key.as_str(), r.data.as_slice()))
        .collect();
    assert_eq!(
        got,
        [
            ("user-1", &data[..]),
            ("a", b"first"),
            ("b", b""),
            ("c", &[0, 255, 10]),
        ]
    );

    let missing = api
        .put_record(
            &credentials,
            &region,
            StreamId::Name("nope"),
            entries[0],
            &ctx,
        )
        .await
        .unwrap_err();
    assert_eq!(missing.code, "ResourceNotFoundException", "{missing}");
    assert_eq!(missing.class, crate::ErrorClass::Permanent);
    assert!(
        missing.message.starts_with("PutRecord to stream st: "),
        "{missing}"
    );

    // A wrong secret signs wrongly: the fake checks signatures as AWS does.
    let forged = Credentials::new(
        credentials.access_key_id(),
        "not-the-secret",
        credentials.session_token().map(str::to_owned),
        None,
        "test",
    );
    let refused = api
        .put_record(&forged, &region, StreamId::Name("st"), entries[0], &ctx)
        .await
        .unwrap_err();
    assert_eq!(refused.code, "InvalidSignatureException", "{refused}");
    assert_eq!(fake.records_of("st").len(), 4);
}

/// One PutRecord of a small record to stream `st`, at `127.0.0.1:port`.
async fn put_one_at(port: u16) -> Result<Written, AwsError> {
    let base = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .build();
    let api = KinesisApi::new(&base, Default::default(), None).unwrap();
    let credentials = Credentials::new("a", "b", None, None, "test");
    api.put_record(
        &credentials,
        &Region::parse("us-east-1").unwrap(),
        StreamId::Name("st"),
        Entry {
            key: "k",
            data: b"x",
        },
        &|| "PutRecord to stream st".into(),
    )
    .await
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_retryable_network_error() {
    let port = kd_testkit::free_port();
    let err = put_one_at(port).await.unwrap_err();
    assert_eq!(err.code, "NetworkError", "{err}");
    assert_eq!(err.class, crate::ErrorClass::Retryable);
}

#[test]
fn an_unreadable_success_answer_is_a_retryable_response_error() {
    let err = parse_answer::<PutRecordOutput>(b"<html>proxy</html>", Operation::PutRecord, &|| {
        "PutRecord to stream st".into()
    })
    .err()
    .unwrap();
    assert_eq!(err.code, "ResponseError");
    assert_eq!(err.class, crate::ErrorClass::Retryable);
    assert!(
        err.message
            .starts_with("PutRecord to stream st: unreadable PutRecord answer"),
        "{err}"
    );
}

#[tokio::test]
async fn a_clock_more_than_five_minutes_off_is_corrected_by_the_answers_date() {
    let (fake, api, credentials) = against_fake().await;
    fake.create_stream("st", 1);
    let region = Region::parse("us-east-1").unwrap();
    let entry = Entry {
        key: "k",
        data: b"x",
    };
    let ctx = || "PutRecord to stream st".to_owned();
    // Each step moves AWS's clock away from what was learned last; the last one repeats.
    for (offset, refusals) in [(900i64, 1), (-900, 1), (0, 1), (0, 0)] {
        fake.set_clock_offset(offset);
        let refused = fake.skew_refusals();
        api.put_record(&credentials, &region, StreamId::Name("st"), entry, &ctx)
            .await
            .unwrap_or_else(|e| panic!("offset {offset}: {e}"));
        let learned = api.clock().offset_secs();
        assert!((learned - offset as f64).abs() < 3.0, "{offset}: {learned}");
        // Refused once and signed again at once, or not refused where the clock was right.
        assert_eq!(fake.skew_refusals() - refused, refusals, "offset {offset}");
    }
    // Without a Date there is nothing to correct by: a retryable error, not a
    // rejection, and readiness says why until a call goes through.
    let readiness = Arc::new(kd_telemetry::Readiness::default());
    readiness.set_tenants_loaded();
    readiness.set_joined_group();
    api.clock().set_readiness(readiness.clone());
    fake.omit_date(true);
    fake.set_clock_offset(1800);
    let err = api
        .put_record(&credentials, &region, StreamId::Name("st"), entry, &ctx)
        .await
        .unwrap_err();
    assert_eq!(err.code, "InvalidSignatureException", "{err}");
    assert_eq!(err.class, crate::ErrorClass::Retryable, "{err}");
    assert!(err.message.contains("Signature expired"), "{err}");
    assert!(!readiness.is_ready());
    fake.omit_date(false);
    api.put_record(&credentials, &region, StreamId::Name("st"), entry, &ctx)
        .await
        .unwrap();
    assert!(readiness.is_ready());
    assert_eq!(fake.records_of("st").len(), 5);
}

#[tokio::test]
async fn requests_name_the_product_and_answers_are_read_within_a_bound() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An endpoint that records the request head and answers 200 with an endless body.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let head = Arc::new(std::sync::Mutex::new(String::new()));
    let seen = head.clone();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let n = conn.read(&mut buf).await.unwrap();
        *seen.lock().unwrap() = String::from_utf8_lossy(&buf[..n]).into_owned();
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-amz-json-1.1\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
        while conn.write_all(chunk.as_bytes()).await.is_ok() {}
    });
    let err = put_one_at(port).await.unwrap_err();
    assert_eq!(err.code, "ResponseError", "{err}");
    assert!(err.message.contains("longer than"), "{err}");
    assert_eq!(err.class, crate::ErrorClass::Retryable);
    let head = head.lock().unwrap().to_ascii_lowercase();
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        head.contains(&format!(
            "\r\nuser-agent: kinesis-destination/{version}\r\n"
        )),
        "{head}"
    );
}
