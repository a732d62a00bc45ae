//! A faithful AWS fake for the faults the emulator cannot produce.
//!
//! It speaks the protocols the SDK speaks, on one endpoint: STS `AssumeRole` (query
//! protocol, XML answers) and Kinesis `PutRecord`, `PutRecords`, `ListShards` and
//! `DescribeStreamSummary` (JSON 1.1). Like the real services it
//! - checks AssumeRole against a trust policy in IAM's JSON form, as `policy` prints it (principal and
//!   `sts:ExternalId`, a string or a list) and denies a wrong external ID;
//! - issues credentials with an expiry and refuses expired or unknown ones
//!   (`ExpiredTokenException`, `UnrecognizedClientException`), identifying the caller
//!   by the access key in the SigV4 `Authorization` header;
//! - maps each partition key to a shard by the MD5 of the key into the shards'
//!   hash-key ranges, and can enforce each shard's 1,000 records/s and 1 MiB/s.
//!
//! Faults are programmed per stream or role: throttling (a share of writes, for a
//! while), server errors, latency (timeouts), AccessDenied, partial PutRecords failures,
//! short credential lifetimes. It answers as fast as the machine allows, so it doubles as
//! the sink for rate-limit tests and benchmarks (moto manages a few hundred writes/s).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};

use crate::proxy::AssumeRoleCall;

/// The account of the worker's own identity, as the fake sees every caller. A trust
/// policy's principal `arn:aws:iam::999999999999:root` therefore admits the worker.
pub const CALLER_ACCOUNT: &str = "999999999999";

/// A record as the fake received it.
#[derive(Debug, Clone)]
pub struct FakeRecord {
    pub stream: String,
    pub shard_id: String,
    pub partition_key: String,
    pub data: Vec<u8>,
    pub at: Instant,
    /// The access key that signed the write (tells workers apart).
    pub access_key: String,
}

impl FakeRecord {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.data).unwrap_or(Value::Null)
    }
}

/// A programmed failure.
#[derive(Debug, Clone)]
pub enum Fault {
    /// `percent` of writes fail with `ProvisionedThroughputExceededException`.
    Throttle { percent: u32 },
    /// Writes fail with this HTTP status and error code.
    Error { status: u16, code: String },
    /// Writes are answered after this delay (longer than the client's timeout: a timeout).
    Latency(Duration),
    /// `percent` of the records of each PutRecords call fail (the call itself succeeds).
    PartialFailure { percent: u32 },
}

#[derive(Debug)]
struct ActiveFault {
    fault: Fault,
    /// How many more writes it applies to (`None`: until `until`).
    remaining: Option<u64>,
    until: Option<Instant>,
    seen: u64,
}

#[derive(Debug)]
struct Shard {
    id: String,
    start: u128,
    end: u128,
    /// Writes of the last second, for capacity enforcement: (when, bytes).
    window: VecDeque<(Instant, usize)>,
}

#[derive(Debug, Default)]
struct Stream {
    shards: Vec<Shard>,
    denied: bool,
    /// Per-shard (records/s, bytes/s) enforced over a sliding second, when set.
    capacity: Option<(usize, usize)>,
    faults: Vec<ActiveFault>,
}

#[derive(Debug)]
struct Issued {
    role: String,
    expires: SystemTime,
}

#[derive(Default)]
struct Inner {
    streams: HashMap<String, Stream>,
    trust: HashMap<String, Value>,
    issued: HashMap<String, Issued>,
    records: Vec<FakeRecord>,
    assume_role: Vec<AssumeRoleCall>,
    credential_lifetime: Option<Duration>,
    /// Roles whose credentials may not write to any stream.
    denied_roles: Vec<String>,
    throttled: Vec<Instant>,
    requests: HashMap<String, u64>,
    /// STS refuses the caller's own credentials (as for a revoked access key).
    reject_caller: bool,
    /// How long STS takes to answer.
    sts_latency: Duration,
    /// AssumeRole calls being answered now, and the most there ever were at once.
    sts_in_flight: usize,
    sts_max_in_flight: usize,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// Creates a stream with `shards` shards splitting the hash-key space evenly.
    pub fn create_stream(&self, name: &str, shards: u32) {
        self.lock().streams.insert(
            name.into(),
            Stream {
                shards: even_shards(shards),
                ..Stream::default()
            },
        );
    }

    /// Enforces 1,000 records/s and 1 MiB/s per shard, like the real service.
    pub fn enforce_capacity(&self, stream: &str) {
        self.enforce_capacity_at(stream, 1000, 1024 * 1024);
    }

