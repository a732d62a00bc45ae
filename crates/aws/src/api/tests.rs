use super::*;

#[test]
fn bodies_carry_the_stream_key_and_data_byte_for_byte() {
    let data: Vec<u8> = (0..=255u8).chain([0, 1, 2]).collect();
    let key = "user \"q\" \\ é\u{1}";
    let one: serde_json::Value =
        serde_json::from_slice(&put_record_body("st\"x", Entry { key, data: &data })).unwrap();
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
        serde_json::from_slice(&put_records_body("st", &entries)).unwrap();
    let records = many["Records"].as_array().unwrap();
    assert_eq!(records.len(), sizes.len());
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["PartitionKey"], keys[i].as_str());
        let d = base64::engine::general_purpose::STANDARD
            .decode(r["Data"].as_str().unwrap())
            .unwrap();
        assert_eq!(d, datas[i], "record {i}");
    }
    let empty: serde_json::Value = serde_json::from_slice(&put_records_body("st", &[])).unwrap();
    assert_eq!(empty["Records"], serde_json::json!([]));
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

#[test]
fn regional_hosts_follow_the_partition() {
    assert_eq!(
        regional_host("eu-west-1", false, false),
        "kinesis.eu-west-1.amazonaws.com"
    );
    assert_eq!(
        regional_host("us-gov-west-1", true, false),
        "kinesis-fips.us-gov-west-1.amazonaws.com"
    );
    assert_eq!(
        regional_host("cn-north-1", false, false),
        "kinesis.cn-north-1.amazonaws.com.cn"
    );
    assert_eq!(
        regional_host("us-east-1", false, true),
        "kinesis.us-east-1.api.aws"
    );
}
