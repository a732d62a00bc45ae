//! A faithful AWS fake for the faults the emulator cannot produce.
//!
//! It speaks the protocols the SDK speaks, on one endpoint: STS `AssumeRole` (query
//! protocol, XML answers) and Kinesis `PutRecord`, `PutRecords`, `ListShards` and
//! `DescribeStreamSummary` (JSON 1.1). Like the real services it
//! - checks AssumeRole against a trust policy in IAM's JSON form, as `policy` prints it (principal and
//!   `sts:ExternalId`, a string or a list) and denies a wrong external ID;
//! - issues credentials with an expiry and refuses expired or unknown ones
//!   (`ExpiredTokenException`, `UnrecognizedClientException`), identifying the caller
//!   by the access key in the SigV4 `Authorization` header, and checks the signature
//!   itself with the secret it issued (`InvalidSignatureException`);
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

use serde_json::Value;

use crate::proxy::AssumeRoleCall;

mod kinesis;
mod policy;
mod serve;
mod sigv4;
mod sts;

use kinesis::even_shards;
use serve::{handle, stamp_date};

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
    /// The same moment by the wall clock (to compare with event timestamps).
    pub at_wall: SystemTime,
    /// `PutRecord` or `PutRecords`.
    pub operation: String,
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
    /// Closed by a reshard: listed with an ending sequence number, written no more.
    closed: bool,
    /// Writes of the last second, for capacity enforcement: (when, bytes).
    window: VecDeque<(Instant, usize)>,
}

#[derive(Debug, Default)]
struct Stream {
    shards: Vec<Shard>,
    /// The owner's account and region, when the test gave an ARN: calls naming the
    /// stream by ARN must match them, and callers of another account need the
    /// stream's resource policy.
    owner: Option<(String, String)>,
    /// The stream's resource-based policy (IAM's JSON).
    policy: Option<Value>,
    on_demand: bool,
    /// `MaxRecordSizeInKiB` (1024 unless raised).
    max_record_kib: Option<u32>,
    denied: bool,
    /// Per-shard (records/s, bytes/s) enforced over a sliding second, when set.
    capacity: Option<(usize, usize)>,
    faults: Vec<ActiveFault>,
}

#[derive(Debug)]
struct Issued {
    role: String,
    expires: SystemTime,
    secret: String,
    token: String,
    /// Session tags given to AssumeRole.
    tags: Vec<(String, String)>,
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
    /// (role, operation) pairs answered AccessDeniedException, as an IAM policy that
    /// grants the role the other operation only.
    denied_operations: Vec<(String, String)>,
    throttled: Vec<Instant>,
    requests: HashMap<String, u64>,
    /// STS refuses the caller's own credentials (as for a revoked access key).
    reject_caller: bool,
    /// How long STS takes to answer.
    sts_latency: Duration,
    /// AssumeRole calls being answered now, and the most there ever were at once.
    sts_in_flight: usize,
    sts_max_in_flight: usize,
    /// The fake's clock minus the machine's, in seconds (AWS's clock and the worker's
    /// may differ: the fake's moves, as libfaketime does not mix with librdkafka).
    clock_offset_secs: i64,
    /// Answers carry no `Date` header (a proxy that strips it).
    omit_date: bool,
    /// Regions whose requests (by their signature's scope) are read and never answered,
    /// as through a network path that drops packets.
    black_holed: std::collections::HashSet<String>,
}

impl Inner {
    /// The fake's time: what signatures, credential expiry and `Date` are judged by.
    fn now(&self) -> SystemTime {
        let d = Duration::from_secs(self.clock_offset_secs.unsigned_abs());
        if self.clock_offset_secs >= 0 {
            SystemTime::now() + d
        } else {
            SystemTime::now() - d
        }
    }
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
            // A 10 MiB PutRecords is some 13.4 MiB of base64 in JSON.
            .layer(axum::extract::DefaultBodyLimit::max(32 * 1024 * 1024))
            .layer(axum::middleware::map_response_with_state(
                inner.clone(),
                stamp_date,
            ))
            .with_state(inner.clone());
        // Served by hyper itself: axum's server adds a `Date` of the machine's clock,
        // and the fake's answers carry the fake's (or none).
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .auto_date_header(false)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
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

    /// Creates a stream owned by the account and in the region `arn` names
    /// (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`): calls naming it by ARN must agree,
    /// and a caller of another account needs its resource policy.
    pub fn create_stream_arn(&self, arn: &str, shards: u32) {
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let name = parts[5].trim_start_matches("stream/");
        self.lock().streams.insert(
            name.into(),
            Stream {
                shards: even_shards(shards),
                owner: Some((parts[4].into(), parts[3].into())),
                ..Stream::default()
            },
        );
    }

