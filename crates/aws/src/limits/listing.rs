//! Listing a stream's shards and describing it, in a task of its own when due: what
//! AWS answers replaces the stream's map and summary; a refusal or a failure holds
//! back the stream's next listing (its owner asked) or only the asking tenant's (a
//! tenant on trial asked).

use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use governor::{DefaultDirectRateLimiter, Quota};
use kd_tenants::TenantSettings;

use super::bucket::Bucket;
use super::stream::{Asker, Listing, ShardBudget, ShardMap, StreamLimiter, Summary};
use super::{RateLimits, BYTES_PER_SHARD_PER_SEC, RECORDS_PER_SHARD_PER_SEC};
use crate::api::{KinesisApi, OpenShard, StreamId};
use crate::credentials::Session;

/// DescribeStreamSummary calls per second and account: half of what AWS allows.
const DESCRIBES_PER_SEC_PER_ACCOUNT: u32 = 10;
/// When a stream whose account was over its describe budget is described again.
const DESCRIBE_BUSY_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl RateLimits {
    pub(super) fn list_shards_if_due(
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
                        let (records, bytes) = (
                            RECORDS_PER_SHARD_PER_SEC as f64 * fraction,
                            BYTES_PER_SHARD_PER_SEC as f64 * fraction,
                        );
                        // A stream of one shard: the stream-wide budget is that shard's
                        // (the same capacity, and what was spent of it so far), shared
                        // rather than kept twice.
                        let whole = limiter.stream.load_full();
                        let one_shard = open.len() == 1
                            && whole.full_records == records
                            && whole.full_bytes == bytes;
                        let shards = open
                            .into_iter()
                            .map(|OpenShard { start, end, number }| ShardBudget {
                                start,
                                end,
                                number,
                                bucket: kept(number, start, end).unwrap_or_else(|| {
                                    if one_shard {
                                        whole.clone()
                                    } else {
                                        Arc::new(Bucket::new_spent(records, bytes))
                                    }
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
            // The writes waiting for the map go on now, before the description.
            limiter.listed.notify_waiters();
            let summary_due = limiter.summary_due(Instant::now());
            if summary_due && describes.check().is_err() {
                // Over the account's budget: asked again in a moment (the writes use the
                // default limits meanwhile), rather than every new stream of a burst
                // in one account holding a task in line for minutes.
                asker.retry_after(limiter, DESCRIBE_BUSY_RETRY);
            } else if summary_due {
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
            Arc::new(super::bucket::direct(Quota::per_second(n)))
        })
    }
}
