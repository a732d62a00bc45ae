//! What flow control reads of the tracker, and the levels it sets there: events and
//! bytes held in flight (in all, per partition, how long the oldest has waited), whether
//! they drain, which partitions to pause or read again after a skip, and the holding
//! level at which the consume loop is woken.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{verdicts, At, Budget, Fairness, Held, OffsetTracker, TopicPartition};

impl OffsetTracker {
    /// Partitions where reading the skipped events again would get them handled: the
    /// partition has drained below `partition_below`, or every tenant skipped there
    /// below `source_below`. Each is to be read again from the returned offset: seek
    /// there, then call [`reread_from`](Self::reread_from). Nothing changes until then,
    /// so a seek that fails leaves the skip as it was.
    pub fn skips_to_reread(
        &self,
        partition_below: Budget,
        source_below: Budget,
    ) -> Vec<(Arc<str>, i32, i64)> {
        let inner = self.lock();
        // While every partition counts as contended, a tenant is skipped below the
        // partition's budget too: the partition being below half of it says nothing.
        let everywhere = self.contended_everywhere();
        let mut out = Vec::new();
        for ((topic, partition), state) in inner.partitions.iter() {
            if let Some(skip) = &state.skip {
                let drained = (!everywhere && !partition_below.reached_by(state.held()))
                    || skip
                        .sources
                        .iter()
                        .all(|s| !source_below.reached_by(state.held_by(s)));
                if drained {
                    out.push((topic.clone(), *partition, skip.from));
                }
            }
        }
        out
    }

    /// Whether the consume loop holds off reading (the totals are at their budget), and
    /// at what totals it reads again: the event done that brings them there wakes it
    /// (see [`drained`](Self::drained)).
    pub fn set_holding(&self, resume_at: Option<Held>) {
        let mut inner = self.lock();
        inner.resume_at = resume_at;
        // Drained there already (events done since the loop looked): no event done may
        // come to say so.
        let there = resume_at
            .is_some_and(|at| inner.pending_total <= at.events && inner.pending_bytes <= at.bytes);
        drop(inner);
        if there {
            self.drained.notify_one();
        }
    }