    /// Enforces a per-shard capacity of `records` records/s and `bytes` bytes/s (a
    /// scaled-down shard, for tests that cannot drive a real one's rate).
    pub fn enforce_capacity_at(&self, stream: &str, records: usize, bytes: usize) {
        if let Some(s) = self.lock().streams.get_mut(stream) {
            s.capacity = Some((records, bytes));
        }
    }

    /// When each write refused for capacity (ProvisionedThroughputExceeded) arrived.
    pub fn throttled_at(&self) -> Vec<Instant> {
        self.lock().throttled.clone()
    }

    /// Answers AccessDeniedException to writes to `stream` (or stops doing so).
    pub fn deny_stream(&self, stream: &str, denied: bool) {
        if let Some(s) = self.lock().streams.get_mut(stream) {
            s.denied = denied;
        }
    }

    /// Answers AccessDeniedException to writes signed with `role`'s credentials.
    pub fn deny_role_writes(&self, role: &str) {
        self.lock().denied_roles.push(role.into());
    }

    /// Makes STS take `latency` to answer each AssumeRole.
    pub fn set_sts_latency(&self, latency: Duration) {
        self.lock().sts_latency = latency;
    }

    /// The most AssumeRole calls that were ever being answered at once.
    pub fn max_concurrent_assume_role(&self) -> usize {
        self.lock().sts_max_in_flight
    }

    /// Makes STS refuse the worker's own credentials (`InvalidClientTokenId`), or accept
    /// them again.
    pub fn reject_caller(&self, reject: bool) {
        self.lock().reject_caller = reject;
    }

    /// Gives `role` a trust policy (IAM's JSON, as `policy` prints it); AssumeRole is then checked against
    /// it. Roles without one trust everybody, as moto does.
    pub fn set_trust_policy(&self, role: &str, policy: Value) {
        self.lock().trust.insert(role.into(), policy);
    }

    /// Lifetime of the credentials AssumeRole hands out (default one hour).
    pub fn set_credential_lifetime(&self, lifetime: Duration) {
        self.lock().credential_lifetime = Some(lifetime);
    }

    /// Makes every credential issued so far expired, as if they had run out.
    pub fn expire_all_credentials(&self) {
        let past = SystemTime::now() - Duration::from_secs(1);
        for c in self.lock().issued.values_mut() {
            c.expires = past;
        }
    }

    /// Applies `fault` to the next `count` writes to `stream`.
    pub fn fail_next(&self, stream: &str, fault: Fault, count: u64) {
        self.add_fault(stream, fault, Some(count), None);
    }

    /// Applies `fault` to writes to `stream` for `duration`.
    pub fn fail_for(&self, stream: &str, fault: Fault, duration: Duration) {
        self.add_fault(stream, fault, None, Some(Instant::now() + duration));
    }

    /// Removes every fault of `stream`.
    pub fn clear_faults(&self, stream: &str) {
        if let Some(s) = self.lock().streams.get_mut(stream) {
            s.faults.clear();
        }
    }

    fn add_fault(
        &self,
        stream: &str,
        fault: Fault,
        remaining: Option<u64>,
        until: Option<Instant>,
    ) {
        let mut inner = self.lock();
        let s = inner
            .streams
            .get_mut(stream)
            .unwrap_or_else(|| panic!("create stream {stream} first"));
        s.faults.push(ActiveFault {
            fault,
            remaining,
            until,
            seen: 0,
        });
    }

    /// Every record written, in arrival order.
    pub fn records(&self) -> Vec<FakeRecord> {
        self.lock().records.clone()
    }

    pub fn records_of(&self, stream: &str) -> Vec<FakeRecord> {
        self.lock()
            .records
            .iter()
            .filter(|r| r.stream == stream)
            .cloned()
            .collect()
    }

    pub fn assume_role_calls(&self) -> Vec<AssumeRoleCall> {
        self.lock().assume_role.clone()
    }

    /// The role whose credentials carry this access key.
    pub fn role_of(&self, access_key: &str) -> Option<String> {
        self.lock().issued.get(access_key).map(|c| c.role.clone())
    }

