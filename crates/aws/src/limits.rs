//! Stream capacity: Kinesis accepts at most 1,000 records/s and 1 MiB/s per shard.
//!
//! Every stream gets a budget from the tenant's `shards` setting. Where the tenant's role
//! may call `ListShards`, the budget is kept per shard instead: each partition key is
//! mapped to its shard (the MD5 of the key, as a 128-bit number, falls in one open shard's
//! hash-key range), so a hot user cannot push one shard past its limit while the stream
//! as a whole looks idle. The shard map is refreshed every few minutes (resharding).
//!
//! Budgets adapt (AIMD): a `ProvisionedThroughputExceeded` answer cuts by a fifth the budget of
//! the shard (or stream) it concerned, and every second without one gives back a tenth
//! of the full rate. `fraction` scales every budget, for a tenant whose stream is written
//! by several pods at once.

use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use kd_tenants::{Region, StreamName, TenantSettings};
use moka::sync::Cache;

use crate::api::KinesisApi;
use crate::credentials::Session;

/// Per-shard write capacity of Kinesis Data Streams.
pub const RECORDS_PER_SHARD_PER_SEC: u32 = 1_000;
pub const BYTES_PER_SHARD_PER_SEC: u32 = 1024 * 1024;

/// How long a shard map is trusted before it is listed again.
const SHARD_MAP_TTL: Duration = Duration::from_secs(300);
/// Lowest share of the full rate AIMD goes down to.
const MIN_FACTOR: f64 = 0.1;
/// What a throttled answer multiplies the rate by. Gentle, because one throttle often
/// comes from requests bunched in flight (new connections at start-up), not a wrong rate;
/// repeated throttles still bring the rate down fast (0.8^n, once per second).
const DECREASE: f64 = 0.8;

/// A records/s and bytes/s budget whose rate can be lowered and raised.
struct Bucket {
    full_records: f64,
    full_bytes: f64,
    state: Mutex<BucketState>,
    limiters: ArcSwap<(
        DefaultDirectRateLimiter,
        DefaultDirectRateLimiter,
        NonZeroU32,
    )>,
}

struct BucketState {
    factor: f64,
    /// Tokio's clock, so tests can move it (paused time).
    last_change: tokio::time::Instant,
}

/// Share of a budget actually used: headroom for clocks and for counting windows that do
/// not line up with ours.
const HEADROOM: f64 = 0.95;

fn limiters(
    records: f64,
    bytes: f64,
) -> (
    DefaultDirectRateLimiter,
    DefaultDirectRateLimiter,
    NonZeroU32,
) {
    let r = NonZeroU32::new((records * HEADROOM).max(1.0) as u32).unwrap_or(NonZeroU32::MIN);
    let b = NonZeroU32::new((bytes * HEADROOM).max(1024.0) as u32).unwrap_or(NonZeroU32::MIN);
    // Bursts of a twentieth of a second: Kinesis counts over a sliding second, so a
    // full second's burst followed by the steady rate would overrun it.
    let burst = |n: NonZeroU32| NonZeroU32::new((n.get() / 20).max(1)).unwrap_or(NonZeroU32::MIN);
    // A byte burst must still let one maximum-size (1 MiB) record through eventually.
    let byte_burst = burst(b).max(NonZeroU32::new(64 * 1024).unwrap_or(NonZeroU32::MIN));
    (
        RateLimiter::direct(Quota::per_second(r).allow_burst(burst(r))),
        RateLimiter::direct(Quota::per_second(b).allow_burst(byte_burst)),
        byte_burst,
    )
}

impl Bucket {
    /// A bucket that starts spent: its first grants come at its pace, not as a burst.
    fn new_spent(records: f64, bytes: f64) -> Bucket {
        let b = Bucket::new(records, bytes);
        let l = b.limiters.load();
        let _ = l.0.check_n(
            NonZeroU32::new((records * HEADROOM / 20.0).max(1.0) as u32).unwrap_or(NonZeroU32::MIN),
        );
        let _ = l.1.check_n(l.2);
        drop(l);
        b
    }

    fn new(records: f64, bytes: f64) -> Bucket {
        Bucket {
            full_records: records,
            full_bytes: bytes,
            state: Mutex::new(BucketState {
                factor: 1.0,
                last_change: tokio::time::Instant::now(),
            }),
            limiters: ArcSwap::from_pointee(limiters(records, bytes)),
        }
    }

