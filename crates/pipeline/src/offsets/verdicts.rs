//! Fairness and backpressure verdicts: questions about one partition's state, asked
//! under the tracker's lock. The one thing they change is a drain window they read: it
//! closes when read once half a second long ([`DrainRate::drains_and_roll`]), as a
//! measurement does; nothing else.
//!
//! [`DrainRate::drains_and_roll`]: crate::drain_rate::DrainRate::drains_and_roll

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::partition::{PartitionLoad, PartitionState};

/// What a tenant or a partition holds in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub events: usize,
    pub bytes: usize,
}

/// A limit on what is held in flight, in events and in bytes: reached when either is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub events: usize,
    pub bytes: usize,
}

impl Budget {
    pub fn reached_by(&self, held: Held) -> bool {
        held.events >= self.events || held.bytes >= self.bytes
    }

    /// The budget scaled by `share` (at least one event and one byte).
    pub fn share(&self, share: f64) -> Budget {
        Budget {
            events: ((self.events as f64 * share) as usize).max(1),
            bytes: ((self.bytes as f64 * share) as usize).max(1),
        }
    }
}

/// Fairness limits within one partition.
#[derive(Debug, Clone, Copy)]
pub struct Fairness {
    /// Held in flight in one partition from which on it is contended: tenants at their
    /// share are skipped there (below it, nobody is).
    pub contended_at: Budget,
    /// Most one tenant may hold in flight in a contended partition.
    pub per_source: Budget,
    /// Most skipped-ahead offsets remembered per partition; past it the partition pauses.
    pub max_handled_ahead: usize,
    /// A tenant whose events in flight in a partition drain within this, at the rate
    /// they have recently been done, is not skipped there: it is busy, not stuck, and
    /// skipping it would only make the partition be fetched again.
    pub drain_target: Duration,
}

/// A partition's cap: its budget plus one share, in events or bytes.
fn cap(f: &Fairness) -> Budget {
    Budget {
        events: f.contended_at.events + f.per_source.events,
        bytes: f.contended_at.bytes.saturating_add(f.per_source.bytes),
    }
}

/// What a tenant alone in flight in its partition may hold there before it is skipped
/// whatever its rate: twice the cap in events, the cap itself in bytes (a down tenant's
/// large records must still meet fairness long before they fill the totals).
fn alone_limit(f: &Fairness) -> Budget {
    let cap = cap(f);
    Budget {
        events: cap.events.saturating_mul(2),
        bytes: cap.bytes,
    }
}

/// Whether one tenant alone is in flight in the partition, holding its share.
fn alone_holding_its_share(p: &PartitionState, f: &Fairness) -> bool {
    p.load.by_source.len() == 1
        && p.load
            .by_source
            .values()
            .all(|(held, _)| f.per_source.reached_by(*held))
}

/// For a tenant alone in flight in the partition, at the partition's cap: whether it
/// is to be skipped. At [`alone_limit`], yes. Below it, by how fast the partition drains
/// what it holds, measured since what it holds began to be read; while nothing was done
/// yet, once the oldest event has waited [`ALONE_AT_CAP_JUDGED_AFTER`] (credentials and
/// connections take that long at most when all is well). Reads only.
fn alone_at_cap_stuck(p: &PartitionState, f: &Fairness, now: Instant) -> bool {
    let held = p.held();
    if alone_limit(f).reached_by(held) {
        return true;
    }
    let Some((_, (oldest, _))) = p.pending.first_key_value() else {
        return false;
    };
    match p
        .load
        .rate
        .drains_since(held.events, *oldest, now, f.drain_target)
    {
        Some(drains) => !drains,
        None => now.saturating_duration_since(*oldest) >= ALONE_AT_CAP_JUDGED_AFTER,
    }
}

/// Whether one tenant alone in flight in the partition, holding its share, holds the
/// partition's cap and has had nothing done for [`ALONE_AT_CAP_JUDGED_AFTER`] (or holds
/// [`alone_limit`]): [`stuck`] skips its further events there, so while the totals are
/// at their budget the loop should read on past it at once rather than hold. A lone
/// tenant that writes, however slowly, is judged as events are read, not while the loop
/// holds (see `reading`). Reads only.
pub(super) fn alone_at_cap_and_silent(p: &PartitionState, f: &Fairness, now: Instant) -> bool {
    let held = p.held();
    alone_holding_its_share(p, f)
        && cap(f).reached_by(held)
        && (alone_limit(f).reached_by(held)
            || (p.load.rate.idle(now) && waited_longer_than(p, ALONE_AT_CAP_JUDGED_AFTER, now)))
}

/// How long a tenant alone in its partition at the partition's cap, of which nothing
/// was done yet, is left to start writing before it is skipped there.
pub(super) const ALONE_AT_CAP_JUDGED_AFTER: Duration = Duration::from_millis(500);