    /// Makes every partition count as contended for fairness (tenants over their
    /// share that are stuck are skipped there), or no longer: while the totals are
    /// full of events that do not drain, reading on past them must skip the stuck
    /// tenants' events wherever they are, not only in partitions at their own budget.
    pub fn set_contended_everywhere(&self, on: bool) {
        self.contended_everywhere
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn contended_everywhere(&self) -> bool {
        self.contended_everywhere
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether some tenant holds `share` or more in some partition and has had none
    /// of its events there done lately: a stuck one that fairness could skip (a slow
    /// but writing one is not).
    pub fn any_tenant_stuck_holding(&self, share: Budget) -> bool {
        let inner = self.lock();
        let now = Instant::now();
        inner.partitions.values().any(|state| {
            state.load.by_source.iter().any(|(source, (held, _))| {
                share.reached_by(*held) && verdicts::idle(state, source, now)
            })
        })
    }

    /// Whether some partition's cap is held by one tenant alone there that has written
    /// nothing for a while (see `verdicts::alone_at_cap_and_silent`): reading on would
    /// skip its further events there.
    pub fn any_alone_at_cap_and_silent(&self, f: Fairness) -> bool {
        let inner = self.lock();
        let now = Instant::now();
        inner
            .partitions
            .values()
            .any(|state| verdicts::alone_at_cap_and_silent(state, &f, now))
    }

    /// Whether the events in flight, over all partitions, do not drain within
    /// `target` at the rate events were recently done.
    pub fn totals_slow(&self, target: Duration) -> bool {
        let mut inner = self.lock();
        let held = inner.pending_total;
        let now = Instant::now();
        !inner.rate.drains_and_roll(held, now, target)
    }

    /// Resolves once an event of a paused partition is done, or, while holding, the
    /// totals drained to the level the loop reads again at (at once if that happened
    /// since the last call).
    pub async fn drained(&self) {
        self.drained.notified().await;
    }

    /// Events read and not yet done, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.lock().pending_total
    }

    /// How long the oldest event in flight of each partition has been waiting (`None`
    /// for a partition with nothing in flight).
    pub fn oldest_in_flight(&self) -> Vec<(TopicPartition, Option<Duration>)> {
        let inner = self.lock();
        let now = Instant::now();
        inner
            .partitions
            .iter()
            .map(|(tp, state)| {
                // Usually the lowest offset, but not after a skip was read again.
                let oldest = state
                    .pending
                    .values()
                    .map(|(at, _)| *at)
                    .min()
                    .map(|at| now - at);
                (tp.clone(), oldest)
            })
            .collect()
    }

    /// Publishes [`oldest_in_flight`](Self::oldest_in_flight) as the
    /// `oldest_in_flight_seconds` gauge (0 for a partition with nothing in flight).
    pub fn publish_oldest_in_flight(&self) {
        let gauge = &kd_telemetry::metrics().oldest_in_flight_seconds;
        for ((topic, partition), oldest) in self.oldest_in_flight() {
            gauge
                .with_label_values(&[&*topic, &partition.to_string()])
                .set(oldest.map_or(0.0, |d| d.as_secs_f64()));
        }
    }

    /// Events and bytes in flight over all partitions.
    pub fn held(&self) -> Held {
        let inner = self.lock();
        Held {
            events: inner.pending_total,
            bytes: inner.pending_bytes,
        }
    }

    /// Whether one partition holds `budget` or more in flight, does not drain it
    /// within `drain_target` at its recent rate, and (with `fairness`) has no stuck
    /// tenant over its share that could be skipped instead: whether it is to be paused
    /// now (`false` when it is not assigned).
    pub fn full_and_slow(
        &self,
        topic: &str,
        partition: i32,
        budget: Budget,
        drain_target: Duration,
        fairness: Option<Fairness>,
    ) -> bool {
        self.full_and_slow_at(
            topic,
            partition,
            budget,
            drain_target,
            fairness,
            Instant::now,
        )
    }

    /// [`full_and_slow`](Self::full_and_slow), with the time taken from `now` (asked
    /// only once the partition is at its budget).
    pub(super) fn full_and_slow_at(
        &self,
        topic: &str,
        partition: i32,
        budget: Budget,
        drain_target: Duration,
        fairness: Option<Fairness>,
        now: impl Fn() -> Instant,
    ) -> bool {
        let mut inner = self.lock();
        inner
            .partitions
            .get_mut(&At(topic, partition))
            .is_some_and(|state| {
                if !budget.reached_by(state.held()) {
                    return false;
                }
                verdicts::full_and_slow(state, budget, drain_target, fairness, now())
            })
    }

    /// Decides for every partition whether it should be paused now (`decide` sees what
    /// it holds in flight, whether that drains within `drain_target`, the totals and
    /// whether it is paused) and records the decisions. Returns the partitions whose
    /// state changes: to pause, to resume.
    pub fn pause_decisions(
        &self,
        drain_target: Duration,
        fairness: Option<Fairness>,
        mut decide: impl FnMut(&FlowInput) -> bool,
    ) -> (Vec<TopicPartition>, Vec<TopicPartition>) {
        let mut inner = self.lock();
        let now = Instant::now();
        let total = inner.pending_total;
        let total_bytes = inner.pending_bytes;
        let (mut pause, mut resume) = (Vec::new(), Vec::new());
        for ((topic, partition), state) in inner.partitions.iter_mut() {
            let (draining, skippable) =
                verdicts::draining_or_skippable(state, drain_target, fairness, now);
            let paused = decide(&FlowInput {
                draining,
                skippable,
                in_flight: state.pending.len(),
                bytes: state.load.pending_bytes,
                paused: state.load.paused,
                total,
                total_bytes,
                handled_ahead: state.handled_ahead.len(),
                skipping: state.skip.is_some(),
            });
            if paused != state.load.paused {
                state.load.paused = paused;
                let key = (topic.clone(), *partition);
                if paused {
                    pause.push(key);
                } else {
                    resume.push(key);
                }
            }
        }
        (pause, resume)
    }
}

/// What a backpressure decision looks at for one partition.
#[derive(Debug, Clone, Copy)]
pub struct FlowInput {
    pub in_flight: usize,
    /// Bytes in flight in this partition.
    pub bytes: usize,
    pub paused: bool,
    /// In flight over all partitions.
    pub total: usize,
    /// Bytes in flight over all partitions.
    pub total_bytes: usize,
    pub handled_ahead: usize,
    /// Whether some tenant's events are being skipped in this partition.
    pub skipping: bool,
    /// Whether what the partition holds drains within the target at its recent rate.
    pub draining: bool,
    /// Whether a tenant here is over its share and judged stuck (its further events
    /// will be skipped, so the partition can go on being read for the others).
    pub skippable: bool,
}
