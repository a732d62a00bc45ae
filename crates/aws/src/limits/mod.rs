//! Stream capacity: Kinesis accepts at most 1,000 records/s and 1 MiB/s per shard.
//!
//! Every stream's budget comes from its open shards. Where the role may call
//! `ListShards`, the budget is kept per shard: each partition key is mapped to its shard
//! (the MD5 of the key, as a 128-bit number, falls in one open shard's hash-key range),
//! so a hot user cannot push one shard past its limit while the stream as a whole looks
//! idle. Until the shards are listed (or where listing is refused) the stream-wide
//! budget is the tenant's `shards`, else `DescribeStreamSummary`'s open shard count,
//! else one shard. On-demand streams and resharding move shards under us: the map is
//! listed again when Kinesis throttles a shard (once the map is 10 s old), when a write
//! lands on a shard the map does not have (a split or merge closed ours), and every few
//! minutes.
//!
//! `DescribeStreamSummary` also gives the stream's maximum record size (1 to 10 MiB);
//! it is asked once per stream and every ten minutes, at most 10 times a second per
//! account (AWS allows 20).
//!
//! Budgets adapt (AIMD): a `ProvisionedThroughputExceeded` answer cuts by a fifth the budget of
//! the shard (or stream) it concerned, and every second without one gives back a tenth
//! of the full rate. `fraction` scales every budget, for a tenant whose stream is written
//! by several pods at once.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use governor::DefaultDirectRateLimiter;
use kd_tenants::{Region, StreamName, TenantSettings};
use moka::sync::Cache;

mod bucket;
mod listing;
mod stream;

use bucket::Bucket;
pub use stream::{RetryPeriods, StreamLimits};
use stream::{ShardBudget, ShardMap, StreamLimiter, Summary, Trial};

/// Per-shard write capacity of Kinesis Data Streams.
pub const RECORDS_PER_SHARD_PER_SEC: u32 = 1_000;
pub const BYTES_PER_SHARD_PER_SEC: u32 = 1024 * 1024;

/// Shares the tenant's own strings. Looked up per event through [`StreamKeyRef`],
/// which hashes the same: a hit clones and allocates nothing.
#[derive(Clone, PartialEq, Eq)]
struct StreamKey {
    account: Arc<str>,
    region: Region,
    stream: StreamName,
}

impl StreamKey {
    fn as_ref(&self) -> StreamKeyRef<'_> {
        // Destructured: a field added to the key must be added to the borrowed key too,
        // or lookups would match another stream's limiter.
        let StreamKey {
            account,
            region,
            stream,
        } = self;
        StreamKeyRef {
            account,
            region: region.as_str(),
            stream: stream.as_str(),
        }
    }
}

impl Hash for StreamKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_ref().hash(state);
    }
}

/// A [`StreamKey`] borrowed from a tenant's settings: the stream's account, region and
/// name, however the settings named it (`streamArn`, or `stream` and `region` with the
/// role's account).
#[derive(PartialEq, Eq, Hash)]
struct StreamKeyRef<'a> {
    account: &'a str,
    region: &'a str,
    stream: &'a str,
}

impl<'a> StreamKeyRef<'a> {
    fn of(tenant: &'a TenantSettings) -> Self {
        StreamKeyRef {
            account: &tenant.account,
            region: tenant.region.as_str(),
            stream: tenant.stream.as_str(),
        }
    }
}

impl moka::Equivalent<StreamKey> for StreamKeyRef<'_> {
    fn equivalent(&self, key: &StreamKey) -> bool {
        *self == key.as_ref()
    }
}

/// The 128-bit hash Kinesis maps a partition key to a shard with.
pub fn hash_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(md5::compute(partition_key.as_bytes()).0)
}

/// Rate limiters for every stream written to, dropped after a while unused.
#[derive(Clone)]
pub struct RateLimits {
    streams: Cache<StreamKey, Arc<StreamLimiter>, hashbrown::DefaultHashBuilder>,
    /// Tenants on trial, by source ID.
    trials: Cache<Arc<str>, Arc<Trial>>,
    fraction: f64,
    /// DescribeStreamSummary's budget per account.
    describes: Cache<Arc<str>, Arc<DefaultDirectRateLimiter>>,
    retry: RetryPeriods,
    /// The writes' request places: a listing or a description holds one of the asking
    /// tenant's while it runs.
    requests: Option<Arc<crate::requests::RequestBudget>>,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits::new(1.0)
    }
}

