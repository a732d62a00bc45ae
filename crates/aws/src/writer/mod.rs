//! One record per event into the tenant's stream, within the stream's capacity: with
//! `PutRecord`, or gathered into `PutRecords` calls for tenants that turned it on.
//!
//! [`put_record`](KinesisWriter::put_record) takes one attempt: a tenant not yet proven
//! to own its stream ([`proofs`]) is written on trial, others within the stream's limits;
//! then a record goes alone ([`single`]: `PutRecord`) or in a batch ([`batched`]:
//! `PutRecords`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kd_event::PartitionKey;
use kd_tenants::TenantSettings;

use crate::api::KinesisApi;
use crate::batch::Batches;
use crate::credentials::CredentialCache;
use crate::errors::{AwsError, ErrorClass};
use crate::limits::RateLimits;
use crate::requests::RequestBudget;

mod batched;
mod proofs;
mod single;

pub use batched::PUT_RECORDS_RETRY_AFTER;
use batched::{Destination, Pending, Refusals};
use proofs::Proofs;

/// Writes records into tenants' streams with their assumed-role credentials.
///
/// A handle (one pointer): every lingering batch and every call in flight holds a clone,
/// and the state itself is over a kilobyte.
#[derive(Clone)]
pub struct KinesisWriter {
    inner: Arc<Shared>,
}

/// What a [`KinesisWriter`] shares.
struct Shared {
    credentials: CredentialCache,
    api: KinesisApi,
    limits: RateLimits,
    /// Caps the requests on the wire at once: every one holds a pooled connection and
    /// its buffers, so thousands of busy lanes would otherwise mean thousands of
    /// connections and hundreds of MiB. One tenant may hold only its share of them.
    requests: Arc<RequestBudget>,
    batches: Arc<Batches<Destination, Pending>>,
    /// How long a `PutRecords` batch stays open for more records.
    linger: Duration,
    /// Destinations whose role refused `PutRecords` (tenants in `auto` mode), and until
    /// when they are written with `PutRecord` instead.
    put_records_refused: Arc<Refusals>,
    /// Tenants proven to own their stream: a write with their credentials was accepted.
    proofs: Proofs,
}

/// How often a write waiting in a trial budget looks whether its tenant was proven.
const PROOF_CHECK: Duration = Duration::from_millis(20);

impl KinesisWriter {
    /// Fails only when the system's TLS root certificates cannot be loaded, or the
    /// configured endpoint is not a URL.
    pub fn new(
        credentials: CredentialCache,
        limits: RateLimits,
        requests: RequestBudget,
        linger: Duration,
    ) -> Result<Self, String> {
        let requests = Arc::new(requests);
        let limits = limits.with_request_budget(requests.clone());
        Ok(KinesisWriter {
            inner: Arc::new(Shared {
                api: KinesisApi::new(
                    credentials.base(),
                    credentials.clock().clone(),
                    credentials.readiness().cloned(),
                )?,
                credentials,
                limits,
                requests,
                batches: Arc::default(),
                linger,
                put_records_refused: Arc::default(),
                proofs: Proofs::default(),
            }),
        })
    }

    /// One attempt to write `data` (the Kafka value, byte for byte) with `key`. The
    /// caller owns retries; on an expired-credentials answer the session is already
    /// dropped here, so the next attempt assumes the role again.
    pub async fn put_record(
        &self,
        tenant: &Arc<TenantSettings>,
        key: &PartitionKey,
        data: &Bytes,
    ) -> Result<(), AwsError> {
        let bytes = data.len() + key.as_str().len();
        let stream = self.inner.limits.stream(tenant);
        let (max, only_the_default) = stream.max_record_bytes(tenant);
        if bytes > max {
            return Err(self
                .too_large(tenant, &stream, bytes, max, only_the_default)
                .await);
        }
        if !self.inner.proofs.holds(tenant) {
            // Its role first: a tenant whose role cannot be assumed spends nothing.
            let session = Box::pin(self.inner.credentials.session(tenant)).await?;
            if Box::pin(self.wait_on_trial(tenant, bytes)).await {
                if self.batches(tenant, bytes) {
                    drop(session);
                    return self.put_batched(tenant, key, data, bytes).await;
                }
                return self.put_one(tenant, key, data, &stream, session).await;
            }
            // Proven while it waited: written as the stream's owner.
        }
        if self.batches(tenant, bytes) {
            // The batch looks the session up once for all its records when it is sent.
            // A record looks it up here only for its stream's shards to be listed with
            // it (a stream new to this worker, or every few minutes).
            let session = if stream.wants_session() {
                Some(Box::pin(self.inner.credentials.session(tenant)).await?)
            } else {
                None
            };
            if let Some(session) = &session {
                stream.refresh_if_due(&self.inner.limits, tenant, (&self.inner.api, session));
            }
            self.inner
                .limits
                .acquire_on(&stream, key.as_str(), bytes)
                .await;
            drop(session);
            return self.put_batched(tenant, key, data, bytes).await;
        }
        // Boxed for the same reason: the cache's lookup is a large future.
        let session = Box::pin(self.inner.credentials.session(tenant)).await?;
        stream.refresh_if_due(&self.inner.limits, tenant, (&self.inner.api, &session));
        self.inner
            .limits
            .acquire_on(&stream, key.as_str(), bytes)
            .await;
        self.put_one(tenant, key, data, &stream, session).await
    }

