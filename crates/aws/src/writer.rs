//! One record per event into the tenant's stream, within the stream's capacity: with
//! `PutRecord`, or gathered into `PutRecords` calls for tenants that turned it on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kd_event::PartitionKey;
use kd_tenants::{Access, Region, StreamName, TenantSettings, WriteMode};
use tokio::sync::oneshot;

use crate::api::{Entry, KinesisApi, RecordResult, StreamId};
use crate::batch::Batches;
use crate::credentials::CredentialCache;
use crate::errors::{AwsError, ErrorClass};
use crate::limits::RateLimits;
use crate::requests::RequestBudget;

/// Writes records into tenants' streams with their assumed-role credentials.
///
/// A handle (one pointer): every lingering batch and every call in flight holds a clone,
/// and the state itself is over a kilobyte.
#[derive(Clone)]
pub struct KinesisWriter {
    inner: Arc<Writer>,
}

impl std::ops::Deref for KinesisWriter {
    type Target = Writer;
    fn deref(&self) -> &Writer {
        &self.inner
    }
}

/// What a [`KinesisWriter`] shares.
#[doc(hidden)]
pub struct Writer {
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

/// Which tenants have shown they may write to the stream they name: a `PutRecord` or
/// `PutRecords` call with their credentials was accepted (AWS checks the role, the
/// external ID and the stream's policies before it counts a write against a shard).
///
/// Only a proven tenant spends its stream's shared capacity (the per-shard budgets
/// every tenant of that stream draws on) or lists its shards. Until then its writes
/// draw on a budget of its own ([`RateLimits::acquire_trial`]): a tenant that names
/// someone else's stream, with a role it cannot assume or one the stream does not
/// admit, slows nobody down while its events fail. Keyed by source ID; the proof holds
/// only while the settings name the same identity and stream, and an access-denied
/// answer withdraws it.
struct Proofs(moka::sync::Cache<Arc<str>, Arc<TenantSettings>>);

impl Default for Proofs {
    fn default() -> Self {
        Proofs(
            moka::sync::Cache::builder()
                .time_to_idle(Duration::from_secs(3600))
                .build(),
        )
    }
}

impl Proofs {
    fn holds(&self, tenant: &Arc<TenantSettings>) -> bool {
        self.0
            .get(tenant.source_id.as_str())
            .is_some_and(|proven| Arc::ptr_eq(&proven, tenant) || proven.same_destination(tenant))
    }

    /// Records that `tenant`'s write was accepted: true when it was not proven (with
    /// these very settings) before.
    fn record(&self, tenant: &Arc<TenantSettings>) -> bool {
        let known = self
            .0
            .get(tenant.source_id.as_str())
            .is_some_and(|proven| Arc::ptr_eq(&proven, tenant));
        if !known {
            // The settings in force replace older ones: the next check is a pointer
            // comparison, and the old settings are not kept alive.
            self.0.insert(tenant.source_id.shared(), tenant.clone());
        }
        !known
    }

    fn withdraw(&self, tenant: &TenantSettings) {
        self.0.invalidate(tenant.source_id.as_str());
    }
}

/// How often a write waiting in a trial budget looks whether its tenant was proven.
const PROOF_CHECK: Duration = Duration::from_millis(20);

/// How long a role that refused `PutRecords` is written with `PutRecord` before
/// `PutRecords` is tried again (its policy may have been extended meanwhile).
pub const PUT_RECORDS_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A role (or the stream's resource policy and the source ID it was granted to) and a
/// stream: what a `PutRecords` refusal is remembered for. Resource-policy tenants all
/// sign as the worker's writer role, so one tenant's refusal must not switch batching
/// off for another's grant on the same stream.
type RefusedKey = (
    Access,
    Option<std::sync::Arc<str>>,
    std::sync::Arc<str>,
    Region,
    StreamName,
);

/// The remembered refusals, with their count readable without the lock: every batched
/// record asks, and almost always none is remembered.
#[derive(Default)]
struct Refusals {
    until: Mutex<HashMap<RefusedKey, tokio::time::Instant>>,
    len: std::sync::atomic::AtomicUsize,
}

impl Refusals {
    /// Runs `f` on the map under its lock, and keeps the count in step.
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<RefusedKey, tokio::time::Instant>) -> T) -> T {
        let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut until);
        self.len
            .store(until.len(), std::sync::atomic::Ordering::Relaxed);
        out
    }

    fn is_empty(&self) -> bool {
        self.len.load(std::sync::atomic::Ordering::Relaxed) == 0
    }
}