impl RateLimits {
    /// `fraction` (0 to 1) of each stream's capacity is used by this process.
    pub fn new(fraction: f64) -> Self {
        RateLimits {
            streams: Cache::builder()
                .time_to_idle(Duration::from_secs(600))
                .build_with_hasher(hashbrown::DefaultHashBuilder::default()),
            trials: Cache::builder()
                .time_to_idle(Duration::from_secs(600))
                .build(),
            fraction: fraction.clamp(0.001, 1.0),
            describes: Cache::builder()
                .time_to_idle(Duration::from_secs(60))
                .build(),
            retry: RetryPeriods::default(),
            requests: None,
        }
    }

    /// Listings and descriptions take their places from `requests`, as writes do.
    pub fn with_request_budget(mut self, requests: Arc<crate::requests::RequestBudget>) -> Self {
        self.requests = Some(requests);
        self
    }

    /// When refused or failed listings are tried again (shorter in tests).
    pub fn with_retry_periods(mut self, retry: RetryPeriods) -> Self {
        self.retry = retry;
        self
    }

    /// A stream-wide budget for `shards` open shards.
    fn stream_bucket(&self, shards: u32) -> Bucket {
        let shards = shards.max(1) as f64;
        Bucket::new(
            RECORDS_PER_SHARD_PER_SEC as f64 * shards * self.fraction,
            BYTES_PER_SHARD_PER_SEC as f64 * shards * self.fraction,
        )
    }

    fn limiter(&self, tenant: &TenantSettings) -> Arc<StreamLimiter> {
        let found = self.streams.get(&StreamKeyRef::of(tenant));
        if let Some(limiter) = found {
            return limiter;
        }
        let key = StreamKey {
            account: tenant.account.clone(),
            region: tenant.region.clone(),
            stream: tenant.stream.clone(),
        };
        self.streams.get_with(key, || {
            Arc::new(StreamLimiter {
                stream: ArcSwap::from_pointee(self.stream_bucket(tenant.shards.unwrap_or(1))),
                shards: ArcSwap::from_pointee(ShardMap::Unknown),
                listing: AtomicBool::new(false),
                listed: tokio::sync::Notify::new(),
                retry_at: AtomicU64::new(0),
                stale: AtomicBool::new(false),
                summary: ArcSwap::from_pointee(Summary::NotAsked),
            })
        })
    }

    fn trial(&self, tenant: &TenantSettings) -> Arc<Trial> {
        if let Some(trial) = self.trials.get(tenant.source_id.as_str()) {
            return trial;
        }
        self.trials.get_with(tenant.source_id.shared(), || {
            Arc::new(Trial {
                bucket: Bucket::new(
                    RECORDS_PER_SHARD_PER_SEC as f64 * self.fraction,
                    BYTES_PER_SHARD_PER_SEC as f64 * self.fraction,
                ),
                retry_at: AtomicU64::new(0),
                describe_refused: AtomicBool::new(false),
            })
        })
    }

    /// Waits until `tenant`, on trial, has room for a record of `bytes` bytes in its
    /// own budget of one shard: until a write shows the tenant owns its stream, it
    /// spends none of the stream's shared capacity.
    pub async fn acquire_trial(&self, tenant: &TenantSettings, bytes: usize) {
        let trial = self.trial(tenant);
        if let Some(since) = trial.bucket.acquire(bytes).await {
            kd_telemetry::metrics()
                .rate_limit_wait_seconds
                .inc_by(since.elapsed().as_secs_f64());
        }
    }

    /// `tenant` was proven to own its stream: its trial budget is dropped.
    pub fn end_trial(&self, tenant: &TenantSettings) {
        self.trials.invalidate(tenant.source_id.as_str());
    }

