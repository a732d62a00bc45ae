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
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use kd_tenants::{Region, StreamName, TenantSettings};
use moka::sync::Cache;

use crate::api::{KinesisApi, OpenShard, StreamId, StreamSummary};
use crate::credentials::Session;

/// Per-shard write capacity of Kinesis Data Streams.
pub const RECORDS_PER_SHARD_PER_SEC: u32 = 1_000;
pub const BYTES_PER_SHARD_PER_SEC: u32 = 1024 * 1024;

/// How long a shard map is trusted before it is listed again.
const SHARD_MAP_TTL: Duration = Duration::from_secs(300);
/// A map younger than this is not listed again for a throttle or a stray shard (a
/// reshard's burst of them is one signal).
const MIN_RELIST: Duration = Duration::from_secs(10);
/// How long a stream's summary (mode, maximum record size) is trusted.
const SUMMARY_TTL: Duration = Duration::from_secs(600);
/// DescribeStreamSummary calls per second and account: half of what AWS allows.
const DESCRIBES_PER_SEC_PER_ACCOUNT: u32 = 10;
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

/// One open shard: its hash-key range, number and budget.
struct ShardBudget {
    start: u128,
    end: u128,
    number: u64,
    /// Shared with the next map when a listing finds the shard unchanged: its budget
    /// (and what AIMD learned of it) carries over.
    bucket: Arc<Bucket>,
}

enum ShardMap {
    /// Not listed yet (or listing failed): the stream-wide budget applies.
    Unknown,
    /// The role that asked may not list shards: the stream-wide budget applies until
    /// `retry_at`. Not for good: the tenant may grant `ListShards` later, and the
    /// refusal may have been another tenant's role naming this stream.
    Denied { retry_at: Instant },
    Known {
        shards: Vec<ShardBudget>,
        listed: Instant,
    },
}

/// What DescribeStreamSummary said of a stream.
enum Summary {
    NotAsked,
    Known(StreamSummary, Instant),
    /// Refused (the role may only write): asked again at `retry_at`.
    Denied {
        retry_at: Instant,
    },
}

struct StreamLimiter {
    /// The stream-wide budget, while the shards are not known: replaced when
    /// DescribeStreamSummary says how many shards are open.
    stream: ArcSwap<Bucket>,
    shards: ArcSwap<ShardMap>,
    /// A listing task is running ([`Listing`] clears it however the task ends).
    listing: AtomicBool,
    /// Woken when a listing ends.
    listed: tokio::sync::Notify,
    /// No listing or describing before this time (milliseconds on [`ticks`]' clock):
    /// the last attempt failed, or found no open shard.
    retry_at: AtomicU64,
    /// A write showed the map is out of date (a throttle, a shard not in it).
    stale: AtomicBool,
    summary: ArcSwap<Summary>,
}

/// How long a refused ListShards or DescribeStreamSummary is remembered, and how long
/// after a failed (or empty) answer either is asked again.
#[derive(Debug, Clone, Copy)]
pub struct RetryPeriods {
    pub denied: Duration,
    pub failed: Duration,
}

impl Default for RetryPeriods {
    fn default() -> Self {
        RetryPeriods {
            denied: Duration::from_secs(600),
            failed: Duration::from_secs(30),
        }
    }
}

