//! The Kinesis calls made for every event, `PutRecord` and `PutRecords`, and for every
//! stream, `ListShards` and `DescribeStreamSummary`, sent without the SDK: a JSON body written directly, signed with
//! SigV4 (`sign.rs`) using the tenant's session credentials, over one pooled HTTP client
//! shared by every tenant and region.
//!
//! Through the SDK each call ran its whole per-request machinery (interceptors, runtime
//! components, endpoint rules) and each cached session needed a Kinesis client of its
//! own (~5 KiB each, hundreds of MiB with 100,000 tenants); building an SDK client for a
//! stream's ListShards even loaded the system's root certificates each time. Calls made
//! now and then (`check`, `tail`, STS) still go through the SDK.
//!
//! Owns the wire format only: which failures are retried is [`crate::errors`]'s call.

use std::sync::Arc;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_credential_types::Credentials;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kd_tenants::Region;
use serde::Deserialize;

use crate::clock::Clock;
use crate::errors::{AwsError, Failure};

/// Where a record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub shard_id: String,
    pub sequence_number: String,
}

/// The calls made here: their names (in errors) and `X-Amz-Target` values.
#[derive(Debug, Clone, Copy)]
enum Operation {
    PutRecord,
    PutRecords,
    ListShards,
    DescribeStreamSummary,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::PutRecord => "PutRecord",
            Operation::PutRecords => "PutRecords",
            Operation::ListShards => "ListShards",
            Operation::DescribeStreamSummary => "DescribeStreamSummary",
        }
    }

    fn target(self) -> &'static str {
        match self {
            Operation::PutRecord => "Kinesis_20131202.PutRecord",
            Operation::PutRecords => "Kinesis_20131202.PutRecords",
            Operation::ListShards => "Kinesis_20131202.ListShards",
            Operation::DescribeStreamSummary => "Kinesis_20131202.DescribeStreamSummary",
        }
    }

    /// Writes go to the data plane, the rest to the control plane: with a stream ARN
    /// the SDK's endpoint rules give them different hosts.
    fn is_data(self) -> bool {
        matches!(self, Operation::PutRecord | Operation::PutRecords)
    }
}

/// How a call names its stream: by name, or by ARN (`StreamARN`, which AWS recommends
/// and cross-account access by resource policy requires).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamId<'a> {
    Name(&'a str),
    Arn(&'a kd_tenants::StreamArn),
}

impl<'a> StreamId<'a> {
    /// How `tenant`'s settings name their stream.
    pub fn of(tenant: &'a kd_tenants::TenantSettings) -> Self {
        match &tenant.stream_arn {
            Some(arn) => StreamId::Arn(arn),
            None => StreamId::Name(tenant.stream.as_str()),
        }
    }

    /// Appends `"StreamName":"…"` or `"StreamARN":"…"`.
    fn push_field(self, body: &mut Vec<u8>) {
        let (field, value): (&[u8], &str) = match self {
            StreamId::Name(name) => (b"\"StreamName\":", name),
            StreamId::Arn(arn) => (b"\"StreamARN\":", arn.as_str()),
        };
        body.extend_from_slice(field);
        push_json_str(body, value);
    }

    fn len(self) -> usize {
        self.label().len()
    }

    /// How the stream is named in messages: its ARN when given, else its name.
    pub fn label(self) -> &'a str {
        match self {
            StreamId::Name(name) => name,
            StreamId::Arn(arn) => arn.as_str(),
        }
    }
}
const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// What every request says it comes from (AWS support and CloudTrail's `userAgent`).
pub const USER_AGENT: &str = concat!("kinesis-destination/", env!("CARGO_PKG_VERSION"));

/// Most ListShards pages read for one stream (AWS answers up to 1,000 shards a page;
/// a stream has at most a few thousand open): a token that never ends is cut off.
pub const MAX_LIST_SHARDS_PAGES: usize = 100;

/// Most bytes of an answer read: the largest real one, a `ListShards` page of 10,000
/// shards, is about 2.5 MB; a proxy or a broken endpoint sending more is cut off.
const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;