    /// Waits for room for a record of `bytes` in the trial budget of `tenant`, not yet
    /// proven to own its stream (see [`Proofs`]): true once it took it, false when a
    /// proof arrived meanwhile (a new tenant's first writes wait for the first answer,
    /// then go on at the stream's pace, not the trial's).
    async fn wait_on_trial(&self, tenant: &Arc<TenantSettings>, bytes: usize) -> bool {
        loop {
            if self.inner.proofs.holds(tenant) {
                return false;
            }
            let trial = self.inner.limits.acquire_trial(tenant, bytes);
            if tokio::time::timeout(PROOF_CHECK, trial).await.is_ok() {
                return true;
            }
        }
    }

    /// A write of `tenant` was accepted: its trial, if it had one, is over.
    fn proven(&self, tenant: &Arc<TenantSettings>) {
        if self.inner.proofs.record(tenant) {
            self.inner.limits.end_trial(tenant);
        }
    }

    /// Counts a refused record and slows its shard down when it was throttled.
    fn on_refused(&self, tenant: &TenantSettings, key: &str, err: &AwsError) {
        let m = kd_telemetry::metrics();
        let code = crate::errors::code_label(&err.code);
        m.put_errors.with_label_values(&[code]).inc();
        if let Some(source) = kd_telemetry::source_label(tenant.source_id.as_str()) {
            m.source_put_errors.with_label_values(&[source, code]).inc();
        }
        if err.is_shard_throttle() {
            self.inner.limits.throttled(tenant, key);
        }
    }

    pub fn credentials(&self) -> &CredentialCache {
        &self.inner.credentials
    }

    /// The largest record `tenant`'s stream takes as known now (see
    /// [`StreamLimits::max_record_bytes`](crate::limits::StreamLimits::max_record_bytes)),
    /// for aggregates to stay within it.
    pub fn max_record_bytes(&self, tenant: &TenantSettings) -> usize {
        self.inner.limits.stream(tenant).max_record_bytes(tenant).0
    }

    /// The error for a record over `max`: final when the stream's limit is known, else
    /// retryable while the stream is described (a stream raised to 10 MiB is only
    /// known to be after DescribeStreamSummary).
    async fn too_large(
        &self,
        tenant: &Arc<TenantSettings>,
        stream: &crate::limits::StreamLimits,
        bytes: usize,
        max: usize,
        only_the_default: bool,
    ) -> AwsError {
        let ctx = context("PutRecord", tenant);
        if only_the_default && !self.inner.limits.trial_refused_describe(tenant) {
            if let Ok(session) = Box::pin(self.inner.credentials.session(tenant)).await {
                let asked = (&self.inner.api, &*session);
                if self.inner.proofs.holds(tenant) {
                    stream.refresh_if_due(&self.inner.limits, tenant, asked);
                } else {
                    stream.refresh_for_trial_if_due(&self.inner.limits, tenant, asked);
                }
            }
            return AwsError {
                request_id: None,
                class: ErrorClass::Retryable,
                code: "StreamNotDescribed".into(),
                message: format!("{ctx}: the record is {bytes} bytes and the stream's maximum record size is not known yet (DescribeStreamSummary)"),
            };
        }
        AwsError {
            request_id: None,
            class: ErrorClass::RecordTooLarge,
            code: "RecordTooLarge".into(),
            message: format!("{ctx}: the record is {bytes} bytes (data plus partition key); the stream takes at most {max}"),
        }
    }
}

/// Observes one call's duration, labelled by its outcome.
fn observe_call<T>(started: Instant, result: &Result<T, AwsError>) {
    let outcome = if result.is_ok() { "ok" } else { "error" };
    kd_telemetry::metrics()
        .put_duration
        .with_label_values(&[outcome])
        .observe(started.elapsed().as_secs_f64());
}

fn context(operation: &str, tenant: &TenantSettings) -> String {
    format!(
        "{operation} to stream {} in {}",
        tenant.stream_label(),
        tenant.region
    )
}

#[cfg(test)]
mod memory_tests;
#[cfg(test)]
mod tests;