    /// Whether `tenant`, on trial, was refused DescribeStreamSummary: its records are
    /// then held to the default maximum size (or its own `maxRecordSizeKiB`), as a
    /// proven owner's are when refused.
    pub fn trial_refused_describe(&self, tenant: &TenantSettings) -> bool {
        self.trials
            .get(tenant.source_id.as_str())
            .is_some_and(|t| t.describe_refused.load(Ordering::Relaxed))
    }

    /// The limits of `tenant`'s stream, for [`acquire_on`](Self::acquire_on).
    pub fn stream(&self, tenant: &TenantSettings) -> StreamLimits {
        StreamLimits(self.limiter(tenant))
    }

    /// Waits until the shard of `partition_key` (or the stream, while its shards are
    /// unknown) has room for a record of `bytes` bytes. Lists nothing: the writer asks
    /// for a listing when due ([`StreamLimits::refresh_if_due`]).
    pub async fn acquire(&self, tenant: &TenantSettings, partition_key: &str, bytes: usize) {
        let limiter = self.stream(tenant);
        self.acquire_on(&limiter, partition_key, bytes).await
    }

    /// [`acquire`](Self::acquire) on the stream's limits already looked up.
    pub async fn acquire_on(
        &self,
        StreamLimits(limiter): &StreamLimits,
        partition_key: &str,
        bytes: usize,
    ) {
        // When this write first had to wait (`Instant::now` is read only then).
        let mut waited: Option<Instant> = None;
        // The first writes wait (briefly) for the shard map rather than spend the
        // stream-wide budget, which could overrun one shard.
        if matches!(**limiter.shards.load(), ShardMap::Unknown) {
            let listed = limiter.listed.notified();
            tokio::pin!(listed);
            // Registered before the check, so a listing that ends in between still
            // wakes us.
            listed.as_mut().enable();
            if matches!(**limiter.shards.load(), ShardMap::Unknown)
                && limiter.listing.load(Ordering::Acquire)
            {
                waited = Some(Instant::now());
                let _ = tokio::time::timeout(Duration::from_secs(2), listed).await;
            }
        }
        let map = limiter.shards.load();
        let stream = limiter.stream.load();
        let bucket = match &**map {
            ShardMap::Known { shards, .. } => match find_shard(shards, hash_key(partition_key)) {
                Some(shard) => &shard.bucket,
                None => &**stream,
            },
            _ => &**stream,
        };
        let bucket_waited = bucket.acquire(bytes).await;
        if let Some(since) = waited.or(bucket_waited) {
            let waited = since.elapsed();
            if waited > Duration::from_micros(100) {
                kd_telemetry::metrics()
                    .rate_limit_wait_seconds
                    .inc_by(waited.as_secs_f64());
            }
        }
    }

    /// Kinesis said the shard of `partition_key` is over its capacity: slow it down, and
    /// list the shards again (an on-demand stream may have split it, or merged ours).
    pub fn throttled(&self, tenant: &TenantSettings, partition_key: &str) {
        let limiter = self.limiter(tenant);
        let map = limiter.shards.load();
        match &**map {
            ShardMap::Known { shards, .. } => {
                limiter.stale.store(true, Ordering::Relaxed);
                match find_shard(shards, hash_key(partition_key)) {
                    Some(shard) => shard.bucket.throttled(),
                    None => limiter.stream.load().throttled(),
                }
            }
            _ => limiter.stream.load().throttled(),
        }
    }

    /// The stream's open shards as this worker knows them (`None` before a listing, or
    /// where the role may not list them): for `check` and tests.
    pub fn open_shards(&self, tenant: &TenantSettings) -> Option<usize> {
        match &**self.limiter(tenant).shards.load() {
            ShardMap::Known { shards, .. } => Some(shards.len()),
            _ => None,
        }
    }
}

fn find_shard(shards: &[ShardBudget], hash: u128) -> Option<&ShardBudget> {
    shards.iter().find(|s| s.start <= hash && hash <= s.end)
}

