//! A small AWS fake speaking the protocols the SDK speaks: STS `AssumeRole` (query
//! protocol, XML answer) and Kinesis `PutRecord` (JSON 1.1), on one endpoint.
//!
//! For what the emulator cannot do: it answers as fast as the machine allows (moto
//! manages a few hundred writes a second, too slow to show a rate limit) and records
//! when each record arrived.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};

use crate::proxy::AssumeRoleCall;

/// A record as the fake received it.
#[derive(Debug, Clone)]
pub struct FakeRecord {
    pub stream: String,
    pub partition_key: String,
    pub data: Vec<u8>,
    pub at: Instant,
}

#[derive(Default)]
struct Inner {
    records: Vec<FakeRecord>,
    assume_role: Vec<AssumeRoleCall>,
}

pub struct FakeAws {
    pub port: u16,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeAws {
    pub async fn start() -> FakeAws {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake");
        let port = listener.local_addr().expect("fake address").port();
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeAws { port, inner, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn records(&self) -> Vec<FakeRecord> {
        self.inner.lock().unwrap().records.clone()
    }

    pub fn assume_role_calls(&self) -> Vec<AssumeRoleCall> {
        self.inner.lock().unwrap().assume_role.clone()
    }
}

impl Drop for FakeAws {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    match target {
        "Kinesis_20131202.PutRecord" => put_record(&inner, &body),
        "" => sts(&inner, &body),
        other => json_error(
            400,
            "UnknownOperationException",
            &format!("{other} is not faked"),
        ),
    }
}

fn put_record(inner: &Mutex<Inner>, body: &[u8]) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return json_error(400, "SerializationException", "bad JSON");
    };
    let field = |k: &str| req[k].as_str().unwrap_or_default().to_owned();
    let Ok(data) = base64::engine::general_purpose::STANDARD.decode(field("Data")) else {
        return json_error(400, "ValidationException", "Data is not base64");
    };
    let mut inner = inner.lock().unwrap();
    inner.records.push(FakeRecord {
        stream: field("StreamName"),
        partition_key: field("PartitionKey"),
        data,
        at: Instant::now(),
    });
    let seq = inner.records.len();
    (
        [("content-type", "application/x-amz-json-1.1")],
        json!({"ShardId": "shardId-000000000000", "SequenceNumber": format!("{seq:056}")})
            .to_string(),
    )
        .into_response()
}

fn sts(inner: &Mutex<Inner>, body: &[u8]) -> Response {
    let form: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    let get = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if get("Action").as_deref() != Some("AssumeRole") {
        return (StatusCode::BAD_REQUEST, "only AssumeRole is faked").into_response();
    }
    let role = get("RoleArn").unwrap_or_default();
    let mut inner = inner.lock().unwrap();
    inner.assume_role.push(AssumeRoleCall {
        role_arn: role.clone(),
        external_id: get("ExternalId"),
    });
    let n = inner.assume_role.len();
    let expires = aws_smithy_types::DateTime::from(SystemTime::now() + Duration::from_secs(3600))
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default();
    let xml = format!(
        r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <Credentials>
      <AccessKeyId>ASIAFAKE{n:012}</AccessKeyId>
      <SecretAccessKey>fake-secret-{n}</SecretAccessKey>
      <SessionToken>fake-token-{n}</SessionToken>
      <Expiration>{expires}</Expiration>
    </Credentials>
    <AssumedRoleUser>
      <AssumedRoleId>AROAFAKE:{n}</AssumedRoleId>
      <Arn>{role}/session</Arn>
    </AssumedRoleUser>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>fake-{n}</RequestId></ResponseMetadata>
</AssumeRoleResponse>"#
    );
    ([("content-type", "text/xml")], xml).into_response()
}

fn json_error(status: u16, code: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        [("content-type", "application/x-amz-json-1.1")],
        json!({"__type": code, "message": message}).to_string(),
    )
        .into_response()
}
