//! The fake's one endpoint: a request is told STS or Kinesis by its target, its caller
//! by the access key of its signature (checked against what was issued), and its
//! answer stamped with the fake's `Date`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;

use serde_json::Value;

use super::kinesis::{describe, json_error, list_shards, put};
use super::sts::{self, sts};
use super::{sigv4, Inner};

pub(super) async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let access_key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.split("Credential=").nth(1))
        .and_then(|c| c.split('/').next())
        .unwrap_or_default()
        .to_owned();
    let operation = target.rsplit('.').next().unwrap_or("").to_owned();
    let region = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.split("Credential=").nth(1))
        .and_then(|c| c.split('/').nth(2))
        .unwrap_or_default()
        .to_owned();
    if inner.lock().unwrap().black_holed.contains(&region) {
        while inner.lock().unwrap().black_holed.contains(&region) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        return json_error(503, "ServiceUnavailable", "black hole over");
    }
    if target.is_empty() {
        inner
            .lock()
            .unwrap()
            .requests
            .entry("AssumeRole".into())
            .and_modify(|n| *n += 1)
            .or_insert(1);
        let latency = {
            let mut i = inner.lock().unwrap();
            i.sts_in_flight += 1;
            i.sts_max_in_flight = i.sts_max_in_flight.max(i.sts_in_flight);
            i.sts_latency
        };
        tokio::time::sleep(latency).await;
        let now = {
            let mut i = inner.lock().unwrap();
            i.sts_in_flight -= 1;
            i.now()
        };
        // Signatures are not checked (the worker's own identity is whatever the test's
        // environment holds), their time is, as STS does.
        if let Err(sigv4::Refusal::Skewed(why)) = sigv4::within_five_minutes(&headers, now) {
            *inner
                .lock()
                .unwrap()
                .requests
                .entry("skew-refused".into())
                .or_insert(0) += 1;
            return sts::sts_error(403, "SignatureDoesNotMatch", &why);
        }
        return sts(&inner, &body);
    }
    inner
        .lock()
        .unwrap()
        .requests
        .entry(operation.clone())
        .and_modify(|n| *n += 1)
        .or_insert(1);
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return json_error(400, "SerializationException", "body is not JSON");
    };
    if let Some(refused) = authenticate(&inner, &access_key, |secret, token, now| {
        sigv4::verify(&method, &uri, &headers, &body, secret, token, now)
    }) {
        return refused;
    }
    if req.get("StreamARN").is_some() {
        *inner
            .lock()
            .unwrap()
            .requests
            .entry("by-arn".into())
            .or_insert(0) += 1;
    }
    match operation.as_str() {
        "PutRecord" | "PutRecords" => put(&inner, &operation, &req, &access_key).await,
        "ListShards" => list_shards(&inner, &req, &access_key),
        "DescribeStreamSummary" => describe(&inner, &req, &access_key),
        other => json_error(
            400,
            "UnknownOperationException",
            &format!("{other} is not faked"),
        ),
    }
}

/// The refusal for credentials the fake did not issue or that have expired, or a
/// request whose signature `verify` (given the key's secret and token) refuses.
fn authenticate(
    inner: &Mutex<Inner>,
    access_key: &str,
    verify: impl FnOnce(&str, &str, SystemTime) -> Result<(), sigv4::Refusal>,
) -> Option<Response> {
    let mut inner = inner.lock().unwrap();
    let now = inner.now();
    let refusal = match inner.issued.get(access_key) {
        None => Some(json_error(
            400,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )),
        Some(c) if c.expires <= now => Some(json_error(
            400,
            "ExpiredTokenException",
            "The security token included in the request is expired",
        )),
        Some(c) => match verify(&c.secret, &c.token, now) {
            Ok(()) => None,
            Err(sigv4::Refusal::Skewed(why)) => {
                *inner.requests.entry("skew-refused".into()).or_insert(0) += 1;
                Some(json_error(400, "InvalidSignatureException", &why))
            }
            Err(sigv4::Refusal::Invalid(why)) => {
                Some(json_error(400, "InvalidSignatureException", &why))
            }
        },
    };
    refusal
}

/// Puts the fake's time in every answer's `Date` (AWS's answers carry it, and the SDKs
/// correct their clocks by it), unless told to leave it out.
pub(super) async fn stamp_date(
    State(inner): State<Arc<Mutex<Inner>>>,
    mut response: Response,
) -> Response {
    let (omit, now) = {
        let inner = inner.lock().unwrap();
        (inner.omit_date, inner.now())
    };
    if !omit {
        let date = aws_smithy_types::DateTime::from(now)
            .fmt(aws_smithy_types::date_time::Format::HttpDate)
            .unwrap_or_default();
        if let Ok(v) = date.parse() {
            response.headers_mut().insert(axum::http::header::DATE, v);
        }
    }
    response
}