    /// Returns when it first had to wait, if it did.
    async fn acquire(&self, bytes: usize) -> Option<Instant> {
        self.recover();
        let mut waited = None;
        // A token counts only if it came from the limiter in force: one granted by a
        // limiter that AIMD replaced meanwhile is taken again from the new one, or the
        // waiters of both would proceed at both paces.
        let l = loop {
            let l = self.limiters.load_full();
            waited = waited.or(ready(&l.0, NonZeroU32::MIN).await);
            if Arc::ptr_eq(&l, &self.limiters.load()) {
                break l;
            }
        };
        // A record larger than the byte burst takes its size in burst-sized steps.
        let mut left = u32::try_from(bytes).unwrap_or(u32::MAX).max(1);
        while left > 0 {
            let n = left.min(l.2.get());
            left -= n;
            // `n` is at most the burst, so the only error (InsufficientCapacity) cannot occur.
            waited = waited.or(ready(&l.1, NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)).await);
        }
        waited
    }

    fn set_factor(&self, state: &mut BucketState, factor: f64) {
        state.factor = factor;
        state.last_change = tokio::time::Instant::now();
        let fresh = limiters(self.full_records * factor, self.full_bytes * factor);
        // A new limiter would allow a full burst at once on top of what the old one let
        // through this second: start it spent, so the pace just changes.
        let _ = fresh.0.check_n(
            NonZeroU32::new((self.full_records * factor * HEADROOM / 20.0).max(1.0) as u32)
                .unwrap_or(NonZeroU32::MIN),
        );
        let _ = fresh.1.check_n(fresh.2);
        self.limiters.store(Arc::new(fresh));
    }

    /// Multiplicative decrease, at most once per second (a burst of throttles is one signal).
    fn throttled(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.last_change.elapsed() >= Duration::from_secs(1) || s.factor >= 1.0 {
            let f = (s.factor * DECREASE).max(MIN_FACTOR);
            self.set_factor(&mut s, f);
        }
    }

    /// Additive increase: a tenth of the full rate back per quiet second.
    fn recover(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.factor < 1.0 && s.last_change.elapsed() >= Duration::from_secs(1) {
            let f = (s.factor + 0.1).min(1.0);
            self.set_factor(&mut s, f);
        }
    }

    #[cfg(test)]
    fn factor(&self) -> f64 {
        self.state.lock().unwrap().factor
    }
}

/// Waits until `limiter` grants `n` cells (at most its burst). Waits on tokio's timer:
/// governor's own `until_ready` sleeps on a timer thread of its own, and waking it cost
/// more CPU than the writes themselves at tens of thousands of records a second.
/// Returns when it began to wait, if it had to (`Instant::now` is read only then).
async fn ready(limiter: &DefaultDirectRateLimiter, n: NonZeroU32) -> Option<Instant> {
    use governor::clock::Clock;
    let mut waited = None;
    loop {
        match limiter.check_n(n) {
            Ok(Ok(())) => return waited,
            Ok(Err(not_until)) => {
                waited = waited.or_else(|| Some(Instant::now()));
                let wait = not_until.wait_time_from(limiter.clock().now());
                tokio::time::sleep(wait).await;
            }
            // More than the burst: cannot happen (callers ask for at most the burst).
            Err(_) => return waited,
        }
    }
}

/// One open shard: its hash-key range and budget.
struct ShardBudget {
    start: u128,
    end: u128,
    bucket: Bucket,
}

enum ShardMap {
    /// Not listed yet (or listing failed): the stream-wide budget applies.
    Unknown,
    /// The role may not list shards: the stream-wide budget applies for good.
    Denied,
    Known {
        shards: Vec<ShardBudget>,
        listed: Instant,
    },
}

struct StreamLimiter {
    stream: Bucket,
    shards: ArcSwap<ShardMap>,
    listing: AtomicBool,
    /// Woken when a listing ends.
    listed: tokio::sync::Notify,
    next_listing: Mutex<Instant>,
}

impl StreamLimiter {
    /// Whether the shards are to be listed (again): never listed and not tried lately,
    /// or listed long enough ago; never once the listing was refused.
    fn listing_due(&self) -> bool {
        match &**self.shards.load() {
            ShardMap::Denied => false,
            ShardMap::Known { listed, .. } => listed.elapsed() >= SHARD_MAP_TTL,
            ShardMap::Unknown => {
                *self.next_listing.lock().unwrap_or_else(|p| p.into_inner()) <= Instant::now()
            }
        }
    }
}

/// One stream's rate limits, looked up once for a write.
pub struct StreamLimits(Arc<StreamLimiter>);

impl StreamLimits {
    /// Whether a write should bring its session, for the stream's shards to be listed
    /// with it (see [`RateLimits::acquire_on`]): a stream not listed yet, or due again.
    pub fn wants_session(&self) -> bool {
        !self.0.listing.load(Ordering::Acquire) && self.0.listing_due()
    }
}

