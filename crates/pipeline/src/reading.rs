//! How the consume loop reads, as the totals in flight (all partitions) allow: its
//! states, and the one function that moves between them ([`Reading::next`]).
//!
//! ```text
//!          totals reach their budget                   held ≥ 2 s, nothing drains and
//!   Open ───────────────────────────▶ Holding{since} ─ a tenant holding a share writes ──┐
//!    ▲  ◀──── down to ¾ of it ───────────┘             nothing                           │
//!    │                                                                                    ▼
//!    │◀──────────── down to ¾ of the budget ─────────────────────────────────── PastStuck
//!    │                                                  half the overdraft free ▲   │ overdraft
//!    │◀──────────── down to ¾ of the budget ───── PastStuckHolding{since} ──────┘   │ used up
//!                                                            ▲──────────────────────┘
//! ```
//!
//! Holding is not pausing: held records wait in librdkafka's queue, while pausing a
//! partition drops what it prefetched. A hold of [`LONG_HOLD`] or more pauses every
//! partition instead and reads (nothing), as librdkafka must be polled within
//! `max.poll.interval.ms`. Past stuck tenants, every partition counts as contended, so
//! their further events are skipped everywhere while the others' are read, up to an
//! overdraft of half the budget.

use std::time::{Duration, Instant};

use crate::flow::{FlowControl, DRAIN_TARGET};
use crate::offsets::{Held, OffsetTracker};

/// How long the loop may hold off reading before it pauses every partition instead.
pub(crate) const LONG_HOLD: Duration = Duration::from_secs(5);

/// How often the tenants in flight are looked through for one holding a share that
/// writes nothing (with 100,000 of them it costs a millisecond: not at every event).
const STUCK_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The consume loop's reading state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reading {
    /// Reading: the totals are under their budget.
    Open,
    /// Not taking events since `since`: the totals reached their budget.
    Holding { since: Instant },
    /// Reading on past tenants that hold a share and write nothing: their events are
    /// skipped in every partition, the others' read, up to the overdraft.
    PastStuck,
    /// Past stuck tenants, and the overdraft used up since `since`: not taking events.
    PastStuckHolding { since: Instant },
}

/// What [`Reading::next`] looks at besides the state: the flow control's budgets, the
/// tracker's counts, the time, and when the stuck tenants were last looked for.
pub(crate) struct Sight<'a> {
    pub flow: &'a FlowControl,
    pub tracker: &'a OffsetTracker,
    pub now: Instant,
    pub last_stuck_check: &'a mut Option<Instant>,
}

impl Reading {
    /// Since when the loop has not taken events, if it is holding.
    pub(crate) fn holding_since(self) -> Option<Instant> {
        match self {
            Reading::Holding { since } | Reading::PastStuckHolding { since } => Some(since),
            Reading::Open | Reading::PastStuck => None,
        }
    }

    /// Whether stuck tenants are skipped in every partition.
    pub(crate) fn past_stuck(self) -> bool {
        matches!(self, Reading::PastStuck | Reading::PastStuckHolding { .. })
    }

    /// Whether the hold has lasted [`LONG_HOLD`]: every partition is paused instead.
    pub(crate) fn long_hold(self, now: Instant) -> bool {
        self.holding_since()
            .is_some_and(|since| now.saturating_duration_since(since) >= LONG_HOLD)
    }

    /// While holding, the totals at or under which the loop reads again (three quarters
    /// of the budget; half the overdraft free past stuck tenants). Other reasons to
    /// stop holding (a stuck tenant found) are time-based: the loop's tick asks again.
    pub(crate) fn resume_at(self, flow: &FlowControl) -> Held {
        if self.past_stuck() {
            flow.overdraft_half()
        } else {
            flow.three_quarters()
        }
    }

