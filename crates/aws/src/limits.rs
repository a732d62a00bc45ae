//! Stream capacity: Kinesis accepts at most 1,000 records/s and 1 MiB/s per shard.
//!
//! One pair of token buckets (records, bytes) per stream, sized from the tenant's
//! `shards` setting. Writing within capacity avoids `ProvisionedThroughputExceeded`
//! instead of retrying after it.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use kd_tenants::TenantSettings;
use moka::sync::Cache;

/// Per-shard write capacity of Kinesis Data Streams.
pub const RECORDS_PER_SHARD_PER_SEC: u32 = 1_000;
pub const BYTES_PER_SHARD_PER_SEC: u32 = 1024 * 1024;

struct StreamLimiter {
    records: DefaultDirectRateLimiter,
    bytes: DefaultDirectRateLimiter,
    byte_burst: NonZeroU32,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct StreamKey {
    account: Arc<str>,
    region: Arc<str>,
    stream: Arc<str>,
    shards: u32,
}

/// Rate limiters for every stream written to, dropped after a while unused.
#[derive(Clone)]
pub struct RateLimits {
    streams: Cache<StreamKey, Arc<StreamLimiter>>,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits::new(Duration::from_secs(600))
    }
}

impl RateLimits {
    pub fn new(idle: Duration) -> Self {
        RateLimits {
            streams: Cache::builder().time_to_idle(idle).build(),
        }
    }

    /// Waits until the tenant's stream has room for one record of `bytes` bytes.
    pub async fn acquire(&self, tenant: &TenantSettings, bytes: usize) {
        let key = StreamKey {
            account: tenant.role.account().into(),
            region: tenant.region.as_str().into(),
            stream: tenant.stream.as_str().into(),
            shards: tenant.shards,
        };
        let limiter = self
            .streams
            .get_with(key, || Arc::new(StreamLimiter::new(tenant.shards)));
        let started = Instant::now();
        limiter.records.until_ready().await;
        // A record larger than a whole second's budget (10 MiB records on a 1-shard
        // stream) waits for a full budget rather than failing.
        let n = u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, limiter.byte_burst.get());
        let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        // `n` is capped at the burst size, so the only error (InsufficientCapacity)
        // cannot happen.
        let _ = limiter.bytes.until_n_ready(n).await;
        let waited = started.elapsed();
        if waited > Duration::from_micros(100) {
            kd_telemetry::metrics()
                .rate_limit_wait_seconds
                .inc_by(waited.as_secs_f64());
        }
    }
}

impl StreamLimiter {
    fn new(shards: u32) -> Self {
        let shards = shards.max(1);
        let records = NonZeroU32::new(RECORDS_PER_SHARD_PER_SEC.saturating_mul(shards))
            .unwrap_or(NonZeroU32::MIN);
        let bytes = NonZeroU32::new(BYTES_PER_SHARD_PER_SEC.saturating_mul(shards))
            .unwrap_or(NonZeroU32::MIN);
        StreamLimiter {
            records: RateLimiter::direct(Quota::per_second(records)),
            bytes: RateLimiter::direct(Quota::per_second(bytes)),
            byte_burst: bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(shards: u32) -> TenantSettings {
        kd_tenants::parse_tenant(&serde_json::json!({"sourceId": "s",
            "roleAddress": "arn:aws:iam::123456789012:role/r",
            "region": "us-east-1", "stream": "st", "shards": shards}))
        .unwrap()
    }

    #[tokio::test]
    async fn one_shard_allows_a_second_of_burst_then_paces_records() {
        let limits = RateLimits::default();
        let t = tenant(1);
        let started = Instant::now();
        for _ in 0..1500 {
            limits.acquire(&t, 10).await;
        }
        let took = started.elapsed();
        // 1,000 burst, then 500 more at 1,000/s.
        assert!(took >= Duration::from_millis(450), "{took:?}");
    }

    #[test]
    fn capacity_scales_with_shards() {
        let four = StreamLimiter::new(4);
        let n = NonZeroU32::new(4 * RECORDS_PER_SHARD_PER_SEC).unwrap();
        assert!(four.records.check_n(n).is_ok_and(|r| r.is_ok()));
        let one = StreamLimiter::new(1);
        assert!(
            one.records.check_n(n).is_err(),
            "4,000 records exceed one shard's burst"
        );
        assert_eq!(four.byte_burst.get(), 4 * BYTES_PER_SHARD_PER_SEC);
    }

    #[tokio::test]
    async fn bytes_are_limited_too() {
        let limits = RateLimits::default();
        let t = tenant(1);
        let started = Instant::now();
        // 1.5 MiB through a 1 MiB/s stream.
        for _ in 0..3 {
            limits.acquire(&t, 512 * 1024).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(400));
    }
}