/// Shares the tenant's own strings. Looked up per event through [`StreamKeyRef`],
/// which hashes the same: a hit clones and allocates nothing.
#[derive(Clone, PartialEq, Eq)]
struct StreamKey {
    account: Arc<str>,
    region: Region,
    stream: StreamName,
    shards: u32,
}

impl StreamKey {
    fn as_ref(&self) -> StreamKeyRef<'_> {
        // Destructured: a field added to the key must be added to the borrowed key too,
        // or lookups would match another stream's limiter.
        let StreamKey {
            account,
            region,
            stream,
            shards,
        } = self;
        StreamKeyRef {
            account,
            region: region.as_str(),
            stream: stream.as_str(),
            shards: *shards,
        }
    }
}

impl Hash for StreamKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_ref().hash(state);
    }
}

/// A [`StreamKey`] borrowed from a tenant's settings.
#[derive(PartialEq, Eq, Hash)]
struct StreamKeyRef<'a> {
    account: &'a str,
    region: &'a str,
    stream: &'a str,
    shards: u32,
}

impl<'a> StreamKeyRef<'a> {
    fn of(tenant: &'a TenantSettings) -> Self {
        StreamKeyRef {
            account: tenant.role.account(),
            region: tenant.region.as_str(),
            stream: tenant.stream.as_str(),
            shards: tenant.shards,
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
    fraction: f64,
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
            fraction: fraction.clamp(0.001, 1.0),
        }
    }

    fn limiter(&self, tenant: &TenantSettings) -> Arc<StreamLimiter> {
        let found = self.streams.get(&StreamKeyRef::of(tenant));
        if let Some(limiter) = found {
            return limiter;
        }
        let key = StreamKey {
            account: tenant.role.account_shared(),
            region: tenant.region.clone(),
            stream: tenant.stream.clone(),
            shards: tenant.shards,
        };
        let shards = tenant.shards.max(1) as f64;
        let fraction = self.fraction;
        self.streams.get_with(key, || {
            Arc::new(StreamLimiter {
                stream: Bucket::new(
                    RECORDS_PER_SHARD_PER_SEC as f64 * shards * fraction,
                    BYTES_PER_SHARD_PER_SEC as f64 * shards * fraction,
                ),
                shards: ArcSwap::from_pointee(ShardMap::Unknown),
                listing: AtomicBool::new(false),
                listed: tokio::sync::Notify::new(),
                next_listing: Mutex::new(Instant::now()),
            })
        })
    }

    /// The limits of `tenant`'s stream, for [`acquire_on`](Self::acquire_on).
    pub fn stream(&self, tenant: &TenantSettings) -> StreamLimits {
        StreamLimits(self.limiter(tenant))
    }

    /// Waits until the shard of `partition_key` (or the stream, while its shards are
    /// unknown) has room for a record of `bytes` bytes. With a `session` (and the API to
    /// call with it), the stream's shards are listed in the background when due.
    pub async fn acquire(
        &self,
        tenant: &TenantSettings,
        partition_key: &str,
        bytes: usize,
        session: Option<(&KinesisApi, &Session)>,
    ) {
        let limiter = self.stream(tenant);
        self.acquire_on(&limiter, tenant, partition_key, bytes, session)
            .await
    }