#[cfg(test)]
mod listing_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(shards: u32) -> TenantSettings {
        kd_tenants::test_settings(serde_json::json!({"stream": "st", "shards": shards}))
    }

    #[tokio::test]
    async fn one_shard_paces_records_at_its_rate() {
        let limits = RateLimits::default();
        let t = tenant(1);
        let started = Instant::now();
        for _ in 0..600 {
            limits.acquire(&t, "k", 10).await;
        }
        // A twentieth of a second's burst, then 950 a second.
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn capacity_scales_with_shards_and_fraction() {
        let limits = RateLimits::new(0.5);
        let l = limits.limiter(&tenant(4));
        assert_eq!(l.stream.load().full_records, 2000.0);
        assert_eq!(
            l.stream.load().full_bytes,
            2.0 * BYTES_PER_SHARD_PER_SEC as f64
        );
    }

    #[test]
    fn tenants_of_one_stream_share_its_limiter_and_a_borrowed_key_finds_it() {
        let limits = RateLimits::default();
        let first = limits.limiter(&tenant(4));
        // The borrowed key hashes and compares as the stored one: found, not inserted.
        let found = limits
            .streams
            .get(&StreamKeyRef::of(&tenant(4)))
            .expect("found by the borrowed key");
        assert!(Arc::ptr_eq(&first, &found));
        // Another source writing to the same stream shares it, whatever shard count it
        // plans with, and whether it names the stream by ARN or by name and region;
        // the same name in another account is another stream.
        let other_source = kd_tenants::parse_tenant(&serde_json::json!({"sourceId": "other",
            "roleAddress": "arn:aws:iam::123456789012:role/another",
            "region": "us-east-1", "stream": "st", "shards": 4}))
        .unwrap();
        assert!(Arc::ptr_eq(&first, &limits.limiter(&other_source)));
        assert!(Arc::ptr_eq(&first, &limits.limiter(&tenant(2))));
        let by_arn = kd_tenants::parse_tenant(&serde_json::json!({"sourceId": "arn",
            "streamArn": "arn:aws:kinesis:us-east-1:123456789012:stream/st"}))
        .unwrap();
        assert!(Arc::ptr_eq(&first, &limits.limiter(&by_arn)));
        let elsewhere = kd_tenants::parse_tenant(&serde_json::json!({"sourceId": "x",
            "streamArn": "arn:aws:kinesis:us-east-1:210987654321:stream/st"}))
        .unwrap();
        assert!(!Arc::ptr_eq(&first, &limits.limiter(&elsewhere)));
        limits.streams.run_pending_tasks();
        assert_eq!(limits.streams.entry_count(), 2);
    }

    #[tokio::test]
    async fn bytes_are_limited_too() {
        let limits = RateLimits::default();
        let t = tenant(1);
        let started = Instant::now();
        // 1.5 MiB through a 1 MiB/s stream.
        for _ in 0..6 {
            limits.acquire(&t, "k", 256 * 1024).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(400));
    }

    #[test]
    fn keys_map_to_the_shard_whose_range_holds_their_md5() {
        // Four shards as Kinesis creates them: equal quarters of the 128-bit key space.
        let quarter = 1u128 << 126;
        let shards: Vec<ShardBudget> = (0..4u128)
            .map(|i| ShardBudget {
                number: i as u64,
                start: i * quarter,
                end: if i == 3 {
                    u128::MAX
                } else {
                    (i + 1) * quarter - 1
                },
                bucket: Arc::new(Bucket::new(1000.0, 1e6)),
            })
            .collect();
        let index = |hash| {
            find_shard(&shards, hash).map(|s| shards.iter().position(|x| std::ptr::eq(x, s)))
        };
        // MD5("user-1") = d6d77053..., in the last quarter.
        assert_eq!(hash_key("user-1"), 0xd6d7705392bc7af633328bea8c4c6904);
        assert_eq!(index(hash_key("user-1")), Some(Some(3)));
        assert_eq!(index(0), Some(Some(0)));
        assert_eq!(
            index(quarter - 1),
            Some(Some(0)),
            "a range's end is inclusive"
        );
        assert_eq!(
            index(quarter),
            Some(Some(1)),
            "the next range starts after it"
        );
        assert_eq!(index(u128::MAX), Some(Some(3)));
        // After a merge left a hole (a closed shard not listed), no budget is found.
        let holed: Vec<ShardBudget> = shards.into_iter().filter(|s| s.start != quarter).collect();
        assert!(find_shard(&holed, quarter + 5).is_none());
    }
}
