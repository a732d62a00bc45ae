//! One `PutRecord` per event into the tenant's stream, within the stream's capacity.

use std::sync::Arc;
use std::time::Instant;

use aws_sdk_kinesis::primitives::Blob;
use kd_event::PartitionKey;
use kd_tenants::TenantSettings;

use crate::credentials::CredentialCache;
use crate::errors::{AwsError, ErrorClass};
use crate::limits::RateLimits;
use crate::requests::RequestBudget;

/// Where a record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub shard_id: String,
    pub sequence_number: String,
}

/// Writes records into tenants' streams with their assumed-role credentials.
#[derive(Clone)]
pub struct KinesisWriter {
    credentials: CredentialCache,
    limits: RateLimits,
    /// Caps the requests on the wire at once: every one holds a pooled connection and
    /// its buffers, so thousands of busy lanes would otherwise mean thousands of
    /// connections and hundreds of MiB. One tenant may hold only its share of them.
    requests: Arc<RequestBudget>,
}

impl KinesisWriter {
    pub fn new(credentials: CredentialCache, limits: RateLimits, requests: RequestBudget) -> Self {
        KinesisWriter {
            credentials,
            limits,
            requests: Arc::new(requests),
        }
    }

    /// One attempt to write `data` (the Kafka value, byte for byte) with `key`. The
    /// caller owns retries; on an expired-credentials answer the session is already
    /// dropped here, so the next attempt assumes the role again.
    pub async fn put_record(
        &self,
        tenant: &TenantSettings,
        key: &PartitionKey,
        data: &[u8],
    ) -> Result<Written, AwsError> {
        let session = self.credentials.session(tenant).await?;
        let client = session.kinesis(&tenant.region);
        self.limits
            .acquire(
                tenant,
                key.as_str(),
                data.len() + key.as_str().len(),
                Some(&client),
            )
            .await;
        let m = kd_telemetry::metrics();
        // Held only for the call itself, never across backoff or rate-limit waits.
        let _permit = self.requests.acquire(&tenant.source_id.shared()).await;
        let started = Instant::now();
        let result = client
            .put_record()
            .stream_name(tenant.stream.as_str())
            .partition_key(key.as_str())
            .data(Blob::new(data))
            .send()
            .await;
        let elapsed = started.elapsed().as_secs_f64();
        match result {
            Ok(out) => {
                m.put_duration.with_label_values(&["ok"]).observe(elapsed);
                Ok(Written {
                    shard_id: out.shard_id().to_owned(),
                    sequence_number: out.sequence_number().to_owned(),
                })
            }
            Err(e) => {
                let err = AwsError::from_sdk(
                    &format!("PutRecord to stream {} in {}", tenant.stream, tenant.region),
                    &e,
                );
                m.put_duration
                    .with_label_values(&["error"])
                    .observe(elapsed);
                m.put_errors.with_label_values(&[&err.code]).inc();
                if let Some(source) = kd_telemetry::source_label(tenant.source_id.as_str()) {
                    m.source_put_errors
                        .with_label_values(&[source, &err.code])
                        .inc();
                }
                if err.class == ErrorClass::ExpiredCredentials {
                    self.credentials.invalidate(tenant).await;
                }
                if err.code == "ProvisionedThroughputExceededException" {
                    self.limits.throttled(tenant, key.as_str());
                }
                Err(err)
            }
        }
    }

    pub fn credentials(&self) -> &CredentialCache {
        &self.credentials
    }
}
