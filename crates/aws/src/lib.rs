//! Deliver: everything that talks to AWS on a tenant's behalf.
//!
//! - [`credentials`]: STS AssumeRole into the tenant's role with its external ID, cached
//!   per (role, external ID) until shortly before the credentials expire, concurrent
//!   misses coalesced, failures remembered briefly.
//! - [`limits`]: a records/s and bytes/s budget per stream, from its shard count.
//! - [`requests`]: how many requests may be on the wire, in all and per tenant.
//! - [`shards`]: listing a stream's shards, and reading its records back (`tail`).
//! - [`writer`]: one record per event, with the stream's capacity respected: by
//!   `PutRecord`, or gathered into `PutRecords` calls ([`batch`]) where a tenant asks.
//! - [`errors`]: the one place that decides which AWS failures are worth retrying.
//!
//! - [`api`]: the `PutRecord` and `PutRecords` calls themselves, signed per call with
//!   the tenant's credentials over one connection pool (no SDK client per tenant).
//!
//! The SDK clients (STS, and Kinesis for listing shards) share one HTTP connection pool
//! (they are built from one `SdkConfig`), and the SDK's own retries are off: the
//! pipeline retries with its own policy so that order, metrics and the retry window stay
//! in one place.

pub mod aggregate;
pub mod api;
pub mod batch;
pub mod clock;
pub mod credentials;
pub mod errors;
pub mod limits;
pub mod msk_iam;
pub mod reach;
pub mod requests;
pub mod sdk_calls;
pub mod shards;
mod sign;
pub mod writer;

use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;

pub use credentials::{CredentialCache, CredentialSettings};
pub use errors::{classify, AwsError, ErrorClass, Failure};
pub use limits::RateLimits;
pub use requests::RequestBudget;
pub use writer::KinesisWriter;

/// How the worker reaches AWS.
#[derive(Debug, Clone)]
pub struct AwsSettings {
    /// One endpoint for STS and Kinesis (LocalStack, moto); `None` for the real AWS.
    pub endpoint_url: Option<String>,
    /// Time allowed for one HTTP attempt.
    pub api_timeout: Duration,
    pub connect_timeout: Duration,
    /// AWS's FIPS endpoints.
    pub use_fips: bool,
    /// AWS's dual-stack endpoints.
    pub use_dual_stack: bool,
}

/// The worker's own AWS configuration: its identity from the standard credential chain
/// (environment, profile, web identity, instance metadata), the optional endpoint, no
/// SDK-level retries.
pub async fn base_config(settings: &AwsSettings) -> SdkConfig {
    // Every tenant client sets its own region; this one only serves as a default, so it
    // is not looked up from instance metadata (which would warn on every start).
    let region = std::env::var("AWS_REGION")
        .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
        .map(Region::new)
        .unwrap_or_else(|_| Region::from_static("us-east-1"));
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .use_fips(settings.use_fips)
        .use_dual_stack(settings.use_dual_stack)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(settings.connect_timeout)
                .operation_attempt_timeout(settings.api_timeout)
                .build(),
        );
    if let Some(url) = &settings.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}