fn refused_key(tenant: &TenantSettings) -> RefusedKey {
    let grantee = match tenant.access {
        Access::Role(_) => None,
        Access::ResourcePolicy => Some(tenant.source_id.shared()),
    };
    (
        tenant.access.clone(),
        grantee,
        tenant.account.clone(),
        tenant.region.clone(),
        tenant.stream.clone(),
    )
}

/// Where a batch goes: records share a call only with the very same tenant settings
/// (one tenant's role, external ID, region and stream), compared by address. The key
/// holds the settings, so the address cannot be reused while the batch is open. A
/// settings reload starts new batches.
#[derive(Clone)]
struct Destination(Arc<TenantSettings>);

impl PartialEq for Destination {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Destination {}

impl std::hash::Hash for Destination {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state);
    }
}

/// A record waiting in a batch for its call.
struct Pending {
    tenant: Arc<TenantSettings>,
    key: PartitionKey,
    /// Shared with the event it came from, not copied.
    data: Bytes,
    done: oneshot::Sender<Result<(), AwsError>>,
}

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
            inner: Arc::new(Writer {
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

    /// Whether a record of `bytes` for `tenant` goes into a `PutRecords` batch (a
    /// PutRecords call takes records up to the stream's maximum, 10 MiB in all).
    pub fn batches(&self, tenant: &TenantSettings, bytes: usize) -> bool {
        bytes <= crate::batch::MAX_BYTES
            && match tenant.write_mode {
                WriteMode::PutRecord => false,
                WriteMode::PutRecords => true,
                WriteMode::Auto => !self.refuses_put_records(tenant),
            }
    }

    /// Whether `tenant`'s role refused `PutRecords` on its stream within the last hour.
    pub fn refuses_put_records(&self, tenant: &TenantSettings) -> bool {
        // The common case, on every batched record: no role has refused.
        if self.put_records_refused.is_empty() {
            return false;
        }
        let key = refused_key(tenant);
        let now = tokio::time::Instant::now();
        self.put_records_refused
            .with(|refused| match refused.get(&key) {
                Some(until) if *until > now => true,
                Some(_) => {
                    refused.remove(&key);
                    false
                }
                None => false,
            })
    }

    /// Remembers that `tenant`'s role refused `PutRecords`: its records go by
    /// `PutRecord` for [`PUT_RECORDS_RETRY_AFTER`].
    fn remember_put_records_refused(&self, tenant: &TenantSettings) {
        let key = refused_key(tenant);
        let now = tokio::time::Instant::now();
        let new = self.put_records_refused.with(|refused| {
            // Bounded by the roles that refuse: drop the lapsed ones when it grows.
            if refused.len() >= 100_000 {
                refused.retain(|_, until| *until > now);
            }
            refused.insert(key, now + PUT_RECORDS_RETRY_AFTER).is_none()
        });
        if new {
            let role = self
                .credentials
                .role_of(tenant)
                .map(|r| r.as_str())
                .unwrap_or_default();
            tracing::warn!(source_id = %tenant.source_id, role, stream = %tenant.stream_label(), "the role refuses kinesis:PutRecords; writing with PutRecord for an hour");
        }
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
        let stream = self.limits.stream(tenant);
        let (max, only_the_default) = stream.max_record_bytes(tenant);
        if bytes > max {
            return Err(self
                .too_large(tenant, &stream, bytes, max, only_the_default)
                .await);
        }
        if !self.proofs.holds(tenant) {
            // Its role first: a tenant whose role cannot be assumed spends nothing.
            let session = Box::pin(self.credentials.session(tenant)).await?;
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
                Some(Box::pin(self.credentials.session(tenant)).await?)
            } else {
                None
            };
            let lister = session.as_ref().map(|s| (&self.api, &**s));
            self.limits
                .acquire_on(&stream, tenant, key.as_str(), bytes, lister)
                .await;
            drop(session);
            return self.put_batched(tenant, key, data, bytes).await;
        }
        // Boxed for the same reason: the cache's lookup is a large future.
        let session = Box::pin(self.credentials.session(tenant)).await?;
        self.limits
            .acquire_on(
                &stream,
                tenant,
                key.as_str(),
                bytes,
                Some((&self.api, &session)),
            )
            .await;
        self.put_one(tenant, key, data, &stream, session).await
    }

    /// Waits for room for a record of `bytes` in the trial budget of `tenant`, not yet
    /// proven to own its stream (see [`Proofs`]): true once it took it, false when a
    /// proof arrived meanwhile (a new tenant's first writes wait for the first answer,
    /// then go on at the stream's pace, not the trial's).
    async fn wait_on_trial(&self, tenant: &Arc<TenantSettings>, bytes: usize) -> bool {
        loop {
            if self.proofs.holds(tenant) {
                return false;
            }
            let trial = self.limits.acquire_trial(tenant, bytes);
            if tokio::time::timeout(PROOF_CHECK, trial).await.is_ok() {
                return true;
            }
        }
    }

    /// One `PutRecord` call, its tokens taken.
    async fn put_one(
        &self,
        tenant: &Arc<TenantSettings>,
        key: &PartitionKey,
        data: &Bytes,
        stream: &crate::limits::StreamLimits,
        session: Arc<crate::credentials::Session>,
    ) -> Result<(), AwsError> {
        // Held only for the call itself, never across backoff or rate-limit waits.
        let _permit = self.requests.acquire(tenant).await;
        let started = Instant::now();
        // Boxed: the call's future is over a kilobyte, and this one would otherwise sit
        // in every in-flight event's task, batched ones too (waiting for a new tenant's
        // credentials, a rate limit or their batch).
        let result = Box::pin(self.api.put_record(
            session.credentials(),
            &tenant.region,
            StreamId::of(tenant),
            Entry {
                key: key.as_str(),
                data,
            },
            &|| context("PutRecord", tenant),
        ))
        .await;
        observe_call(started, &result);
        match result {
            Ok(written) => {
                self.proven(tenant);
                if let Some(shard) = crate::api::shard_number(&written.shard_id) {
                    stream.landed(key.as_str(), shard);
                }
                Ok(())
            }
            Err(err) => {
                // A throttle is an answer to a call AWS authorised; a refusal withdraws
                // the proof (the role or the stream's policy changed).
                if err.is_shard_throttle() {
                    self.proven(tenant);
                } else if err.is_access_denied() {
                    self.proofs.withdraw(tenant);
                }
                self.on_refused(tenant, key.as_str(), &err);
                if err.class == ErrorClass::ExpiredCredentials {
                    Box::pin(self.credentials.invalidate(tenant, &session)).await;
                }
                Err(err)
            }
        }
    }

    /// Adds the record to its destination's open batch and waits for its own outcome.
    async fn put_batched(
        &self,
        tenant: &Arc<TenantSettings>,
        key: &PartitionKey,
        data: &Bytes,
        bytes: usize,
    ) -> Result<(), AwsError> {
        let destination = Destination(tenant.clone());
        let (done, outcome) = oneshot::channel();
        let pending = Pending {
            tenant: tenant.clone(),
            key: key.clone(),
            data: data.clone(),
            done,
        };
        let added = self.batches.add(destination.clone(), bytes, pending);
        // Sending happens in tasks of its own: a caller that gives up waiting (its
        // partition was revoked) must not strand the other records of its batch.
        for batch in added.ready {
            tokio::spawn(self.clone().send_batch(batch));
        }
        if let Some(id) = added.opened {
            let writer = self.clone();
            // The sending future is boxed once the batch is taken: a lingering batch
            // (one per destination, so up to one per event with many tenants) waits small.
            tokio::spawn(async move {
                tokio::time::sleep(writer.linger).await;
                if let Some(batch) = writer.batches.take(&destination, id) {
                    Box::pin(writer.send_batch(batch)).await;
                }
            });
        }
        outcome.await.unwrap_or_else(|_| {
            Err(AwsError::unknown_outcome(
                &context("PutRecords", tenant),
                "the batch was abandoned",
            ))
        })
    }

    /// One `PutRecords` call; every record learns its own outcome.
    async fn send_batch(self, mut batch: Vec<Pending>) {
        // A record whose caller gave up (its partition was revoked, the worker is
        // stopping) is left out: its partition's next reader writes it.
        batch.retain(|p| !p.done.is_closed());
        let Some(first) = batch.first() else { return };
        let tenant = first.tenant.clone();
        // Boxed: only a batch being sent holds the lookup.
        let session = match Box::pin(self.credentials.session(&tenant)).await {
            Ok(session) => session,
            Err(err) => {
                for p in batch {
                    let _ = p.done.send(Err(err.clone()));
                }
                return;
            }
        };
        let ctx = || context("PutRecords", &tenant);
        // Boxed: a batch waiting for its place stays small.
        let _permit = Box::pin(self.requests.acquire(&tenant)).await;
        // Again: assuming the role or waiting for a permit may have taken a while, and a
        // record of a revoked partition must not land after its new reader's writes.
        batch.retain(|p| !p.done.is_closed());
        if batch.is_empty() {
            return;
        }
        let m = kd_telemetry::metrics();
        m.put_records_batch_records.observe(batch.len() as f64);
        let started = Instant::now();
        let entries: Vec<Entry<'_>> = batch
            .iter()
            .map(|p| Entry {
                key: p.key.as_str(),
                data: &p.data,
            })
            .collect();
        // Boxed: batches waiting for a request permit stay small.
        let result = Box::pin(self.api.put_records(
            session.credentials(),
            &tenant.region,
            StreamId::of(&tenant),
            &entries,
            &ctx,
        ))
        .await;
        drop(entries);
        observe_call(started, &result);
        match result {
            Ok(results) => {
                self.proven(&tenant);
                // One record a call tells a shard map that missed a reshard (every record
                // would cost a hash each).
                if let (Some(first), Some(shard)) =
                    (batch.first(), results.first().and_then(|r| r.shard))
                {
                    self.limits
                        .stream(&tenant)
                        .landed(first.key.as_str(), shard);
                }
                let outcomes = record_outcomes(&results, batch.len(), &ctx);
                for (p, outcome) in batch.into_iter().zip(outcomes) {
                    if let Err(err) = &outcome {
                        self.on_refused(&p.tenant, p.key.as_str(), err);
                    }
                    let _ = p.done.send(outcome);
                }
            }
            Err(err) => {
                if err.class == ErrorClass::ExpiredCredentials {
                    Box::pin(self.credentials.invalidate(&tenant, &session)).await;
                }
                // The role may allow PutRecord only: the records' next attempts use it
                // (each lane retries its own record first, so nothing is reordered), and
                // only a refused PutRecord withdraws the proof.
                if err.refuses_operation() && tenant.write_mode == WriteMode::Auto {
                    self.remember_put_records_refused(&tenant);
                } else if err.is_access_denied() {
                    self.proofs.withdraw(&tenant);
                }
                for p in batch {
                    self.on_refused(&p.tenant, p.key.as_str(), &err);
                    let _ = p.done.send(Err(err.clone()));
                }
            }
        }
    }

    /// A write of `tenant` was accepted: its trial, if it had one, is over.
    fn proven(&self, tenant: &Arc<TenantSettings>) {
        if self.proofs.record(tenant) {
            self.limits.end_trial(tenant);
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
            self.limits.throttled(tenant, key);
        }
    }

    pub fn credentials(&self) -> &CredentialCache {
        &self.credentials
    }

    /// The largest record `tenant`'s stream takes as known now (see
    /// [`StreamLimits::max_record_bytes`](crate::limits::StreamLimits::max_record_bytes)),
    /// for aggregates to stay within it.
    pub fn max_record_bytes(&self, tenant: &TenantSettings) -> usize {
        self.limits.stream(tenant).max_record_bytes(tenant).0
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
        if only_the_default && !self.limits.trial_refused_describe(tenant) {
            if let Ok(session) = Box::pin(self.credentials.session(tenant)).await {
                let asked = (&self.api, &*session);
                if self.proofs.holds(tenant) {
                    stream.refresh_if_due(&self.limits, tenant, asked);
                } else {
                    stream.refresh_for_trial_if_due(&self.limits, tenant, asked);
                }
            }
            return AwsError {
                class: ErrorClass::Retryable,
                code: "StreamNotDescribed".into(),
                message: format!("{ctx}: the record is {bytes} bytes and the stream's maximum record size is not known yet (DescribeStreamSummary)"),
            };
        }
        AwsError {
            class: ErrorClass::RecordTooLarge,
            code: "RecordTooLarge".into(),
            message: format!("{ctx}: the record is {bytes} bytes (data plus partition key); the stream takes at most {max}"),
        }
    }
}