    /// Attaches a resource-based policy (IAM's JSON, as `policy --source-id` prints it)
    /// to a stream made with [`create_stream_arn`](Self::create_stream_arn).
    pub fn set_stream_policy(&self, stream: &str, policy: Value) {
        if let Some(s) = self.lock().streams.get_mut(stream) {
            s.policy = Some(policy);
        }
    }

    /// Makes a stream on-demand (as DescribeStreamSummary says) and sets its maximum
    /// record size (`UpdateMaxRecordSize`), in KiB.
    pub fn set_stream_shape(&self, stream: &str, on_demand: bool, max_record_kib: u32) {
        if let Some(s) = self.lock().streams.get_mut(stream) {
            s.on_demand = on_demand;
            s.max_record_kib = Some(max_record_kib);
        }
    }

    /// Reshards `stream` to `shards` open shards, as UpdateShardCount (uniform scaling)
    /// does: every open shard is closed and new ones, with new IDs, split the hash-key
    /// space evenly. Records already written stay on the closed shards.
    pub fn reshard(&self, stream: &str, shards: u32) {
        if let Some(s) = self.lock().streams.get_mut(stream) {
            let next = s.shards.len();
            for shard in &mut s.shards {
                shard.closed = true;
            }
            for (i, mut shard) in even_shards(shards).into_iter().enumerate() {
                shard.id = format!("shardId-{:012}", next + i);
                s.shards.push(shard);
            }
        }
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

    /// Answers AccessDeniedException to `operation` (`PutRecords`, `ListShards`,
    /// `DescribeStreamSummary`) signed with `role`'s credentials, or no longer (`denied`
    /// false): a policy without that action.
    pub fn deny_role_operation(&self, role: &str, operation: &str, denied: bool) {
        let mut inner = self.lock();
        let entry = (role.to_owned(), operation.to_owned());
        inner.denied_operations.retain(|e| *e != entry);
        if denied {
            inner.denied_operations.push(entry);
        }
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

    /// Credentials for `role` valid for an hour, as AssumeRole would hand out: (access
    /// key ID, secret, session token). For peers whose STS client cannot be pointed here.
    pub fn issue_credentials(&self, role: &str) -> (String, String, String) {
        let mut inner = self.lock();
        let access_key = format!("ASIAPEER{:012}", inner.issued.len());
        let expires = inner.now() + Duration::from_secs(3600);
        inner.issued.insert(
            access_key.clone(),
            Issued {
                role: role.into(),
                expires,
                secret: "peer-secret".into(),
                token: "peer-session-token".into(),
                tags: Vec::new(),
            },
        );
        (
            access_key,
            "peer-secret".into(),
            "peer-session-token".into(),
        )
    }

    /// Sets the fake's clock `secs` seconds ahead of the machine's (behind when
    /// negative). AWS refuses a request signed more than 5 minutes from its time
    /// ("Signature expired" / "Signature not yet current"), states its time in every
    /// answer's `Date`, and issues credentials expiring by its clock.
    pub fn set_clock_offset(&self, secs: i64) {
        self.lock().clock_offset_secs = secs;
    }

    /// Leaves the `Date` header out of every answer (or puts it back).
    pub fn omit_date(&self, omit: bool) {
        self.lock().omit_date = omit;
    }

    /// Requests refused because their signature's time was too far from the fake's.
    pub fn skew_refusals(&self) -> u64 {
        self.requests("skew-refused")
    }

    /// Kinesis calls that named their stream by `StreamARN`.
    pub fn calls_by_arn(&self) -> u64 {
        self.requests("by-arn")
    }

    /// Lifetime of the credentials AssumeRole hands out (default one hour).
    pub fn set_credential_lifetime(&self, lifetime: Duration) {
        self.lock().credential_lifetime = Some(lifetime);
    }

    /// Makes every credential issued so far expired, as if they had run out.
    pub fn expire_all_credentials(&self) {
        let mut inner = self.lock();
        let past = inner.now() - Duration::from_secs(1);
        for c in inner.issued.values_mut() {
            c.expires = past;
        }
    }

    /// Requests signed for `region` (Kinesis and STS) are read and not answered while
    /// `on`: a black hole on the way to that region's endpoints. Requests held through
    /// it get a 503 when it ends (their clients gave up on them long before).
    pub fn black_hole_region(&self, region: &str, on: bool) {
        let mut inner = self.lock();
        if on {
            inner.black_holed.insert(region.to_owned());
        } else {
            inner.black_holed.remove(region);
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
