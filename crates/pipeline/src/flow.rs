//! Flow control (backpressure): the budgets, and what they say of each partition. When
//! the totals are too high, the consume loop holds off reading (its states are in
//! `reading`: pausing every partition only if that lasts); a partition with too many events
//! or bytes in flight that it does not drain quickly is paused, and resumed as soon as
//! enough have drained. With fairness, a contended partition skips the events of tenants
//! at their share that do not drain quickly, and reads them again once those drain.
//!
//! "Drains quickly" (within [`DRAIN_TARGET`] at the recent rate of completions) is what
//! keeps a busy but healthy tenant from being skipped or its partition paused: either
//! makes librdkafka fetch the partition again (it drops what it prefetched for a paused
//! partition; a skip seeks back), which costs a lone tenant at a 20 ms sink a third of
//! its throughput, and helps nobody when what is held will be written within a second.
//!
//! Decides from the offset tracker's counts and acts on the consumer (pause, resume,
//! seek); never touches events or commits.

use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use crate::offsets::{Budget, Fairness, FlowInput, Held, OffsetTracker};

/// Most of the byte budget one partition may hold. Large records fill the byte budget
/// long before the event budget: a partition's byte share must stay small enough that a
/// down tenant's large records reach it (and fairness lets the others past them) well
/// before they fill the total, which would stop every partition.
pub(crate) const PARTITION_BYTES_SHARE: f64 = 0.1;

/// How far past the totals reading may go while stuck tenants are skipped everywhere:
/// half the budget more (see `reading`).
pub(crate) const OVERDRAFT: f64 = 0.5;

/// What a partition or a tenant holds in flight "drains quickly" when the rate at which
/// its events were recently done clears it within this.
pub(crate) const DRAIN_TARGET: Duration = Duration::from_secs(2);

/// Backpressure: pause a partition with too many events or bytes in flight (or all of
/// them when the totals are too high), resume it once enough have drained.
pub(crate) struct FlowControl {
    /// Held in flight in one partition at which it is paused.
    per_partition: Budget,
    /// Held in flight over all partitions at which reading holds.
    total: Budget,
    /// Most held while reading on past stuck tenants (see `reading`).
    overdraft: Budget,
    pub(crate) fairness: Option<Fairness>,
}

impl FlowControl {
    /// A partition may hold the same share of the byte budget as of the event budget
    /// (`total_bytes × per_partition / total`), but at most a tenth of it
    /// ([`PARTITION_BYTES_SHARE`]). With fairness (`tenant_share` below 1),
    /// a partition is contended once its budget is used up; tenants at their share that
    /// do not drain quickly are skipped there from then on. A partition pauses at its
    /// budget plus one share, if it does not drain quickly and nobody can be skipped.
    pub(crate) fn new(
        per_partition: usize,
        total: usize,
        total_bytes: usize,
        tenant_share: f64,
    ) -> Self {
        let total = Budget {
            events: total.max(1),
            bytes: total_bytes.max(1),
        };
        let per_partition = per_partition.max(1);
        let partition_share = (per_partition as f64 / total.events as f64).min(1.0);
        let budget = Budget {
            events: per_partition,
            bytes: ((total.bytes as f64 * partition_share.min(PARTITION_BYTES_SHARE)) as usize)
                .max(1),
        };
        let fairness = (tenant_share < 1.0).then(|| Fairness {
            contended_at: budget,
            per_source: budget.share(tenant_share),
            max_handled_ahead: per_partition.saturating_mul(50),
            drain_target: DRAIN_TARGET,
        });
        FlowControl {
            per_partition: match fairness {
                Some(f) => Budget {
                    events: budget.events + f.per_source.events,
                    bytes: budget.bytes.saturating_add(f.per_source.bytes),
                },
                None => budget,
            },
            overdraft: Budget {
                events: total.events + (total.events as f64 * OVERDRAFT) as usize,
                bytes: total
                    .bytes
                    .saturating_add((total.bytes as f64 * OVERDRAFT) as usize),
            },
            total,
            fairness,
        }
    }

    /// Whether at least half of the overdraft (past the budget) is free again.
    pub(crate) fn overdraft_half_free(&self, held: Held) -> bool {
        let at = self.overdraft_half();
        held.events <= at.events && held.bytes <= at.bytes
    }

    /// The totals at which half of the overdraft is free.
    pub(crate) fn overdraft_half(&self) -> Held {
        let half = |total: usize, overdraft: usize| total + (overdraft - total) / 2;
        Held {
            events: half(self.total.events, self.overdraft.events),
            bytes: half(self.total.bytes, self.overdraft.bytes),
        }
    }

    /// Three quarters of the totals' budget: where a hold ends.
    pub(crate) fn three_quarters(&self) -> Held {
        Held {
            events: self.total.events / 4 * 3,
            bytes: self.total.bytes / 4 * 3,
        }
    }

    /// Whether `held` (over all partitions) reached the totals' budget.
    pub(crate) fn total_reached(&self, held: Held) -> bool {
        self.total.reached_by(held)
    }

    /// Whether `held` (over all partitions) used up the overdraft.
    pub(crate) fn overdraft_reached(&self, held: Held) -> bool {
        self.overdraft.reached_by(held)
    }