/// Each record's outcome from one PutRecords answer, in the order sent: written, refused
/// with its own error (the call itself succeeded), or, when the answer lists fewer
/// results than `sent` records, unknown (`InternalFailure`, retried).
fn record_outcomes(
    results: &[RecordResult],
    sent: usize,
    ctx: &dyn Fn() -> String,
) -> Vec<Result<(), AwsError>> {
    (0..sent)
        .map(|i| match results.get(i) {
            Some(r) => match &r.error_code {
                Some(code) => Err(AwsError::from_record(
                    &ctx(),
                    code,
                    r.error_message.as_deref(),
                )),
                None => Ok(()),
            },
            None => Err(AwsError::unknown_outcome(
                &ctx(),
                "no result for this record",
            )),
        })
        .collect()
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
mod tests {
    use super::*;

    fn tenant(use_put_records: serde_json::Value) -> TenantSettings {
        kd_tenants::test_settings(serde_json::json!({"stream": "st",
            "maxRecordSizeKiB": 4096, "usePutRecords": use_put_records}))
    }

    fn writer() -> KinesisWriter {
        let base = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        KinesisWriter::new(
            CredentialCache::new(base, crate::CredentialSettings::default()),
            RateLimits::default(),
            RequestBudget::new(8, 1.0, 1.0),
            Duration::from_millis(10),
        )
        .unwrap()
    }

    /// Every event in flight holds a `put_record` future in its task, and every batch a
    /// `send_batch` future and a writer: at 20,000 events in flight a kilobyte each is
    /// 20 MB. The large parts (the HTTP call, a credential lookup, an invalidation) are
    /// boxed only while they run.
    #[tokio::test]
    async fn what_each_event_and_batch_in_flight_holds_stays_small() {
        let w = writer();
        assert_eq!(
            std::mem::size_of::<KinesisWriter>(),
            std::mem::size_of::<usize>()
        );
        let t = Arc::new(tenant(serde_json::Value::Null));
        let key = PartitionKey::new("u").unwrap();
        let data = Bytes::from(vec![1u8; 10]);
        let put = w.put_record(&t, &key, &data);
        assert!(
            std::mem::size_of_val(&put) <= 768,
            "put_record's future: {} bytes",
            std::mem::size_of_val(&put)
        );
        let batch = w.clone().send_batch(Vec::new());
        assert!(
            std::mem::size_of_val(&batch) <= 512,
            "send_batch's future: {} bytes",
            std::mem::size_of_val(&batch)
        );
    }

    #[test]
    fn records_up_to_10_mib_of_batching_tenants_are_batched() {
        let w = writer();
        let (auto, on, off) = (
            tenant(serde_json::Value::Null),
            tenant(true.into()),
            tenant(false.into()),
        );
        assert_eq!(auto.write_mode, WriteMode::Auto, "auto by default");
        assert_eq!(tenant("auto".into()).write_mode, WriteMode::Auto);
        assert!(w.batches(&auto, 1024 * 1024));
        assert!(w.batches(&on, 1024 * 1024));
        // A PutRecords request takes records up to 10 MiB (a stream raised to it).
        assert!(w.batches(&on, 10 * 1024 * 1024));
        assert!(!w.batches(&on, 10 * 1024 * 1024 + 1));
        assert!(!w.batches(&off, 10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_role_that_refused_put_records_is_written_record_by_record_for_an_hour() {
        let w = writer();
        let (auto, on) = (tenant(serde_json::Value::Null), tenant(true.into()));
        w.remember_put_records_refused(&auto);
        assert!(!w.batches(&auto, 10));
        assert!(
            w.batches(&on, 10),
            "true forces PutRecords whatever was refused"
        );
        tokio::time::advance(PUT_RECORDS_RETRY_AFTER - Duration::from_secs(1)).await;
        assert!(!w.batches(&auto, 10));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            w.batches(&auto, 10),
            "PutRecords is tried again after an hour"
        );
    }

    /// 600 records of a new tenant, written at once into a stream of 20 shards: the
    /// first answer proves the tenant, and the records still waiting for its trial
    /// budget (one shard's, 950 a second) go on at the stream's pace instead.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_tenants_waiting_writes_leave_the_trial_once_one_is_accepted() {
        let fake = kd_testkit::FakeAws::start().await;
        fake.create_stream("wide", 20);
        let cache = crate::credentials::cache_tests::cache(&fake, Default::default());
        let w = KinesisWriter::new(
            cache,
            RateLimits::default(),
            RequestBudget::new(64, 1.0, 1.0),
            Duration::from_millis(5),
        )
        .unwrap();
        let t = Arc::new(kd_tenants::test_settings(
            serde_json::json!({"sourceId": "s_new", "stream": "wide", "shards": 20}),
        ));
        let started = Instant::now();
        let writes: Vec<_> = (0..600)
            .map(|i| {
                let (w, t) = (w.clone(), t.clone());
                tokio::spawn(async move {
                    let key = PartitionKey::new(&format!("user-{i}")).unwrap();
                    w.put_record(&t, &key, &Bytes::from_static(b"{}")).await
                })
            })
            .collect();
        for write in writes {
            write.await.unwrap().unwrap();
        }
        let took = started.elapsed();
        assert_eq!(fake.records_of("wide").len(), 600);
        // All 600 on trial would take 600 / 950 s, less the burst: over half a second.
        assert!(
            took < Duration::from_millis(400),
            "{took:?}: the writes stayed on trial"
        );
        assert!(w.proofs.holds(&t));
    }

    fn written() -> RecordResult {
        RecordResult {
            shard: None,
            error_code: None,
            error_message: None,
        }
    }

    fn refused(code: &str) -> RecordResult {
        RecordResult {
            shard: None,
            error_code: Some(code.into()),
            error_message: Some("Rate exceeded for shard".into()),
        }
    }

    #[test]
    fn each_record_of_a_put_records_answer_gets_its_own_outcome_in_order() {
        let results = [
            written(),
            refused("ProvisionedThroughputExceededException"),
            written(),
            refused("KMSAccessDeniedException"),
        ];
        let out = record_outcomes(&results, 4, &|| "PutRecords to stream st".into());
        assert!(out[0].is_ok());
        let throttled = out[1].as_ref().unwrap_err();
        assert_eq!(throttled.code, "ProvisionedThroughputExceededException");
        assert_eq!(throttled.class, ErrorClass::Retryable);
        assert!(out[2].is_ok());
        let kms = out[3].as_ref().unwrap_err();
        assert_eq!(kms.class, ErrorClass::Permanent, "{kms}");
        assert!(kms.message.starts_with("PutRecords to stream st"), "{kms}");
    }

    #[test]
    fn records_missing_from_the_answer_are_retried_not_taken_as_written() {
        let out = record_outcomes(&[written()], 3, &|| "ctx".into());
        assert!(out[0].is_ok());
        for missing in &out[1..] {
            let e = missing.as_ref().unwrap_err();
            assert_eq!(e.code, "InternalFailure");
            assert_eq!(e.class, ErrorClass::Retryable);
        }
    }

    /// Every event waiting for its write holds this future in its lane's task: with
    /// 20,000 in flight, each KiB is 20 MiB. The SDK's STS call inside (~13 KiB) is
    /// boxed and only allocated while a role is being assumed.
    #[test]
    fn a_write_waiting_in_its_lane_holds_a_small_future() {
        let w = writer();
        let t = Arc::new(tenant(serde_json::Value::Null));
        let key = PartitionKey::new("k").unwrap();
        let data = Bytes::from_static(b"x");
        let write = w.put_record(&t, &key, &data);
        let size = std::mem::size_of_val(&write);
        assert!(size <= 4096, "{size} bytes");
        let session = w.credentials.session(&t);
        assert!(std::mem::size_of_val(&session) <= 1024);
    }
}