    /// The state after this one, as the totals now held say. Every transition:
    /// - any state past stuck tenants → `Open` once the totals are down to three
    ///   quarters of the budget;
    /// - `Open` → `Holding` when the totals reach their budget;
    /// - `Holding` → `Open` once they are down to three quarters of it;
    /// - `Holding` → `PastStuck` (or `PastStuckHolding`, keeping its start, if the
    ///   overdraft is used up already) when it has held [`DRAIN_TARGET`], the totals do
    ///   not drain within that, and some tenant holding a share writes nothing, or
    ///   sooner when a tenant alone at a partition's cap has written nothing for half a
    ///   second (with fairness only: without it nothing can be skipped);
    /// - `PastStuck` → `PastStuckHolding` when the overdraft is used up;
    /// - `PastStuckHolding` → `PastStuck` once half of the overdraft is free again (not
    ///   at every event done).
    pub(crate) fn next(self, mut s: Sight<'_>) -> Reading {
        let held = s.tracker.held();
        let down_to_three_quarters = {
            let at = s.flow.three_quarters();
            held.events <= at.events && held.bytes <= at.bytes
        };
        match self {
            Reading::PastStuck | Reading::PastStuckHolding { .. } if down_to_three_quarters => {
                Reading::Open
            }
            Reading::PastStuck if s.flow.overdraft_reached(held) => {
                Reading::PastStuckHolding { since: s.now }
            }
            Reading::PastStuck => Reading::PastStuck,
            Reading::PastStuckHolding { .. } if s.flow.overdraft_half_free(held) => {
                Reading::PastStuck
            }
            Reading::PastStuckHolding { since } => Reading::PastStuckHolding { since },
            Reading::Open if s.flow.total_reached(held) => Reading::Holding { since: s.now },
            Reading::Open => Reading::Open,
            Reading::Holding { .. } if down_to_three_quarters => Reading::Open,
            Reading::Holding { since } if stuck_tenants(since, &mut s) => {
                tracing::info!(
                    in_flight = held.events,
                    "what is in flight does not drain: reading on, skipping stuck tenants everywhere"
                );
                if s.flow.overdraft_reached(held) {
                    Reading::PastStuckHolding { since }
                } else {
                    Reading::PastStuck
                }
            }
            Reading::Holding { since } => Reading::Holding { since },
        }
    }
}