/// Where Kinesis is reached.
#[derive(Debug, Clone)]
enum Endpoint {
    /// One endpoint for every region (LocalStack, a test fake, a VPC endpoint).
    Fixed { uri: http::Uri, host: Arc<str> },
    /// AWS's own, as the SDK's endpoint rules make them: every partition, FIPS and
    /// dual-stack, and for a call naming a stream ARN the account's own host
    /// (`ACCOUNT.data-kinesis.REGION...`, `ACCOUNT.control-kinesis...`).
    Resolved(Arc<Resolved>),
}

#[derive(Debug)]
struct Resolved {
    fips: bool,
    dual_stack: bool,
    rules: aws_sdk_kinesis::config::endpoint::DefaultResolver,
    /// Hosts already resolved, by (region, account of the stream ARN, data plane).
    hosts: std::sync::Mutex<std::collections::HashMap<HostKey, (http::Uri, Arc<str>)>>,
}

type HostKey = (Region, Option<Arc<str>>, bool);

/// Most hosts remembered (accounts times regions); past it the memory starts again.
const MAX_HOSTS: usize = 100_000;

/// The shape of a stream, as `DescribeStreamSummary` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSummary {
    /// `ON_DEMAND` (AWS adds and merges shards itself) rather than `PROVISIONED`.
    pub on_demand: bool,
    pub open_shards: u32,
    /// `MaxRecordSizeInKiB` in bytes: 1 MiB unless the stream's owner raised it (up to
    /// 10 MiB); absent from older answers, which means 1 MiB.
    pub max_record_bytes: usize,
}

/// One shard open for writes: its number (`shardId-000000000004` is 4) and hash-key range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OpenShard {
    pub start: u128,
    pub end: u128,
    pub number: u64,
}

/// The number at the end of a shard ID (`shardId-000000000004`).
pub fn shard_number(id: &str) -> Option<u64> {
    id.rsplit('-').next()?.parse().ok()
}

/// One record of a `PutRecords` call.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub key: &'a str,
    pub data: &'a [u8],
}

/// A record's result in a `PutRecords` answer: written, or refused with its own code.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RecordResult {
    // A written record's sequence number is not read (nothing uses it), and its shard ID
    // only as a number: no string per record.
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// The shard the record went to, by number: tells a shard map that missed a
    /// reshard.
    #[serde(default, rename = "ShardId", deserialize_with = "shard_number_of")]
    pub shard: Option<u64>,
}

