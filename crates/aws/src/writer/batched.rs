//! Records gathered into `PutRecords` calls: per destination, for up to the linger
//! time; each record learns its own outcome, and a role that refuses `PutRecords` is
//! written with `PutRecord` for a while (tenants in `auto` mode).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kd_event::PartitionKey;
use kd_tenants::{Access, Region, StreamName, TenantSettings, WriteMode};
use tokio::sync::oneshot;

use super::{context, observe_call, KinesisWriter};
use crate::api::{Entry, RecordResult, StreamId};
use crate::errors::{AwsError, ErrorClass};

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
pub(super) struct Refusals {
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
pub(super) struct Destination(Arc<TenantSettings>);

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
pub(super) struct Pending {
    tenant: Arc<TenantSettings>,
    key: PartitionKey,
    /// Shared with the event it came from, not copied.
    data: Bytes,
    done: oneshot::Sender<Result<(), AwsError>>,
}

impl KinesisWriter {
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
        if self.inner.put_records_refused.is_empty() {
            return false;
        }
        let key = refused_key(tenant);
        let now = tokio::time::Instant::now();
        self.inner
            .put_records_refused
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
    pub(super) fn remember_put_records_refused(&self, tenant: &TenantSettings) {
        let key = refused_key(tenant);
        let now = tokio::time::Instant::now();
        let new = self.inner.put_records_refused.with(|refused| {
            // Bounded by the roles that refuse: drop the lapsed ones when it grows.
            if refused.len() >= 100_000 {
                refused.retain(|_, until| *until > now);
            }
            refused.insert(key, now + PUT_RECORDS_RETRY_AFTER).is_none()
        });
        if new {
            let role = self
                .inner
                .credentials
                .role_of(tenant)
                .map(|r| r.as_str())
                .unwrap_or_default();
            tracing::warn!(source_id = %tenant.source_id, role, stream = %tenant.stream_label(), "the role refuses kinesis:PutRecords; writing with PutRecord for an hour");
        }
    }

    /// Adds the record to its destination's open batch and waits for its own outcome.
    pub(super) async fn put_batched(
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
        let added = self.inner.batches.add(destination.clone(), bytes, pending);
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
                tokio::time::sleep(writer.inner.linger).await;
                if let Some(batch) = writer.inner.batches.take(&destination, id) {
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
    pub(super) async fn send_batch(self, mut batch: Vec<Pending>) {
        // A record whose caller gave up (its partition was revoked, the worker is
        // stopping) is left out: its partition's next reader writes it.
        batch.retain(|p| !p.done.is_closed());
        let Some(first) = batch.first() else { return };
        let tenant = first.tenant.clone();
        // Boxed: only a batch being sent holds the lookup.
        let session = match Box::pin(self.inner.credentials.session(&tenant)).await {
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
        let _permit = Box::pin(self.inner.requests.acquire(&tenant)).await;
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
        let result = Box::pin(self.inner.api.put_records(
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
                    self.inner
                        .limits
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
                    Box::pin(self.inner.credentials.invalidate(&tenant, &session)).await;
                }
                // The role may allow PutRecord only: the records' next attempts use it
                // (each lane retries its own record first, so nothing is reordered), and
                // only a refused PutRecord withdraws the proof.
                if err.refuses_operation() && tenant.write_mode == WriteMode::Auto {
                    self.remember_put_records_refused(&tenant);
                } else if err.is_access_denied() {
                    self.inner.proofs.withdraw(&tenant);
                }
                for p in batch {
                    self.on_refused(&p.tenant, p.key.as_str(), &err);
                    let _ = p.done.send(Err(err.clone()));
                }
            }
        }
    }
}

/// Each record's outcome from one PutRecords answer, in the order sent: written, refused
/// with its own error (the call itself succeeded), or, when the answer lists fewer
/// results than `sent` records, unknown (`InternalFailure`, retried).
pub(super) fn record_outcomes(
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