/// Whether the event read first of those in flight (the lowest offset: the oldest but
/// for events read again after a skip) has waited `limit` or longer.
pub(super) fn waited_longer_than(p: &PartitionState, limit: Duration, now: Instant) -> bool {
    p.pending
        .first_key_value()
        .is_some_and(|(_, (at, _))| now.saturating_duration_since(*at) >= limit)
}

/// Whether `source`, over its share of this contended partition, is to be skipped.
/// Always at the partition's cap (its budget plus one share, in events or bytes) when
/// other tenants have events in flight there too: what a tenant may hold beside them
/// stays bounded however fast it drained until now, or a busy tenant whose stream then
/// fails would fill the totals and stop the whole pod until its events' retry window
/// ran out. Below the cap, or alone in the partition, when it does not drain quickly;
/// but not before the partition's oldest event has waited as long as draining may take
/// (a rate measured while writing starts up, credentials and connections, says
/// nothing yet). A tenant alone in the partition at the cap is skipped when the
/// partition does not drain what it holds quickly, or has done nothing for
/// [`ALONE_AT_CAP_JUDGED_AFTER`] ([`alone_at_cap_stuck`]): skipping a lone tenant that
/// drains reads the partition ahead only to drop its own events and fetch them again (a
/// backlog read one partition at a time reaches the cap in the first second), while one
/// that drains slowly may hide other tenants' events behind its backlog, which the skip
/// reaches.
///
/// With `everywhere` (the totals are full of events that do not drain), there is no
/// waiting for a verdict: a tenant gone down would otherwise fill each partition read
/// afresh during its judging period.
pub(super) fn stuck(
    p: &mut PartitionState,
    source: &Arc<str>,
    f: &Fairness,
    now: Instant,
    everywhere: bool,
) -> bool {
    // A tenant alone in flight in the partition is judged by the partition's rate: its
    // own is forgotten whenever it has nothing in flight, and a busy tenant read in
    // bursts often has not.
    let alone = p.load.by_source.len() == 1;
    if cap(f).reached_by(p.held()) {
        return !alone || alone_at_cap_stuck(p, f, now);
    }
    if everywhere {
        return idle(p, source, now);
    }
    if !waited_longer_than(p, f.drain_target, now) {
        return false;
    }
    let PartitionLoad {
        by_source, rate, ..
    } = &mut p.load;
    by_source.get_mut(source).is_none_or(|(held, own)| {
        let rate = if alone { rate } else { own };
        !rate.drains_and_roll(held.events, now, f.drain_target)
    })
}

/// Whether `source` has events in flight here and none of them was done lately (judged
/// by the partition's completions when it is alone in flight, as in [`stuck`]).
pub(super) fn idle(p: &PartitionState, source: &Arc<str>, now: Instant) -> bool {
    let alone = p.load.by_source.len() == 1;
    p.load.by_source.get(source).is_some_and(|(held, own)| {
        held.events > 0
            && if alone {
                p.load.rate.idle(now)
            } else {
                own.idle(now)
            }
    })
}

/// Whether some tenant here holds its share or more and is judged stuck: it can be
/// skipped, so the partition need not be paused.
pub(super) fn has_stuck_source(p: &mut PartitionState, f: &Fairness, now: Instant) -> bool {
    let over: Vec<Arc<str>> = p
        .load
        .by_source
        .iter()
        .filter(|(_, (held, _))| f.per_source.reached_by(*held))
        .map(|(source, _)| source.clone())
        .collect();
    over.iter().any(|source| stuck(p, source, f, now, false))
}

/// Whether the partition holds `budget` or more, does not drain it within
/// `drain_target` at its recent rate, and (with `fairness`) has no stuck tenant over its
/// share that could be skipped instead: whether it is to be paused now.
pub(super) fn full_and_slow(
    p: &mut PartitionState,
    budget: Budget,
    drain_target: Duration,
    fairness: Option<Fairness>,
    now: Instant,
) -> bool {
    let held = p.held();
    budget.reached_by(held)
        && waited_longer_than(p, drain_target, now)
        && !p.load.rate.drains_and_roll(held.events, now, drain_target)
        && !fairness
            .is_some_and(|f| f.contended_at.reached_by(held) && has_stuck_source(p, &f, now))
}

/// For a pause decision: whether what the partition holds drains within `drain_target`
/// (or is too young to tell), and if not, whether a stuck tenant over its share could
/// be skipped instead.
pub(super) fn draining_or_skippable(
    p: &mut PartitionState,
    drain_target: Duration,
    fairness: Option<Fairness>,
    now: Instant,
) -> (bool, bool) {
    let draining = !waited_longer_than(p, drain_target, now)
        || p.load
            .rate
            .drains_and_roll(p.pending.len(), now, drain_target);
    let skippable = !draining
        && fairness
            .is_some_and(|f| f.contended_at.reached_by(p.held()) && has_stuck_source(p, &f, now));
    (draining, skippable)
}