/// Reads a shard ID as its number, without keeping the string.
fn shard_number_of<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a shard ID")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(shard_number(v))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PutRecordOutput {
    shard_id: String,
    sequence_number: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PutRecordsOutput {
    #[serde(default)]
    records: Vec<RecordResult>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListShardsOutput {
    #[serde(default)]
    shards: Vec<ShardOutput>,
    next_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DescribeStreamSummaryOutput {
    stream_description_summary: SummaryOutput,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SummaryOutput {
    open_shard_count: u32,
    stream_mode_details: Option<StreamModeDetails>,
    #[serde(rename = "MaxRecordSizeInKiB")]
    max_record_size_in_kib: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StreamModeDetails {
    stream_mode: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ShardOutput {
    shard_id: String,
    hash_key_range: HashKeyRange,
    sequence_number_range: Option<SequenceNumberRange>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HashKeyRange {
    starting_hash_key: String,
    ending_hash_key: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SequenceNumberRange {
    ending_sequence_number: Option<String>,
}

impl ShardOutput {
    /// A shard still open for writes (`None` for a closed one).
    fn open(&self) -> Option<OpenShard> {
        let open = self
            .sequence_number_range
            .as_ref()
            .is_none_or(|r| r.ending_sequence_number.is_none());
        let shard = OpenShard {
            start: self.hash_key_range.starting_hash_key.parse().ok()?,
            end: self.hash_key_range.ending_hash_key.parse().ok()?,
            number: shard_number(&self.shard_id)?,
        };
        open.then_some(shard)
    }
}

/// The Kinesis data plane for every tenant: one connection pool, credentials per call.
#[derive(Clone)]
pub struct KinesisApi {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: Endpoint,
    /// Time allowed for one call, from sending to the whole answer.
    attempt_timeout: Duration,
    /// AWS's time, to sign with.
    clock: Arc<Clock>,
    /// Whether AWS answers at all.
    reach: Arc<crate::reach::Reach>,
}

impl std::fmt::Debug for KinesisApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KinesisApi")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl KinesisApi {
    /// A client for the endpoint and timeouts of the worker's AWS configuration (its
    /// `endpoint_url` or `AWS_ENDPOINT_URL_KINESIS`, FIPS and dual-stack choices,
    /// connect and attempt timeouts). Endpoints set per service in an AWS profile's
    /// `services` section are not read: set the variable or `aws.endpoint_url`.
    pub fn new(
        base: &SdkConfig,
        clock: Arc<Clock>,
        readiness: Option<Arc<kd_telemetry::Readiness>>,
    ) -> Result<Self, String> {
        // The Kinesis-specific endpoint variable first, as the SDK reads it (a VPC
        // endpoint for Kinesis only), then the one for every service.
        let kinesis_url = std::env::var("AWS_ENDPOINT_URL_KINESIS")
            .ok()
            .filter(|u| !u.is_empty());
        let endpoint = match kinesis_url.as_deref().or(base.endpoint_url()) {
            Some(url) => {
                let uri: http::Uri = url
                    .parse()
                    .map_err(|e| format!("aws.endpoint_url {url:?} is not a URL: {e}"))?;
                let host = uri
                    .authority()
                    .ok_or_else(|| format!("aws.endpoint_url {url:?} has no host"))?
                    .to_string();
                if !crate::sign::is_canonical_path(uri.path()) || uri.query().is_some() {
                    return Err(format!(
                        "aws.endpoint_url {url:?}: its path may hold only letters, digits, `-._~` and single slashes, and no query"
                    ));
                }
                Endpoint::Fixed {
                    uri,
                    host: host.into(),
                }
            }
            None => Endpoint::Resolved(Arc::new(Resolved {
                fips: base.use_fips().unwrap_or(false),
                dual_stack: base.use_dual_stack().unwrap_or(false),
                rules: aws_sdk_kinesis::config::endpoint::DefaultResolver::new(),
                hosts: Default::default(),
            })),
        };
        let timeouts = base.timeout_config();
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(
            timeouts
                .and_then(|t| t.connect_timeout())
                .or(Some(Duration::from_secs(3))),
        );
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
            .map_err(|e| format!("cannot load the system's TLS root certificates: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        // The timer lets idle connections be closed in the background; without it the
        // idle timeout is only checked when a connection is taken again.
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(512)
            .build(https);
        let attempt_timeout = timeouts
            .and_then(|t| t.operation_attempt_timeout())
            .unwrap_or(Duration::from_secs(10));
        let reach = crate::reach::Reach::for_attempt_timeout(attempt_timeout);
        if let Some(readiness) = readiness {
            reach.set_readiness(readiness);
        }
        Ok(KinesisApi {
            http,
            endpoint,
            clock,
            reach: Arc::new(reach),
            attempt_timeout,
        })
    }

    /// The clock calls are signed by.
    #[cfg(test)]
    pub(crate) fn clock(&self) -> &Arc<Clock> {
        &self.clock
    }

    /// One `PutRecord`: where the record landed, or the call's error.
    pub async fn put_record(
        &self,
        credentials: &Credentials,
        region: &Region,
        stream: StreamId<'_>,
        entry: Entry<'_>,
        context: &(dyn Fn() -> String + Sync),
    ) -> Result<Written, AwsError> {
        let body = put_record_body(stream, entry);
        let answer = self
            .call(
                credentials,
                region,
                stream,
                Operation::PutRecord,
                body,
                context,
            )
            .await?;
        let out: PutRecordOutput = parse_answer(&answer, Operation::PutRecord, context)?;
        Ok(Written {
            shard_id: out.shard_id,
            sequence_number: out.sequence_number,
        })
    }

    /// One `PutRecords`: each record's result in the order sent (the answer may list
    /// fewer; the caller decides what that means), or the call's error.
    pub async fn put_records(
        &self,
        credentials: &Credentials,
        region: &Region,
        stream: StreamId<'_>,
        entries: &[Entry<'_>],
        context: &(dyn Fn() -> String + Sync),
    ) -> Result<Vec<RecordResult>, AwsError> {
        let body = put_records_body(stream, entries);
        let answer = self
            .call(
                credentials,
                region,
                stream,
                Operation::PutRecords,
                body,
                context,
            )
            .await?;
        let out: PutRecordsOutput = parse_answer(&answer, Operation::PutRecords, context)?;
        Ok(out.records)
    }

    /// `stream`'s shards open for writes, following ListShards' pages (for per-shard
    /// rate limits: listed once per stream, again when a write shows the map is stale,
    /// and every few minutes). At most [`MAX_LIST_SHARDS_PAGES`] pages are read.
    pub async fn open_shards(
        &self,
        credentials: &Credentials,
        region: &Region,
        stream: StreamId<'_>,
        context: &(dyn Fn() -> String + Sync),
    ) -> Result<Vec<OpenShard>, AwsError> {
        let mut shards = Vec::new();
        let mut next: Option<String> = None;
        for _ in 0..MAX_LIST_SHARDS_PAGES {
            // A page after the first names only its token, not the stream; the open
            // shards only (a stream's closed ones can outnumber them many times).
            let body = match &next {
                Some(token) => serde_json::to_vec(&serde_json::json!({ "NextToken": token })),
                None => {
                    let mut body = Vec::with_capacity(64 + stream.len());
                    body.push(b'{');
                    stream.push_field(&mut body);
                    body.extend_from_slice(b",\"ShardFilter\":{\"Type\":\"AT_LATEST\"}}");
                    Ok(body)
                }
            };
            let answer = Box::pin(self.call(
                credentials,
                region,
                stream,
                Operation::ListShards,
                body.unwrap_or_default(),
                context,
            ))
            .await?;
            let page: ListShardsOutput = parse_answer(&answer, Operation::ListShards, context)?;
            shards.extend(page.shards.iter().filter_map(ShardOutput::open));
            match page.next_token {
                Some(token) => next = Some(token),
                None => return Ok(shards),
            }
        }
        Err(AwsError::new(
            context,
            Failure::Malformed,
            "ResponseError",
            &format!("ListShards answered more than {MAX_LIST_SHARDS_PAGES} pages"),
        ))
    }

    /// `DescribeStreamSummary`: the stream's mode, open shards and maximum record size.
    pub async fn describe_stream_summary(
        &self,
        credentials: &Credentials,
        region: &Region,
        stream: StreamId<'_>,
        context: &(dyn Fn() -> String + Sync),
    ) -> Result<StreamSummary, AwsError> {
        let mut body = Vec::with_capacity(32 + stream.len());
        body.push(b'{');
        stream.push_field(&mut body);
        body.push(b'}');
        let answer = Box::pin(self.call(
            credentials,
            region,
            stream,
            Operation::DescribeStreamSummary,
            body,
            context,
        ))
        .await?;
        let out: DescribeStreamSummaryOutput =
            parse_answer(&answer, Operation::DescribeStreamSummary, context)?;
        let s = out.stream_description_summary;
        Ok(StreamSummary {
            on_demand: s
                .stream_mode_details
                .is_some_and(|m| m.stream_mode == "ON_DEMAND"),
            open_shards: s.open_shard_count,
            max_record_bytes: s
                .max_record_size_in_kib
                .unwrap_or(kd_tenants::DEFAULT_MAX_RECORD_KIB)
                as usize
                * 1024,
        })
    }

    /// Signs and sends one call; the answer's body when it is a success. A refusal of
    /// the request's time is sent again at once, signed with the clock corrected by the
    /// refusal's `Date` ([`crate::clock`]).
    async fn call(
        &self,
        credentials: &Credentials,
        region: &Region,
        stream: StreamId<'_>,
        operation: Operation,
        body: Vec<u8>,
        context: &(dyn Fn() -> String + Sync),
    ) -> Result<Bytes, AwsError> {
        let construction = |e: &dyn std::error::Error| AwsError::construction(&context(), e);
        let (uri, host) = self
            .endpoint(region, stream, operation)
            .await
            .map_err(|e| construction(e.as_ref()))?;
        let target = operation.target();
        let body = Bytes::from(body);
        let mut corrected = false;
        loop {
            let signed = crate::sign::sign(
                credentials,
                region.as_str(),
                "kinesis",
                &crate::sign::Call {
                    path: uri.path(),
                    host: host.as_ref(),
                    content_type: CONTENT_TYPE,
                    target,
                    body: &body,
                },
                self.clock.now(),
            );
            let mut request = http::Request::post(uri.clone())
                .header("content-type", CONTENT_TYPE)
                .header("host", host.as_ref())
                .header("user-agent", USER_AGENT)
                .header("x-amz-target", target)
                .header("x-amz-date", signed.amz_date)
                .header("authorization", signed.authorization);
            if let Some(token) = credentials.session_token() {
                request = request.header("x-amz-security-token", token);
            }
            let request = request
                .body(Full::new(body.clone()))
                .map_err(|e| construction(&e))?;

            let (parts, answer) = self.exchange(request, context).await?;
            let date = parts.headers.get(http::header::DATE).map(|v| v.as_bytes());
            if parts.status.is_success() {
                self.clock.observe(date, false);
                self.clock.succeeded();
                return Ok(answer);
            }
            let status = parts.status.as_u16();
            let (code, message) = error_of(&parts.headers, &answer);
            let skewed = crate::errors::is_skew_refusal(code.as_deref(), message.as_deref());
            let failure = if skewed {
                // Corrected once and sent again; a second refusal is retried later.
                if self.clock.observe(date, true) && !corrected {
                    corrected = true;
                    continue;
                }
                Failure::ClockSkew
            } else {
                self.clock.observe(date, false);
                Failure::Service {
                    code: code.as_deref(),
                    status,
                }
            };
            return Err(AwsError::new(
                context,
                failure,
                &code.clone().unwrap_or_else(|| format!("HTTP_{status}")),
                &message.unwrap_or_else(|| format!("HTTP {status}")),
            ));
        }
    }

    /// Sends `request` and reads the answer, at most [`MAX_ANSWER_BYTES`] of it, within
    /// the attempt timeout.
    async fn exchange(
        &self,
        request: http::Request<Full<Bytes>>,
        context: &(dyn Fn() -> String + Sync),
    ) -> Result<(http::response::Parts, Bytes), AwsError> {
        let exchange = async {
            let response = self.http.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, body))
        };
        let outcome = tokio::time::timeout(self.attempt_timeout, exchange).await;
        match &outcome {
            Ok(Ok(_)) => self.reach.answered(),
            Err(_) => self.reach.unanswered(),
            // A connection refused or reset: no answer either. (An answer too long to
            // read was an answer.)
            Ok(Err(e)) if !e.is::<http_body_util::LengthLimitError>() => self.reach.unanswered(),
            Ok(Err(_)) => self.reach.answered(),
        }
        match outcome {
            Err(_) => Err(AwsError::new(
                context,
                Failure::Timeout,
                "Timeout",
                "no response in time",
            )),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(AwsError::new(
                context,
                Failure::Malformed,
                "ResponseError",
                &format!("answer longer than {MAX_ANSWER_BYTES} bytes"),
            )),
            Ok(Err(e)) => Err(AwsError::new(
                context,
                Failure::Network,
                "NetworkError",
                &crate::errors::chain(Some(e.as_ref())),
            )),
            Ok(Ok(answer)) => Ok(answer),
        }
    }

    /// The URI and `Host` of Kinesis for a call on `stream` in `region`.
    async fn endpoint(
        &self,
        region: &Region,
        stream: StreamId<'_>,
        operation: Operation,
    ) -> Result<(http::Uri, Arc<str>), Box<dyn std::error::Error + Send + Sync>> {
        let resolved = match &self.endpoint {
            Endpoint::Fixed { uri, host } => return Ok((uri.clone(), host.clone())),
            Endpoint::Resolved(resolved) => resolved,
        };
        let (account, arn) = match stream {
            StreamId::Arn(arn) => (Some(arn.account_shared()), Some(arn.as_str())),
            StreamId::Name(_) => (None, None),
        };
        let key: HostKey = (region.clone(), account, operation.is_data());
        if let Some((uri, host)) = resolved
            .hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok((uri.clone(), host.clone()));
        }
        use aws_sdk_kinesis::config::endpoint::{Params, ResolveEndpoint};
        let params = Params::builder()
            .region(region.as_str())
            .use_fips(resolved.fips)
            .use_dual_stack(resolved.dual_stack)
            .operation_type(if operation.is_data() {
                "data"
            } else {
                "control"
            })
            .set_stream_arn(arn.map(str::to_owned))
            .build()?;
        let endpoint = resolved.rules.resolve_endpoint(&params).await?;
        let uri: http::Uri = endpoint.url().parse()?;
        let host: Arc<str> = uri
            .authority()
            .ok_or("endpoint without a host")?
            .as_str()
            .into();
        let uri = if uri.path().is_empty() || uri.path() == "/" {
            format!("{}://{host}/", uri.scheme_str().unwrap_or("https")).parse()?
        } else {
            uri
        };
        let mut hosts = resolved.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if hosts.len() >= MAX_HOSTS {
            hosts.clear();
        }
        hosts.insert(key, (uri.clone(), host.clone()));
        Ok((uri, host))
    }
}

/// A success answer's body, or a `ResponseError` (retried, as an unreadable answer is).
fn parse_answer<T: serde::de::DeserializeOwned>(
    answer: &[u8],
    operation: Operation,
    context: &(dyn Fn() -> String + Sync),
) -> Result<T, AwsError> {
    serde_json::from_slice(answer).map_err(|e| {
        AwsError::new(
            context,
            Failure::Malformed,
            "ResponseError",
            &format!("unreadable {} answer: {e}", operation.name()),
        )
    })
}

/// The JSON body of a `PutRecord` call.
fn put_record_body(stream: StreamId<'_>, entry: Entry<'_>) -> Vec<u8> {
    let mut body =
        Vec::with_capacity(64 + stream.len() + entry.key.len() + entry.data.len().div_ceil(3) * 4);
    body.push(b'{');
    stream.push_field(&mut body);
    body.push(b',');
    push_entry_fields(&mut body, entry);
    body.push(b'}');
    body
}

/// The JSON body of a `PutRecords` call.
fn put_records_body(stream: StreamId<'_>, entries: &[Entry<'_>]) -> Vec<u8> {
    let size: usize = entries
        .iter()
        .map(|e| 40 + e.key.len() + e.data.len().div_ceil(3) * 4)
        .sum();
    let mut body = Vec::with_capacity(64 + stream.len() + size);
    body.push(b'{');
    stream.push_field(&mut body);
    body.extend_from_slice(b",\"Records\":[");
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.push(b'{');
        push_entry_fields(&mut body, *entry);
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
    body
}

/// Appends `"PartitionKey":…,"Data":…` for one record (the data base64-encoded).
fn push_entry_fields(body: &mut Vec<u8>, entry: Entry<'_>) {
    body.extend_from_slice(b"\"PartitionKey\":");
    push_json_str(body, entry.key);
    body.extend_from_slice(b",\"Data\":\"");
    let start = body.len();
    body.resize(start + entry.data.len().div_ceil(3) * 4, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(entry.data, &mut body[start..])
        .unwrap_or(0);
    body.truncate(start + written);
    body.push(b'"');
}

/// Appends `s` as a JSON string.
fn push_json_str(body: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *body, s);
}

/// The error code and message of a failed call: the code from `x-amzn-ErrorType` or the
/// body's `__type` (either may carry a namespace before `#` or a URL after `:`).
fn error_of(headers: &http::HeaderMap, body: &[u8]) -> (Option<String>, Option<String>) {
    #[derive(Deserialize, Default)]
    struct ErrorBody {
        #[serde(rename = "__type")]
        kind: Option<String>,
        #[serde(alias = "Message", alias = "errorMessage")]
        message: Option<String>,
    }
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let code = headers
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(parsed.kind)
        .map(|raw| {
            let raw = raw.split(':').next().unwrap_or_default();
            raw.rsplit('#').next().unwrap_or_default().trim().to_owned()
        })
        .filter(|c| !c.is_empty());
    (code, parsed.message)
}

#[cfg(test)]
mod tests;