/// Whether, holding since `since`, some tenant holds a share somewhere and writes
/// nothing, or holds a partition's cap alone there and has written nothing for half a
/// second: only such a one can be skipped. Many tenants each waiting for credentials at a cold start are slow
/// too, and so is a healthy tenant held back by its shards; reading on would only hold
/// more, or skip it for nothing.
fn stuck_tenants(since: Instant, s: &mut Sight<'_>) -> bool {
    let Some(f) = s.flow.fairness else {
        return false;
    };
    // A tenant alone at a partition's cap that has written nothing for half a second is
    // judged sooner (and is skipped there as soon as its partition is read on).
    if s.tracker.any_alone_at_cap_and_silent(f) {
        return true;
    }
    if s.now.saturating_duration_since(since) < DRAIN_TARGET || !s.tracker.totals_slow(DRAIN_TARGET)
    {
        return false;
    }
    if s.last_stuck_check
        .is_some_and(|at| s.now.saturating_duration_since(at) < STUCK_CHECK_EVERY)
    {
        return false;
    }
    *s.last_stuck_check = Some(s.now);
    s.tracker.any_tenant_stuck_holding(f.per_source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offsets::{Admission, Ticket};
    use std::sync::Arc;

    const MIB: usize = 1024 * 1024;

    /// An event of `source` at `offset` of partition t/0, admitted without fairness.
    fn handled(tracker: &OffsetTracker, source: &Arc<str>, offset: i64) -> Ticket {
        match tracker.admit("t", 0, offset, 0, Some(source), None) {
            Admission::Handle(ticket, _) => ticket,
            other => panic!("{other:?}"),
        }
    }

    /// The state after `from`, now, never having looked for stuck tenants.
    fn next(flow: &FlowControl, tracker: &OffsetTracker, from: Reading) -> Reading {
        from.next(Sight {
            flow,
            tracker,
            now: Instant::now(),
            last_stuck_check: &mut None,
        })
    }

    fn holding_a_while() -> Reading {
        Reading::Holding {
            since: Instant::now() - DRAIN_TARGET,
        }
    }

    #[test]
    fn totals_full_of_many_small_tenants_waiting_are_held_not_read_past() {
        // A cold start: every tenant waits for its credentials, none holds a share.
        let flow = FlowControl::new(10, 20, 256 * MIB, 0.5);
        let tracker = OffsetTracker::default();
        tracker.assign([("t", 0)]);
        for o in 0..20 {
            let tenant: Arc<str> = format!("tenant-{o}").into();
            tracker.admit("t", 0, o, 0, Some(&tenant), None);
        }
        let held = holding_a_while();
        assert_eq!(next(&flow, &tracker, held), held);
    }

    #[test]
    fn a_tenant_alone_at_its_partitions_cap_that_writes_nothing_is_read_past_after_half_a_second() {
        // Budget 10 a partition, a share 5, so the cap is 15; 20 in all.
        let flow = FlowControl::new(10, 20, 256 * MIB, 0.5);
        let tracker = OffsetTracker::default();
        tracker.assign([("t", 0), ("t", 1)]);
        let silent: Arc<str> = "silent".into();
        for o in 0..20 {
            handled(&tracker, &silent, o);
        }
        let held = Reading::Holding {
            since: Instant::now(),
        };
        assert_eq!(next(&flow, &tracker, held), held, "not judged yet");
        std::thread::sleep(Duration::from_millis(550));
        assert_eq!(
            next(&flow, &tracker, held),
            Reading::PastStuck,
            "nothing done in half a second, long before the 2 s hold that judges the others"
        );
    }

    #[test]
    fn a_tenant_alone_at_its_partitions_cap_that_drains_quickly_is_held() {
        let flow = FlowControl::new(10, 20, 256 * MIB, 0.5);
        let tracker = OffsetTracker::default();
        tracker.assign([("t", 0)]);
        let busy: Arc<str> = "busy".into();
        let tickets: Vec<_> = (0..25).map(|o| handled(&tracker, &busy, o)).collect();
        for ticket in &tickets[..5] {
            tracker.done(ticket);
        }
        std::thread::sleep(Duration::from_millis(120));
        // 20 held (the cap is 15), 5 done in 120 ms: they drain in under the target.
        let held = Reading::Holding {
            since: Instant::now(),
        };
        assert_eq!(next(&flow, &tracker, held), held);
    }

    #[test]
    fn a_slow_tenant_that_still_writes_is_held_not_read_past() {
        // Held back by its shards, not down: some of its events are done.
        let flow = FlowControl::new(10, 20, 256 * MIB, 0.5);
        let tracker = OffsetTracker::default();
        tracker.assign([("t", 0)]);
        let busy: Arc<str> = "busy".into();
        let tickets: Vec<_> = (0..21).map(|o| handled(&tracker, &busy, o)).collect();
        std::thread::sleep(Duration::from_millis(120));
        tracker.done(&tickets[0]);
        let held = holding_a_while();
        assert_eq!(next(&flow, &tracker, held), held);
    }

    #[test]
    fn totals_full_of_events_that_do_not_drain_are_read_past_up_to_the_overdraft() {
        let flow = FlowControl::new(10, 20, 256 * MIB, 0.5);
        let tracker = OffsetTracker::default();
        tracker.assign([("t", 0)]);
        let down: Arc<str> = "down".into();
        let read = |o| handled(&tracker, &down, o);
        let tickets: Vec<_> = (0..20).map(read).collect();
        // Nothing done for 100 ms and more: the tenant counts as writing nothing.
        std::thread::sleep(Duration::from_millis(120));
        assert!(
            matches!(
                next(&flow, &tracker, Reading::Open),
                Reading::Holding { .. }
            ),
            "at the budget: hold"
        );
        assert_eq!(
            next(&flow, &tracker, holding_a_while()),
            Reading::PastStuck,
            "held for a while, nothing drains, a tenant holds a share: read on"
        );
        // Looked for stuck tenants less than a second ago: not again.
        let mut just_now = Some(Instant::now());
        let held = holding_a_while();
        let again = held.next(Sight {
            flow: &flow,
            tracker: &tracker,
            now: Instant::now(),
            last_stuck_check: &mut just_now,
        });
        assert_eq!(again, held);
        for o in 20..29 {
            read(o);
        }
        assert_eq!(
            next(&flow, &tracker, Reading::PastStuck),
            Reading::PastStuck,
            "29 of the overdraft's 30"
        );
        let last = read(29);
        let full = next(&flow, &tracker, Reading::PastStuck);
        assert!(
            matches!(full, Reading::PastStuckHolding { .. }),
            "the overdraft is used up"
        );
        assert_eq!(full.resume_at(&flow), flow.overdraft_half());
        for ticket in tickets.iter().take(4) {
            tracker.done(ticket);
        }
        assert_eq!(
            next(&flow, &tracker, full),
            full,
            "26: not half the overdraft free yet"
        );
        tracker.done(&tickets[4]);
        assert_eq!(
            next(&flow, &tracker, full),
            Reading::PastStuck,
            "25: half of it free, read again"
        );
        for ticket in tickets.iter().skip(5).take(10).chain([&last]) {
            tracker.done(ticket);
        }
        assert_eq!(
            next(&flow, &tracker, Reading::PastStuck),
            Reading::Open,
            "14: under three quarters, back to normal"
        );
        let off = FlowControl::new(10, 20, 256 * MIB, 1.0);
        for o in 30..40 {
            read(o);
        }
        let held = holding_a_while();
        assert_eq!(
            next(&off, &tracker, held),
            held,
            "without fairness nothing could be skipped: hold"
        );
    }

    #[test]
    fn a_long_hold_is_told_from_a_short_one() {
        let now = Instant::now();
        let short = Reading::Holding { since: now };
        let long = Reading::PastStuckHolding {
            since: now - LONG_HOLD,
        };
        assert!(!short.long_hold(now));
        assert!(long.long_hold(now));
        assert!(!Reading::Open.long_hold(now) && !Reading::PastStuck.long_hold(now));
    }
}
