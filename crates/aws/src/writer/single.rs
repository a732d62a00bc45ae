//! One record alone: `PutRecord`.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use kd_event::PartitionKey;
use kd_tenants::TenantSettings;

use super::{context, observe_call, KinesisWriter};
use crate::api::{Entry, StreamId};
use crate::credentials::Session;
use crate::errors::{AwsError, ErrorClass};
use crate::limits::StreamLimits;

impl KinesisWriter {
    /// One `PutRecord` call, its tokens taken.
    pub(super) async fn put_one(
        &self,
        tenant: &Arc<TenantSettings>,
        key: &PartitionKey,
        data: &Bytes,
        stream: &StreamLimits,
        session: Arc<Session>,
    ) -> Result<(), AwsError> {
        // Held only for the call itself, never across backoff or rate-limit waits.
        let _permit = self.inner.requests.acquire(tenant).await;
        let started = Instant::now();
        // Boxed: the call's future is over a kilobyte, and this one would otherwise sit
        // in every in-flight event's task, batched ones too (waiting for a new tenant's
        // credentials, a rate limit or their batch).
        let result = Box::pin(self.inner.api.put_record(
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
                    self.inner.proofs.withdraw(tenant);
                }
                self.on_refused(tenant, key.as_str(), &err);
                if err.class == ErrorClass::ExpiredCredentials {
                    Box::pin(self.inner.credentials.invalidate(tenant, &session)).await;
                }
                Err(err)
            }
        }
    }
}