    /// Whether the partition just read from reached its budget without draining it
    /// quickly, so that [`pause_and_resume`](Self::pause_and_resume) should run now
    /// rather than at the next tick.
    ///
    /// `held` is what the partition held when the event was admitted: below its budget
    /// (almost always) the tracker is not asked.
    pub(crate) fn reached(
        &self,
        tracker: &OffsetTracker,
        topic: &str,
        partition: i32,
        held: Held,
    ) -> bool {
        if !self.per_partition.reached_by(held) {
            return false;
        }
        tracker.full_and_slow(
            topic,
            partition,
            self.per_partition,
            DRAIN_TARGET,
            self.fairness,
        )
    }

    /// Reads partitions again from their first skipped offset once the tenants skipped
    /// there have drained below their share, or the partition to half its budget.
    pub(crate) fn reread_drained<C: Consumer<X>, X: ConsumerContext>(
        &self,
        consumer: &C,
        tracker: &OffsetTracker,
    ) {
        let Some(f) = self.fairness else { return };
        let half = Budget {
            events: f.contended_at.events.div_ceil(2),
            bytes: f.contended_at.bytes.div_ceil(2),
        };
        for (topic, partition, from) in tracker.skips_to_reread(half, f.per_source) {
            let seek = || {
                consumer.seek(
                    &topic,
                    partition,
                    Offset::Offset(from),
                    Duration::from_secs(1),
                )
            };
            match crate::kafka::blocking(seek) {
                Ok(()) => {
                    tracker.reread_from(&topic, partition, from);
                    kd_telemetry::metrics().fairness_rereads.inc();
                    tracing::debug!(%topic, partition, from, "reading skipped events again");
                }
                // The skip stays in force (its tenants' events are still skipped) and is
                // offered again at the next tick.
                Err(e) => {
                    tracing::warn!(%topic, partition, from, error = %e, "cannot seek back to skipped events; will retry");
                }
            }
        }
    }

    /// Pauses and resumes partitions as their in-flight counts say; with `long_hold`
    /// (the totals have been at their budget for a while), all of them while the totals
    /// are high.
    pub(crate) fn pause_and_resume<C: Consumer<X>, X: ConsumerContext>(
        &self,
        consumer: &C,
        tracker: &OffsetTracker,
        long_hold: bool,
    ) {
        let max_ahead = self.fairness.map_or(usize::MAX, |f| f.max_handled_ahead);
        let (pause, resume) =
            tracker.pause_decisions(DRAIN_TARGET, self.fairness, |f: &FlowInput| {
                // Skipping ahead is bounded too: the offsets handled past a skip are kept.
                let too_far_ahead = f.skipping && f.handled_ahead >= max_ahead;
                let (partition, total) = (
                    Held {
                        events: f.in_flight,
                        bytes: f.bytes,
                    },
                    Held {
                        events: f.total,
                        bytes: f.total_bytes,
                    },
                );
                if f.paused {
                    // Hysteresis: resume only well below the caps (or once it drains
                    // quickly again), so a partition does not flap between paused and
                    // fetching on every event.
                    ((f.in_flight > self.per_partition.events / 2
                        || f.bytes > self.per_partition.bytes / 2)
                        && !f.draining
                        && !f.skippable)
                        || (long_hold
                            && (f.total > self.total.events / 4 * 3
                                || f.total_bytes > self.total.bytes / 4 * 3))
                        || too_far_ahead
                } else {
                    (self.per_partition.reached_by(partition) && !f.draining && !f.skippable)
                        || (long_hold && self.total.reached_by(total))
                        || too_far_ahead
                }
            });
        for (list, paused) in [(pause, true), (resume, false)] {
            if list.is_empty() {
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            for (topic, partition) in &list {
                tpl.add_partition(topic, *partition);
            }
            let result = if paused {
                consumer.pause(&tpl)
            } else {
                consumer.resume(&tpl)
            };
            match result {
                Ok(()) => tracing::info!(partitions = ?list, paused, "backpressure"),
                Err(e) => tracing::warn!(error = %e, paused, "cannot pause or resume partitions"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn a_partition_gets_the_share_of_the_byte_budget_it_has_of_the_event_budget() {
        let flow = FlowControl::new(2000, 20_000, 256 * MIB, 0.5);
        let f = flow.fairness.unwrap();
        let partition = 256 * MIB / 10;
        assert_eq!(
            f.contended_at,
            Budget {
                events: 2000,
                bytes: partition
            }
        );
        assert_eq!(
            f.per_source,
            Budget {
                events: 1000,
                bytes: partition / 2
            }
        );
        assert_eq!(
            flow.per_partition,
            Budget {
                events: 3000,
                bytes: partition + partition / 2
            },
            "with fairness, the others may add one share before the partition pauses"
        );
        let off = FlowControl::new(2000, 20_000, 256 * MIB, 1.0);
        assert!(off.fairness.is_none());
        assert_eq!(
            off.per_partition,
            Budget {
                events: 2000,
                bytes: partition
            }
        );
        // A partition's event budget at half the total (the default) still gets only a
        // tenth of the bytes: large records meet fairness before they fill the total.
        let wide = FlowControl::new(10_000, 20_000, 256 * MIB, 1.0);
        assert_eq!(wide.per_partition.events, 10_000);
        assert_eq!(wide.per_partition.bytes, 256 * MIB / 10);
        let small = FlowControl::new(1_000, 20_000, 256 * MIB, 1.0);
        assert_eq!(small.per_partition.bytes, 256 * MIB / 20);
    }
}