    /// [`acquire`](Self::acquire) on the stream's limits already looked up.
    pub async fn acquire_on(
        &self,
        StreamLimits(limiter): &StreamLimits,
        tenant: &TenantSettings,
        partition_key: &str,
        bytes: usize,
        session: Option<(&KinesisApi, &Session)>,
    ) {
        // When this write first had to wait (`Instant::now` is read only then).
        let mut waited: Option<Instant> = None;
        if let Some(session) = session {
            self.list_shards_if_due(limiter, tenant, session);
        }
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
        let bucket = match &**map {
            ShardMap::Known { shards, .. } => match find_shard(shards, hash_key(partition_key)) {
                Some(shard) => &shard.bucket,
                None => &limiter.stream,
            },
            _ => &limiter.stream,
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

    /// Kinesis said the shard of `partition_key` is over its capacity: slow it down.
    pub fn throttled(&self, tenant: &TenantSettings, partition_key: &str) {
        let limiter = self.limiter(tenant);
        let map = limiter.shards.load();
        match &**map {
            ShardMap::Known { shards, .. } => match find_shard(shards, hash_key(partition_key)) {
                Some(shard) => shard.bucket.throttled(),
                None => limiter.stream.throttled(),
            },
            _ => limiter.stream.throttled(),
        }
    }

    fn list_shards_if_due(
        &self,
        limiter: &Arc<StreamLimiter>,
        tenant: &TenantSettings,
        (api, session): (&KinesisApi, &Session),
    ) {
        let due = limiter.listing_due();
        if !due || limiter.listing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (limiter, api, credentials, region, stream, fraction) = (
            limiter.clone(),
            api.clone(),
            session.credentials().clone(),
            tenant.region.clone(),
            tenant.stream.as_str().to_owned(),
            self.fraction,
        );
        tokio::spawn(async move {
            let context = || format!("ListShards {stream}");
            let ranges = api
                .open_shard_ranges(&credentials, &region, &stream, &context)
                .await;
            match ranges {
                Ok(ranges) if !ranges.is_empty() => {
                    tracing::debug!(%stream, shards = ranges.len(), "per-shard rate limits");
                    let shards = ranges
                        .into_iter()
                        .map(|(start, end)| ShardBudget {
                            start,
                            end,
                            bucket: Bucket::new_spent(
                                RECORDS_PER_SHARD_PER_SEC as f64 * fraction,
                                BYTES_PER_SHARD_PER_SEC as f64 * fraction,
                            ),
                        })
                        .collect();
                    limiter.shards.store(Arc::new(ShardMap::Known {
                        shards,
                        listed: Instant::now(),
                    }));
                }
                Ok(_) => {}
                Err(e) if e.class == crate::ErrorClass::Permanent => {
                    // The policy the README suggests grants only kinesis:PutRecord: plan by `shards`.
                    tracing::debug!(%stream, error = %e, "cannot list shards; stream-wide rate limit");
                    limiter.shards.store(Arc::new(ShardMap::Denied));
                }
                Err(e) => {
                    tracing::debug!(%stream, error = %e, "listing shards failed; will try again");
                    *limiter
                        .next_listing
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) =
                        Instant::now() + Duration::from_secs(30);
                }
            }
            limiter.listing.store(false, Ordering::Release);
            limiter.listed.notify_waiters();
        });
    }
}

fn find_shard(shards: &[ShardBudget], hash: u128) -> Option<&ShardBudget> {
    shards.iter().find(|s| s.start <= hash && hash <= s.end)
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
    async fn one_shard_paces_records_at_its_rate() {
        let limits = RateLimits::default();
        let t = tenant(1);
        let started = Instant::now();
        for _ in 0..600 {
            limits.acquire(&t, "k", 10, None).await;
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
        assert_eq!(l.stream.full_records, 2000.0);
        assert_eq!(l.stream.full_bytes, 2.0 * BYTES_PER_SHARD_PER_SEC as f64);
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
        // Another source writing to the same stream shares it; another shard count
        // (another plan) does not.
        let other_source = kd_tenants::parse_tenant(&serde_json::json!({"sourceId": "other",
            "roleAddress": "arn:aws:iam::123456789012:role/another",
            "region": "us-east-1", "stream": "st", "shards": 4}))
        .unwrap();
        assert!(Arc::ptr_eq(&first, &limits.limiter(&other_source)));
        assert!(!Arc::ptr_eq(&first, &limits.limiter(&tenant(2))));
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
            limits.acquire(&t, "k", 256 * 1024, None).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_cuts_the_rate_and_quiet_seconds_restore_it() {
        let second = Duration::from_secs(1);
        let b = Bucket::new(1000.0, 1e6);
        b.throttled();
        assert_eq!(b.factor(), 0.8);
        b.throttled();
        assert_eq!(b.factor(), 0.8, "one decrease per second");
        tokio::time::advance(second).await;
        b.throttled();
        assert!((b.factor() - 0.64).abs() < 1e-9);
        b.recover();
        assert!(
            (b.factor() - 0.64).abs() < 1e-9,
            "no increase within the second"
        );
        tokio::time::advance(second).await;
        b.recover();
        assert!(
            (b.factor() - 0.74).abs() < 1e-9,
            "a tenth back per quiet second"
        );
        for _ in 0..20 {
            tokio::time::advance(second).await;
            b.recover();
        }
        assert_eq!(b.factor(), 1.0, "never above the full rate");
        for _ in 0..20 {
            tokio::time::advance(second).await;
            b.throttled();
        }
        assert_eq!(b.factor(), MIN_FACTOR, "never below the floor");
    }

    #[test]
    fn keys_map_to_the_shard_whose_range_holds_their_md5() {
        // Four shards as Kinesis creates them: equal quarters of the 128-bit key space.
        let quarter = 1u128 << 126;
        let shards: Vec<ShardBudget> = (0..4u128)
            .map(|i| ShardBudget {
                start: i * quarter,
                end: if i == 3 {
                    u128::MAX
                } else {
                    (i + 1) * quarter - 1
                },
                bucket: Bucket::new(1000.0, 1e6),
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