    /// How many requests of an operation (`PutRecord`, `AssumeRole`, …) arrived.
    pub fn requests(&self, operation: &str) -> u64 {
        self.lock().requests.get(operation).copied().unwrap_or(0)
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
    let access_key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.split("Credential=").nth(1))
        .and_then(|c| c.split('/').next())
        .unwrap_or_default()
        .to_owned();
    let operation = target.rsplit('.').next().unwrap_or("").to_owned();
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
        inner.lock().unwrap().sts_in_flight -= 1;
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
    if let Some(refused) = authenticate(&inner, &access_key) {
        return refused;
    }
    match operation.as_str() {
        "PutRecord" | "PutRecords" => put(&inner, &operation, &req, &access_key).await,
        "ListShards" => list_shards(&inner, &req),
        "DescribeStreamSummary" => describe(&inner, &req),
        other => json_error(
            400,
            "UnknownOperationException",
            &format!("{other} is not faked"),
        ),
    }
}

/// The refusal for credentials the fake did not issue or that have expired.
fn authenticate(inner: &Mutex<Inner>, access_key: &str) -> Option<Response> {
    let inner = inner.lock().unwrap();
    match inner.issued.get(access_key) {
        None => Some(json_error(
            400,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )),
        Some(c) if c.expires <= SystemTime::now() => Some(json_error(
            400,
            "ExpiredTokenException",
            "The security token included in the request is expired",
        )),
        Some(_) => None,
    }
}

/// `n` shards splitting the 128-bit hash-key space evenly, as CreateStream does.
fn even_shards(n: u32) -> Vec<Shard> {
    let n = n.max(1) as u128;
    let step = u128::MAX / n;
    (0..n)
        .map(|i| Shard {
            id: format!("shardId-{i:012}"),
            start: i * step,
            end: if i == n - 1 {
                u128::MAX
            } else {
                (i + 1) * step - 1
            },
            window: VecDeque::new(),
        })
        .collect()
}

fn stream_not_found(name: &str) -> Response {
    json_error(
        400,
        "ResourceNotFoundException",
        &format!("Stream {name} under account not found."),
    )
}

fn stream_name(req: &Value) -> String {
    req["StreamName"].as_str().unwrap_or_default().to_owned()
}

fn hash_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(md5::compute(partition_key.as_bytes()).0)
}

/// What a fault does to one write.
enum Effect {
    None,
    Fail(Response),
    Delay(Duration),
    Partial(u32),
}

fn fault_effect(stream: &mut Stream) -> Effect {
    let now = Instant::now();
    stream
        .faults
        .retain(|f| f.remaining.is_none_or(|n| n > 0) && f.until.is_none_or(|u| now < u));
    let Some(f) = stream.faults.first_mut() else {
        return Effect::None;
    };
    f.seen += 1;
    if let Some(n) = f.remaining.as_mut() {
        *n -= 1;
    }
    match &f.fault {
        // Deterministic share: the first `percent` of every hundred writes.
        Fault::Throttle { percent } => {
            if (f.seen - 1) % 100 < *percent as u64 {
                Effect::Fail(throttled())
            } else {
                Effect::None
            }
        }
        Fault::Error { status, code } => {
            Effect::Fail(json_error(*status, code, "injected failure"))
        }
        Fault::Latency(d) => Effect::Delay(*d),
        Fault::PartialFailure { percent } => Effect::Partial(*percent),
    }
}

fn throttled() -> Response {
    json_error(
        400,
        "ProvisionedThroughputExceededException",
        "Rate exceeded for shard in stream under account.",
    )
}

/// Takes a record into a shard, or says why not.
fn accept(stream: &mut Stream, partition_key: &str, bytes: usize) -> Result<String, &'static str> {
    let h = hash_key(partition_key);
    let capacity = stream.capacity;
    let shard = stream
        .shards
        .iter_mut()
        .find(|s| s.start <= h && h <= s.end)
        .ok_or("no shard")?;
    if let Some((max_records, max_bytes)) = capacity {
        let now = Instant::now();
        while shard
            .window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= Duration::from_secs(1))
        {
            shard.window.pop_front();
        }
        let used: usize = shard.window.iter().map(|(_, b)| b).sum();
        if shard.window.len() >= max_records || used + bytes > max_bytes {
            return Err("throttled");
        }
        shard.window.push_back((now, bytes));
    }
    Ok(shard.id.clone())
}

