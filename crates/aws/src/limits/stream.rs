//! One stream's limits: its stream-wide budget, its shard map (per-shard budgets),
//! its summary (maximum record size), and when each is due to be asked again; and the
//! tenants on trial, not yet proven to own the stream they name.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use kd_tenants::TenantSettings;

use super::bucket::Bucket;
use super::{find_shard, hash_key, RateLimits};
use crate::api::{KinesisApi, StreamSummary};
use crate::credentials::Session;

/// How long a shard map is trusted before it is listed again.
const SHARD_MAP_TTL: Duration = Duration::from_secs(300);
/// A map younger than this is not listed again for a throttle or a stray shard (a
/// reshard's burst of them is one signal).
const MIN_RELIST: Duration = Duration::from_secs(10);
/// How long a stream's summary (mode, maximum record size) is trusted.
const SUMMARY_TTL: Duration = Duration::from_secs(600);

/// One open shard: its hash-key range, number and budget.
pub(super) struct ShardBudget {
    pub(super) start: u128,
    pub(super) end: u128,
    pub(super) number: u64,
    /// Shared with the next map when a listing finds the shard unchanged: its budget
    /// (and what AIMD learned of it) carries over.
    pub(super) bucket: Arc<Bucket>,
}

pub(super) enum ShardMap {
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
pub(super) enum Summary {
    NotAsked,
    Known(StreamSummary, Instant),
    /// Refused (the role may only write): asked again at `retry_at`.
    Denied {
        retry_at: Instant,
    },
}

pub(super) struct StreamLimiter {
    /// The stream-wide budget, while the shards are not known: replaced when
    /// DescribeStreamSummary says how many shards are open.
    pub(super) stream: ArcSwap<Bucket>,
    pub(super) shards: ArcSwap<ShardMap>,
    /// A listing task is running ([`Listing`] clears it however the task ends).
    pub(super) listing: AtomicBool,
    /// Woken when a listing ends.
    pub(super) listed: tokio::sync::Notify,
    /// No listing or describing before this time (milliseconds on [`ticks`]' clock):
    /// the last attempt failed, or found no open shard.
    pub(super) retry_at: AtomicU64,
    /// A write showed the map is out of date (a throttle, a shard not in it).
    pub(super) stale: AtomicBool,
    pub(super) summary: ArcSwap<Summary>,
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
pub(super) fn ticks(at: Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(at.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
}

impl StreamLimiter {
    /// Whether the shards are to be listed (again) or the stream described: not tried
    /// and failed lately, and never listed, listed long enough ago, shown out of date,
    /// refused long enough ago, or the summary is due.
    pub(super) fn listing_due(&self, now: Instant) -> bool {
        if ticks(now) < self.retry_at.load(Ordering::Relaxed) {
            return false;
        }
        self.shards_due(now) || self.summary_due(now)
    }

    pub(super) fn shards_due(&self, now: Instant) -> bool {
        match &**self.shards.load() {
            ShardMap::Denied { retry_at } => now >= *retry_at,
            ShardMap::Known { listed, .. } => {
                let age = now.saturating_duration_since(*listed);
                age >= SHARD_MAP_TTL || (self.stale.load(Ordering::Relaxed) && age >= MIN_RELIST)
            }
            ShardMap::Unknown => true,
        }
    }

    pub(super) fn summary_due(&self, now: Instant) -> bool {
        match &**self.summary.load() {
            Summary::NotAsked => true,
            Summary::Known(_, at) => now.saturating_duration_since(*at) >= SUMMARY_TTL,
            Summary::Denied { retry_at } => now >= *retry_at,
        }
    }

    pub(super) fn retry_after(&self, wait: Duration) {
        self.retry_at
            .fetch_max(ticks(Instant::now() + wait), Ordering::Relaxed);
    }
}

impl Asker {
    /// Holds back the next listing: the stream's, or only the tenant on trial's.
    pub(super) fn retry_after(&self, limiter: &StreamLimiter, wait: Duration) {
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
pub(super) struct Listing(pub(super) Arc<StreamLimiter>);

impl Drop for Listing {
    fn drop(&mut self) {
        self.0.listing.store(false, Ordering::Release);
        self.0.listed.notify_waiters();
    }
}

/// One stream's rate limits, looked up once for a write.
pub struct StreamLimits(pub(super) Arc<StreamLimiter>);

impl StreamLimits {
    /// Whether a write should bring its session, for the stream's shards to be listed
    /// with it ([`refresh_if_due`](Self::refresh_if_due)): a stream not listed yet, or
    /// due again.
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

/// Who asks for a stream's shards and summary, and so what a refusal or a failure
/// changes: for the stream's proven owner, the stream's state that every tenant of it
/// shares (the map is marked denied, listing waits); for a tenant on trial, only its own
/// next attempt. Another tenant naming the stream with a role that may not list it
/// must not turn per-shard budgets off for the owner.
pub(super) enum Asker {
    Owner,
    Trial(Arc<Trial>),
}

/// A tenant not yet proven to own its stream: one shard's capacity of its own, and
/// when it may ask for its stream's shards again.
pub(super) struct Trial {
    pub(super) bucket: Bucket,
    pub(super) retry_at: AtomicU64,
    /// DescribeStreamSummary refused this tenant.
    pub(super) describe_refused: AtomicBool,
}
