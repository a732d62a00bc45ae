//! The Kinesis calls made for every event, `PutRecord` and `PutRecords`, and for every
//! stream, `ListShards` and `DescribeStreamSummary`: a JSON body written directly
//! ([`wire`]), signed with SigV4 (`sign.rs`) with the tenant's session credentials, sent
//! over one pooled HTTP client shared by every tenant and region. No SDK client per
//! session: a cached session is its credentials only. Calls made now and then (`check`,
//! `tail`, STS) go through the SDK.
//!
//! Owns the wire format only: which failures are retried is [`crate::errors`]'s call.

use std::sync::Arc;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_credential_types::Credentials;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kd_tenants::Region;

use crate::clock::Clock;
use crate::errors::{AwsError, Failure};

mod wire;

use wire::{
    error_of, parse_answer, put_record_body, put_records_body, DescribeStreamSummaryOutput,
    ListShardsOutput, Operation, PutRecordOutput, PutRecordsOutput, ShardOutput,
};
pub use wire::{shard_number, Entry, OpenShard, RecordResult, StreamId, StreamSummary, Written};

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
            )
            .with_request_id(&parts.headers));
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

#[cfg(test)]
mod tests;