async fn put(inner: &Mutex<Inner>, operation: &str, req: &Value, access_key: &str) -> Response {
    let name = stream_name(req);
    let effect = {
        let mut guard = inner.lock().unwrap();
        let role_denied = guard
            .issued
            .get(access_key)
            .is_some_and(|c| guard.denied_roles.contains(&c.role));
        let Some(stream) = guard.streams.get_mut(&name) else {
            return stream_not_found(&name);
        };
        if stream.denied || role_denied {
            return json_error(
                400,
                "AccessDeniedException",
                &format!("User is not authorized to perform: kinesis:{operation} on resource stream/{name}"),
            );
        }
        fault_effect(stream)
    };
    let partial = match effect {
        Effect::Fail(r) => return r,
        Effect::Delay(d) => {
            tokio::time::sleep(d).await;
            0
        }
        Effect::Partial(p) => p,
        Effect::None => 0,
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut guard = inner.lock().unwrap();
    let inner = &mut *guard;
    let Some(stream) = inner.streams.get_mut(&name) else {
        return stream_not_found(&name);
    };
    let entries: Vec<&Value> = if operation == "PutRecord" {
        vec![req]
    } else {
        req["Records"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    };
    let mut results = Vec::new();
    let mut failed = 0;
    for (i, e) in entries.iter().enumerate() {
        let key = e["PartitionKey"].as_str().unwrap_or_default().to_owned();
        let Ok(data) = b64.decode(e["Data"].as_str().unwrap_or_default()) else {
            return json_error(400, "ValidationException", "Data is not base64");
        };
        let outcome = if (i as u32 % 100) < partial {
            Err("throttled")
        } else {
            accept(stream, &key, data.len() + key.len())
        };
        match outcome {
            Ok(shard_id) => {
                inner.records.push(FakeRecord {
                    stream: name.clone(),
                    shard_id: shard_id.clone(),
                    partition_key: key,
                    data,
                    at: Instant::now(),
                    access_key: access_key.to_owned(),
                });
                let seq = format!("{:056}", inner.records.len());
                results.push(json!({"ShardId": shard_id, "SequenceNumber": seq}));
            }
            Err(_) if operation == "PutRecord" => {
                inner.throttled.push(Instant::now());
                return throttled();
            }
            Err(_) => {
                inner.throttled.push(Instant::now());
                failed += 1;
                results.push(
                    json!({"ErrorCode": "ProvisionedThroughputExceededException",
                    "ErrorMessage": "Rate exceeded for shard in stream under account."}),
                );
            }
        }
    }
    let body = if operation == "PutRecord" {
        results.pop().unwrap_or(Value::Null)
    } else {
        json!({"FailedRecordCount": failed, "Records": results})
    };
    json_ok(body)
}

fn list_shards(inner: &Mutex<Inner>, req: &Value) -> Response {
    let inner = inner.lock().unwrap();
    let name = stream_name(req);
    let Some(stream) = inner.streams.get(&name) else {
        return stream_not_found(&name);
    };
    let shards: Vec<Value> = stream
        .shards
        .iter()
        .map(|s| {
            json!({"ShardId": s.id,
                "HashKeyRange": {"StartingHashKey": s.start.to_string(), "EndingHashKey": s.end.to_string()},
                "SequenceNumberRange": {"StartingSequenceNumber": "0"}})
        })
        .collect();
    json_ok(json!({"Shards": shards}))
}

fn describe(inner: &Mutex<Inner>, req: &Value) -> Response {
    let inner = inner.lock().unwrap();
    let name = stream_name(req);
    let Some(stream) = inner.streams.get(&name) else {
        return stream_not_found(&name);
    };
    json_ok(json!({"StreamDescriptionSummary": {
        "StreamName": name, "StreamARN": format!("arn:aws:kinesis:us-east-1:000000000000:stream/{name}"),
        "StreamStatus": "ACTIVE", "RetentionPeriodHours": 24, "StreamCreationTimestamp": 0,
        "EnhancedMonitoring": [], "OpenShardCount": stream.shards.len()}}))
}

/// Does the trust policy let our caller assume the role with this external ID?
fn trusts(policy: &Value, external_id: Option<&str>) -> bool {
    let caller_root = format!("arn:aws:iam::{CALLER_ACCOUNT}:root");
    let as_list = |v: &Value| -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect(),
            _ => vec![],
        }
    };
    let statements = match &policy["Statement"] {
        Value::Array(a) => a.clone(),
        s @ Value::Object(_) => vec![s.clone()],
        _ => vec![],
    };
    statements.iter().any(|st| {
        st["Effect"] == "Allow"
            && as_list(&st["Action"]).iter().any(|a| a == "sts:AssumeRole")
            && as_list(&st["Principal"]["AWS"])
                .iter()
                .any(|p| p == "*" || *p == caller_root)
            && match st["Condition"]["StringEquals"].get("sts:ExternalId") {
                None => true,
                Some(ids) => external_id.is_some_and(|x| as_list(ids).iter().any(|id| id == x)),
            }
    })
}