/// `at` in milliseconds since the first call: an instant that fits in an atomic.
fn ticks(at: Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(at.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
}

impl StreamLimiter {
    /// Whether the shards are to be listed (again) or the stream described: not tried
    /// and failed lately, and never listed, listed long enough ago, shown out of date,
    /// refused long enough ago, or the summary is due.
    fn listing_due(&self, now: Instant) -> bool {
        if ticks(now) < self.retry_at.load(Ordering::Relaxed) {
            return false;
        }
        self.shards_due(now) || self.summary_due(now)
    }

    fn shards_due(&self, now: Instant) -> bool {
        match &**self.shards.load() {
            ShardMap::Denied { retry_at } => now >= *retry_at,
            ShardMap::Known { listed, .. } => {
                let age = now.saturating_duration_since(*listed);
                age >= SHARD_MAP_TTL || (self.stale.load(Ordering::Relaxed) && age >= MIN_RELIST)
            }
            ShardMap::Unknown => true,
        }
    }

    fn summary_due(&self, now: Instant) -> bool {
        match &**self.summary.load() {
            Summary::NotAsked => true,
            Summary::Known(_, at) => now.saturating_duration_since(*at) >= SUMMARY_TTL,
            Summary::Denied { retry_at } => now >= *retry_at,
        }
    }

    fn retry_after(&self, wait: Duration) {
        self.retry_at
            .fetch_max(ticks(Instant::now() + wait), Ordering::Relaxed);
    }
}

impl Asker {
    /// Holds back the next listing: the stream's, or only the tenant on trial's.
    fn retry_after(&self, limiter: &StreamLimiter, wait: Duration) {
        match self {
            Asker::Owner => limiter.retry_after(wait),
            Asker::Trial(trial) => {
                trial
                    .retry_at
                    .fetch_max(ticks(Instant::now() + wait), Ordering::Relaxed);
            }
        }
    }
}

/// A running listing of one stream: ends it (and wakes the writes waiting for it) when
/// dropped, so a task that panics or is cancelled cannot leave the stream "listing".
struct Listing(Arc<StreamLimiter>);

impl Drop for Listing {
    fn drop(&mut self) {
        self.0.listing.store(false, Ordering::Release);
        self.0.listed.notify_waiters();
    }
}

/// One stream's rate limits, looked up once for a write.
pub struct StreamLimits(Arc<StreamLimiter>);

impl StreamLimits {
    /// Whether a write should bring its session, for the stream's shards to be listed
    /// with it (see [`RateLimits::acquire_on`]): a stream not listed yet, or due again.
    pub fn wants_session(&self) -> bool {
        !self.0.listing.load(Ordering::Acquire) && self.0.listing_due(Instant::now())
    }

    /// A record of `partition_key` landed on shard number `shard`: when the map puts the
    /// key on another shard, the stream was resharded under us and is listed again.
    pub fn landed(&self, partition_key: &str, shard: u64) {
        let limiter = &self.0;
        if let ShardMap::Known { shards, .. } = &**limiter.shards.load() {
            let expected = find_shard(shards, hash_key(partition_key)).map(|s| s.number);
            if expected != Some(shard) && !limiter.stale.swap(true, Ordering::Relaxed) {
                tracing::debug!(
                    shard,
                    ?expected,
                    "a write landed outside the shard map; listing the shards again"
                );
            }
        }
    }

    /// Lists the shards and describes the stream in the background, when due, with
    /// the session of a tenant proven to own the stream (see [`Asker`]).
    pub fn refresh_if_due(
        &self,
        limits: &RateLimits,
        tenant: &TenantSettings,
        session: (&KinesisApi, &Session),
    ) {
        limits.list_shards_if_due(&self.0, tenant, session, Asker::Owner);
    }

    /// [`refresh_if_due`](Self::refresh_if_due) for a tenant not yet proven to own the
    /// stream: what AWS answers it is kept, a refusal or a failure only holds back
    /// this tenant's next attempt.
    pub fn refresh_for_trial_if_due(
        &self,
        limits: &RateLimits,
        tenant: &TenantSettings,
        session: (&KinesisApi, &Session),
    ) {
        let trial = limits.trial(tenant);
        if ticks(Instant::now()) >= trial.retry_at.load(Ordering::Relaxed) {
            limits.list_shards_if_due(&self.0, tenant, session, Asker::Trial(trial));
        }
    }

    /// The largest record the stream takes: the tenant's `maxRecordSizeKiB` when set,
    /// else what DescribeStreamSummary said, else (not asked yet, or refused) Kinesis'
    /// default of 1 MiB, with whether that is only the default.
    pub fn max_record_bytes(&self, tenant: &TenantSettings) -> (usize, bool) {
        if let Some(n) = tenant.max_record_bytes {
            return (n, false);
        }
        match &**self.0.summary.load() {
            Summary::Known(summary, _) => (summary.max_record_bytes, false),
            Summary::NotAsked => (tenant.default_max_record_bytes(), true),
            Summary::Denied { .. } => (tenant.default_max_record_bytes(), false),
        }
    }
}

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

/// Who asks for a stream's shards and summary, and so what a refusal or a failure
/// changes: for the stream's proven owner, the stream's state that every tenant of it
/// shares (the map is marked denied, listing waits); for a tenant on trial, only its own
/// next attempt. Another tenant naming the stream with a role that may not list it
/// must not turn per-shard budgets off for the owner.
enum Asker {
    Owner,
    Trial(Arc<Trial>),
}

/// A tenant not yet proven to own its stream: one shard's capacity of its own, and
/// when it may ask for its stream's shards again.
struct Trial {
    bucket: Bucket,
    retry_at: AtomicU64,
    /// DescribeStreamSummary refused this tenant.
    describe_refused: AtomicBool,
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
            self.list_shards_if_due(limiter, tenant, session, Asker::Owner);
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

    fn list_shards_if_due(
        &self,
        limiter: &Arc<StreamLimiter>,
        tenant: &TenantSettings,
        (api, session): (&KinesisApi, &Session),
        asker: Asker,
    ) {
        if !limiter.listing_due(Instant::now()) || limiter.listing.swap(true, Ordering::AcqRel) {
            return;
        }
        let listing = Listing(limiter.clone());
        let (api, credentials, region, fraction) = (
            api.clone(),
            session.credentials().clone(),
            tenant.region.clone(),
            self.fraction,
        );
        let (name, arn) = (tenant.stream.clone(), tenant.stream_arn.clone());
        let describes = self.describe_budget(&tenant.account);
        let shards_hint = tenant.shards;
        let retry = self.retry;
        let limits = self.clone();
        let (source, account) = (tenant.source_id.shared(), tenant.account.clone());
        tokio::spawn(async move {
            let limiter = &listing.0;
            // A place for the listing's pages (at most MAX_LIST_SHARDS_PAGES), another
            // for the description: a stream that answers slowly holds the asking
            // tenant's share of the request places, its account's and its region's, not
            // every other tenant's.
            let place = || async {
                match &limits.requests {
                    Some(requests) => Some(
                        requests
                            .acquire_for(&source, &account, region.as_str())
                            .await,
                    ),
                    None => None,
                }
            };
            let stream = match &arn {
                Some(arn) => StreamId::Arn(arn),
                None => StreamId::Name(name.as_str()),
            };
            let label = stream.label().to_owned();
            // Shards first: the first writes wait for the map (see `acquire_on`), and
            // must not wait for the account's describe budget too.
            if limiter.shards_due(Instant::now()) {
                // The owner's signal that the map is out of date is answered only by a
                // listing that may replace the map's state.
                if matches!(asker, Asker::Owner) {
                    limiter.stale.store(false, Ordering::Relaxed);
                }
                let context = || format!("ListShards {label}");
                let listed = {
                    let _place = place().await;
                    api.open_shards(&credentials, &region, stream, &context)
                        .await
                };
                match listed {
                    Ok(open) if !open.is_empty() => {
                        tracing::debug!(stream = %label, shards = open.len(), "per-shard rate limits");
                        let old = limiter.shards.load_full();
                        let kept = |number: u64, start: u128, end: u128| match &*old {
                            ShardMap::Known { shards, .. } => shards
                                .iter()
                                .find(|s| s.number == number && s.start == start && s.end == end)
                                .map(|s| s.bucket.clone()),
                            _ => None,
                        };
                        let shards = open
                            .into_iter()
                            .map(|OpenShard { start, end, number }| ShardBudget {
                                start,
                                end,
                                number,
                                bucket: kept(number, start, end).unwrap_or_else(|| {
                                    Arc::new(Bucket::new_spent(
                                        RECORDS_PER_SHARD_PER_SEC as f64 * fraction,
                                        BYTES_PER_SHARD_PER_SEC as f64 * fraction,
                                    ))
                                }),
                            })
                            .collect();
                        limiter.shards.store(Arc::new(ShardMap::Known {
                            shards,
                            listed: Instant::now(),
                        }));
                    }
                    Ok(_) => {
                        // A stream being created, or an answer we cannot use: the map
                        // we had (if any) stays; listed again a while later.
                        tracing::debug!(stream = %label, "no open shard listed; will try again");
                        asker.retry_after(limiter, retry.failed);
                    }
                    Err(e) if e.is_access_denied() => {
                        // The policy the README suggests grants only kinesis:PutRecord:
                        // plan by the summary's open shards, or `shards`.
                        tracing::debug!(stream = %label, error = %e, "cannot list shards; stream-wide rate limit");
                        match &asker {
                            Asker::Owner => limiter.shards.store(Arc::new(ShardMap::Denied {
                                retry_at: Instant::now() + retry.denied,
                            })),
                            Asker::Trial(_) => asker.retry_after(limiter, retry.denied),
                        }
                    }
                    Err(e) => {
                        // Transient, or the stream's state (not found yet, in use): the
                        // map we had stays.
                        tracing::debug!(stream = %label, error = %e, "listing shards failed; will try again");
                        asker.retry_after(limiter, retry.failed);
                    }
                }
            }
            if limiter.summary_due(Instant::now()) {
                // Within the account's budget: a burst of new streams waits here, in
                // the background, while their writes use the default limits.
                ready(&describes, NonZeroU32::MIN).await;
                let context = || format!("DescribeStreamSummary {label}");
                let described = {
                    let _place = place().await;
                    api.describe_stream_summary(&credentials, &region, stream, &context)
                        .await
                };
                match described {
                    Ok(summary) => {
                        tracing::debug!(stream = %label, ?summary, "stream described");
                        let known = matches!(**limiter.shards.load(), ShardMap::Known { .. });
                        // Until its shards are listed, plan by the open ones; a tenant's
                        // `shards` is only a guess next to them.
                        if !known && Some(summary.open_shards) != shards_hint {
                            limiter
                                .stream
                                .store(Arc::new(limits.stream_bucket(summary.open_shards)));
                        }
                        limiter
                            .summary
                            .store(Arc::new(Summary::Known(summary, Instant::now())));
                    }
                    Err(e) if e.is_access_denied() => {
                        tracing::debug!(stream = %label, error = %e, "cannot describe the stream; default record size");
                        match &asker {
                            Asker::Owner => limiter.summary.store(Arc::new(Summary::Denied {
                                retry_at: Instant::now() + retry.denied,
                            })),
                            Asker::Trial(trial) => {
                                trial.describe_refused.store(true, Ordering::Relaxed);
                                asker.retry_after(limiter, retry.denied);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(stream = %label, error = %e, "describing the stream failed; will try again");
                        asker.retry_after(limiter, retry.failed);
                    }
                }
            }
            drop(listing);
        });
    }

    /// The DescribeStreamSummary budget of `account`.
    fn describe_budget(&self, account: &Arc<str>) -> Arc<DefaultDirectRateLimiter> {
        self.describes.get_with_by_ref(account, || {
            let n = NonZeroU32::new(DESCRIBES_PER_SEC_PER_ACCOUNT).unwrap_or(NonZeroU32::MIN);
            Arc::new(RateLimiter::direct(Quota::per_second(n)))
        })
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