fn sts(inner: &Mutex<Inner>, body: &[u8]) -> Response {
    let form: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    let get = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if get("Action").as_deref() == Some("GetCallerIdentity") {
        if inner.lock().unwrap().reject_caller {
            return sts_error(
                403,
                "InvalidClientTokenId",
                "The security token included in the request is invalid.",
            );
        }
        let xml = format!(
            r#"<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <GetCallerIdentityResult>
    <Arn>arn:aws:iam::{CALLER_ACCOUNT}:user/worker</Arn>
    <UserId>AIDAFAKE</UserId>
    <Account>{CALLER_ACCOUNT}</Account>
  </GetCallerIdentityResult>
  <ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata>
</GetCallerIdentityResponse>"#
        );
        return ([("content-type", "text/xml")], xml).into_response();
    }
    if get("Action").as_deref() != Some("AssumeRole") {
        return (
            StatusCode::BAD_REQUEST,
            "only AssumeRole and GetCallerIdentity are faked",
        )
            .into_response();
    }
    let role = get("RoleArn").unwrap_or_default();
    let external_id = get("ExternalId");
    let mut inner = inner.lock().unwrap();
    inner.assume_role.push(AssumeRoleCall {
        role_arn: role.clone(),
        external_id: external_id.clone(),
    });
    if inner.reject_caller {
        return sts_error(
            403,
            "InvalidClientTokenId",
            "The security token included in the request is invalid.",
        );
    }
    if let Some(policy) = inner.trust.get(&role) {
        if !trusts(policy, external_id.as_deref()) {
            return sts_error(
                403,
                "AccessDenied",
                &format!("User: arn:aws:iam::{CALLER_ACCOUNT}:user/worker is not authorized to perform: sts:AssumeRole on resource: {role}"),
            );
        }
    }
    let n = inner.assume_role.len();
    let lifetime = inner
        .credential_lifetime
        .unwrap_or(Duration::from_secs(3600));
    let expires = SystemTime::now() + lifetime;
    let access_key = format!("ASIAFAKE{n:012}");
    inner.issued.insert(
        access_key.clone(),
        Issued {
            role: role.clone(),
            expires,
        },
    );
    let expires = aws_smithy_types::DateTime::from(expires)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default();
    let xml = format!(
        r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <Credentials>
      <AccessKeyId>{access_key}</AccessKeyId>
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

fn sts_error(status: u16, code: &str, message: &str) -> Response {
    let xml = format!(
        r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>
  <RequestId>fake</RequestId>
</ErrorResponse>"#
    );
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN),
        [("content-type", "text/xml")],
        xml,
    )
        .into_response()
}

fn json_ok(body: Value) -> Response {
    (
        [("content-type", "application/x-amz-json-1.1")],
        body.to_string(),
    )
        .into_response()
}

fn json_error(status: u16, code: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        [("content-type", "application/x-amz-json-1.1")],
        json!({"__type": code, "message": message}).to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_policy_in_iam_json_form() {
        let one = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Principal": {"AWS": "arn:aws:iam::999999999999:root"}, "Action": "sts:AssumeRole",
            "Condition": {"StringEquals": {"sts:ExternalId": "src_1"}}}]});
        assert!(trusts(&one, Some("src_1")));
        assert!(!trusts(&one, Some("src_2")));
        assert!(!trusts(&one, None));
        let many = json!({"Statement": [{"Effect": "Allow",
            "Principal": {"AWS": "arn:aws:iam::999999999999:root"}, "Action": "sts:AssumeRole",
            "Condition": {"StringEquals": {"sts:ExternalId": ["a", "b"]}}}]});
        assert!(trusts(&many, Some("b")));
        let other_principal = json!({"Statement": [{"Effect": "Allow",
            "Principal": {"AWS": "arn:aws:iam::595280932656:root"}, "Action": "sts:AssumeRole"}]});
        assert!(!trusts(&other_principal, Some("a")));
    }

    #[test]
    fn shards_split_the_hash_key_space() {
        let mut s = Stream {
            shards: even_shards(4),
            ..Stream::default()
        };
        let mut seen = std::collections::HashSet::new();
        for k in 0..200 {
            seen.insert(accept(&mut s, &format!("user-{k}"), 10).unwrap());
        }
        assert_eq!(seen.len(), 4, "keys spread over every shard");
        s.capacity = Some((1000, 1024 * 1024));
        let key = "hot";
        let ok = (0..1100)
            .filter(|_| accept(&mut s, key, 10).is_ok())
            .count();
        assert_eq!(ok, 1000, "one shard takes 1,000 records a second");
    }
}
