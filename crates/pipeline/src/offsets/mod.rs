//! Acknowledge: which Kafka offsets may be committed.
//!
//! An event is *done* once its record is written to Kinesis or its dead letter is
//! confirmed by Kafka. The committable offset of a partition is the lowest offset not yet
//! done (or, with nothing pending, one past the highest read): never past an event that
//! is still in flight, so a crash can only re-deliver, never skip (see "What the worker
//! guarantees" in the README).
//!
//! Each assignment of a partition gets a new epoch; acknowledgements of events read
//! under an older assignment are ignored, so a revoked partition's late completions
//! cannot commit on behalf of its new owner. Each assignment also has its own
//! cancellation token: revoking a partition abandons its in-flight events at once, so
//! the old owner does not keep writing events that the new owner is writing too.
//!
//! The tracker also knows how many events each partition has in flight, which is what
//! backpressure (pausing a partition) is decided on, and how many of them each tenant
//! has, which is what fairness is decided on. While a partition's budget is not used up,
//! any tenant may use it (a partition holding one busy tenant runs at full speed). Once
//! it is, a tenant holding its share or more has its further events of that partition
//! *skipped* (not read into memory) while the others' go on; once its backlog drains
//! below its share, the partition is read again from the first skipped offset, and what
//! was already handled is recognised and passed over. The commit watermark never passes
//! a skipped offset.
//!
//! The state of a partition (its commit ledger and its load) is in `partition`; the
//! fairness and backpressure questions asked of it, which change nothing, in
//! `verdicts`. All of it sits under one lock here: the invariants (never commit past a
//! pending or skipped offset, never count an event twice) hold only together, and the
//! randomized model test at the bottom checks them together.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::drain_rate::DrainRate;
use crate::offset_set::OffsetSet;

mod load;
mod partition;
mod verdicts;

pub use load::FlowInput;
use partition::{PartitionLoad, PartitionState, Skip};
pub use verdicts::{Budget, Fairness, Held};

/// A topic and partition.
pub type TopicPartition = (Arc<str>, i32);

/// Identifies one event read from Kafka, for acknowledging it later.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    epoch: u64,
    /// Cancelled when the partition is revoked or the worker shuts down.
    /// Shared: cloning a `CancellationToken` takes its lock, and every event has one.
    pub cancel: Arc<CancellationToken>,
    /// The tenant it counts against, for fairness.
    source: Option<Arc<str>>,
}

impl Ticket {
    /// Whether both were read from the same partition in the same assignment (so one
    /// revocation cancels both).
    pub fn same_assignment(&self, other: &Ticket) -> bool {
        self.partition == other.partition && self.epoch == other.epoch && self.topic == other.topic
    }
}

/// What to do with an event just read.
#[derive(Debug)]
pub enum Admission {
    /// Handle it; acknowledge with the ticket. With what its partition holds in flight
    /// now, counting it (so the reader need not ask again under the lock).
    Handle(Ticket, Held),
    /// Its tenant is over its share: leave it for a later read of the partition.
    Skip,
    /// Already handled before the partition was read again.
    Duplicate,
    /// The partition is not ours.
    NotAssigned,
}

/// The offset state of every partition this consumer owns.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    inner: Mutex<Inner>,
    /// Parent of every partition's token: cancelled at shutdown.
    cancel: CancellationToken,
    /// Told when an event of a paused partition is done, or when the totals drained to
    /// where the consume loop, holding off reading, reads again (see
    /// [`set_holding`](Self::set_holding)): the loop may then take events again without
    /// waiting for its next tick.
    drained: tokio::sync::Notify,
    /// Every partition counts as contended (see
    /// [`set_contended_everywhere`](Self::set_contended_everywhere)).
    contended_everywhere: std::sync::atomic::AtomicBool,
}

/// A partition, to look up `Inner::partitions` with: hashes as its key does.
#[derive(Hash)]
struct At<'a>(&'a str, i32);

impl hashbrown::Equivalent<(Arc<str>, i32)> for At<'_> {
    fn equivalent(&self, key: &(Arc<str>, i32)) -> bool {
        *self.0 == *key.0 && self.1 == key.1
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Looked up by [`At`] (no copy of the topic's name per lookup), with hashbrown's
    /// faster hasher (topics and partitions are the operator's, not the producers').
    partitions: hashbrown::HashMap<(Arc<str>, i32), PartitionState>,
    next_epoch: u64,
    pending_total: usize,
    /// Bytes of the events in flight, over all partitions.
    pending_bytes: usize,
    /// How fast the events in flight drain, over all partitions.
    rate: DrainRate,
    /// While the consume loop holds off reading: the totals at or under which it reads
    /// again.
    resume_at: Option<Held>,
}

impl OffsetTracker {
    /// A tracker whose partitions' tokens are children of `cancel`.
    pub fn new(cancel: CancellationToken) -> Self {
        OffsetTracker {
            inner: Mutex::default(),
            cancel,
            drained: tokio::sync::Notify::new(),
            contended_everywhere: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking newly assigned partitions afresh.
    pub fn assign<'a>(&self, partitions: impl IntoIterator<Item = (&'a str, i32)>) {
        let mut inner = self.lock();
        for (topic, partition) in partitions {
            inner.next_epoch += 1;
            let epoch = inner.next_epoch;
            let old = inner.partitions.insert(
                (topic.into(), partition),
                PartitionState {
                    epoch,
                    pending: BTreeMap::new(),
                    next: None,
                    seen: None,
                    committed: None,
                    cancel: Arc::new(self.cancel.child_token()),
                    skip: None,
                    handled_ahead: OffsetSet::default(),
                    load: PartitionLoad::new(Instant::now()),
                },
            );
            if let Some(old) = old {
                old.cancel.cancel();
                inner.forget(&old);
            }
        }
        inner.publish();
    }

    /// Stops tracking revoked partitions; their in-flight events are abandoned (the new
    /// owner reads them again from the last commit).
    pub fn revoke<'a>(&self, partitions: impl IntoIterator<Item = (&'a str, i32)>) {
        let mut inner = self.lock();
        for (topic, partition) in partitions {
            if let Some(old) = inner.partitions.remove(&At(topic, partition)) {
                old.cancel.cancel();
                inner.forget(&old);
                forget_oldest_gauge(topic, partition);
            }
        }
        inner.publish();
    }

    /// Registers an event as read and in flight, without fairness. `None` when the
    /// partition is not (or no longer) assigned to us: the event must then be ignored.
    pub fn read(&self, topic: &str, partition: i32, offset: i64) -> Option<Ticket> {
        match self.admit(topic, partition, offset, 0, None, None) {
            Admission::Handle(t, _) => Some(t),
            _ => None,
        }
    }

    /// Decides what to do with an event of `source` just read (holding `bytes` in
    /// memory), and registers it in flight when it is to be handled. With `fairness`, a
    /// tenant at its share of a contended partition has this and its further events of
    /// the partition skipped.
    pub fn admit(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        bytes: usize,
        source: Option<&Arc<str>>,
        fairness: Option<Fairness>,
    ) -> Admission {
        self.admit_at(
            topic,
            partition,
            offset,
            bytes,
            source,
            fairness,
            Instant::now,
        )
    }

    /// [`admit`](Self::admit), with the time taken from `now` (asked only when a
    /// tenant's drain rate is begun or asked for).
    #[allow(clippy::too_many_arguments)]
    fn admit_at(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        bytes: usize,
        source: Option<&Arc<str>>,
        fairness: Option<Fairness>,
        now: impl Fn() -> Instant,
    ) -> Admission {
        let mut inner = self.lock();
        let Some(((shared_topic, _), state)) =
            inner.partitions.get_key_value_mut(&At(topic, partition))
        else {
            return Admission::NotAssigned;
        };
        let shared_topic = shared_topic.clone();
        state.next = Some(state.next.map_or(offset + 1, |n| n.max(offset + 1)));
        state.seen = state.seen.max(state.next);
        if state.handled_ahead.contains(offset) {
            if state.skip.is_none() {
                // Read again past every skip: nothing below will be read again.
                state.handled_ahead.retain_from(offset + 1);
            }
            return Admission::Duplicate;
        }
        if let (Some(source), Some(f)) = (source, fairness) {
            let skipping = state
                .skip
                .as_ref()
                .is_some_and(|s| s.sources.contains(source));
            let everywhere = self
                .contended_everywhere
                .load(std::sync::atomic::Ordering::Relaxed);
            let over = || {
                (everywhere || f.contended_at.reached_by(state.held()))
                    && f.per_source.reached_by(state.held_by(source))
            };
            if skipping || (over() && verdicts::stuck(state, source, &f, now(), everywhere)) {
                if !skipping {
                    tracing::debug!(
                        topic,
                        partition,
                        offset,
                        %source,
                        partition_held = state.held().events,
                        source_held = state.held_by(source).events,
                        everywhere,
                        "skipping a tenant's events in a contended partition"
                    );
                }
                let skip = state.skip.get_or_insert_with(|| Skip {
                    from: offset,
                    sources: Default::default(),
                });
                skip.from = skip.from.min(offset);
                skip.sources.insert(source.clone());
                return Admission::Skip;
            }
        }
        let epoch = state.epoch;
        let cancel = state.cancel.clone();
        if state.skip.is_some() {
            state.handled_ahead.insert(offset);
        }
        let inserted = !state.pending.contains_key(&offset);
        if inserted {
            state.pending.insert(offset, (now(), bytes));
            if let Some(source) = source {
                let (held, _) = state
                    .load
                    .by_source
                    .entry(source.clone())
                    .or_insert_with(|| (Held::default(), DrainRate::new(now())));
                held.events += 1;
                held.bytes += bytes;
            }
            state.load.pending_bytes += bytes;
        }
        let partition_held = state.held();
        if inserted {
            inner.pending_total += 1;
            inner.pending_bytes += bytes;
        }
        inner.publish();
        Admission::Handle(
            Ticket {
                topic: shared_topic,
                partition,
                offset,
                epoch,
                cancel,
                source: source.cloned(),
            },
            partition_held,
        )
    }

    /// Ends the skip of a partition whose reading was just moved back to `from` (its
    /// first skipped offset): the next events read are the skipped ones and those
    /// handled after them, which are passed over.
    pub fn reread_from(&self, topic: &str, partition: i32, from: i64) {
        let mut inner = self.lock();
        let Some(state) = inner.partitions.get_mut(&At(topic, partition)) else {
            return;
        };
        if state.skip.as_ref().is_some_and(|skip| skip.from == from) {
            state.skip = None;
            state.handled_ahead.retain_from(from);
            // Reading resumes at the skip: nothing at or past it counts as read until it
            // is read again, or the watermark would jump past it. (A seek bumps
            // librdkafka's version barrier for the partition at once, and messages
            // fetched before it are dropped when served, so the next message of this
            // partition is the one at the skip.)
            state.next = Some(from);
        }
    }

    /// The reader's position in a partition, as librdkafka keeps it: one past the last
    /// event it handed out, or past the transaction markers and aborted transactions'
    /// records it passed over after that event (a `read_committed` consumer never sees
    /// them). The reader calls it between reads, so every offset below `position` was
    /// either admitted or is one librdkafka never hands out: the watermark may move up
    /// to it once what was admitted is done. Without it a partition whose last record is
    /// a commit marker would be committed one short of its end for ever (and one with
    /// only an aborted transaction since the last commit, not at all).
    ///
    /// Ignored while events are skipped or read again after a skip: a skip leaves events
    /// behind the position that are not admitted, and until reading is past where it
    /// was before the seek back, the position (unset by the seek, then moved by the
    /// events read again) says nothing about the offsets beyond.
    pub fn passed(&self, topic: &str, partition: i32, position: i64) {
        let mut inner = self.lock();
        let Some(state) = inner.partitions.get_mut(&At(topic, partition)) else {
            return;
        };
        if state.skip.is_some() || state.next != state.seen {
            return;
        }
        if state.next.is_none_or(|next| position > next) {
            state.next = Some(position);
            state.seen = Some(position);
        }
    }

    /// Marks an event done (written or dead-lettered).
    pub fn done(&self, ticket: &Ticket) {
        let mut inner = self.lock();
        let Some(state) = inner
            .partitions
            .get_mut(&At(&ticket.topic, ticket.partition))
        else {
            return;
        };
        if state.epoch != ticket.epoch {
            return;
        }
        let paused = state.load.paused;
        // The bytes are those recorded when the offset was admitted, whichever ticket
        // of it finishes first.
        if let Some((_, bytes)) = state.pending.remove(&ticket.offset) {
            state.load.pending_bytes -= bytes;
            state.load.rate.count();
            if let Some(source) = &ticket.source {
                if let Some((held, rate)) = state.load.by_source.get_mut(source) {
                    rate.count();
                    held.events -= 1;
                    held.bytes -= bytes;
                    if held.events == 0 {
                        state.load.by_source.remove(source);
                    }
                }
            }
            inner.pending_total -= 1;
            inner.pending_bytes -= bytes;
            inner.rate.count();
        }
        // Holding: only once the totals are where the loop reads again (waking it at
        // every event done cost a thread wake-up per event, for nothing).
        let resume = inner
            .resume_at
            .is_some_and(|at| inner.pending_total <= at.events && inner.pending_bytes <= at.bytes);
        inner.publish();
        drop(inner);
        if paused || resume {
            self.drained.notify_one();
        }
    }

    /// Offsets to commit now (Kafka's convention: the next offset to read), for the
    /// partitions whose watermark moved since the last call. When `only` is given,
    /// just those partitions.
    pub fn to_commit(&self, only: Option<&[(String, i32)]>) -> Vec<(Arc<str>, i32, i64)> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for ((topic, partition), state) in inner.partitions.iter_mut() {
            if let Some(only) = only {
                if !only
                    .iter()
                    .any(|(t, p)| t.as_str() == &**topic && p == partition)
                {
                    continue;
                }
            }
            if let Some(w) = state.watermark() {
                if state.committed.is_none_or(|c| w > c) {
                    state.committed = Some(w);
                    out.push((topic.clone(), *partition, w));
                }
            }
        }
        out
    }

    /// Forgets that offsets were handed out for commit (the commit failed), so the next
    /// [`to_commit`](Self::to_commit) offers them again.
    pub fn commit_failed(&self, offsets: &[(Arc<str>, i32, i64)]) {
        let mut inner = self.lock();
        for (topic, partition, offset) in offsets {
            if let Some(state) = inner.partitions.get_mut(&At(topic, *partition)) {
                if state.committed == Some(*offset) {
                    state.committed = None;
                }
            }
        }
    }
}

impl Inner {
    /// Takes a partition's events in flight out of the totals (revoked or reassigned).
    fn forget(&mut self, old: &PartitionState) {
        self.pending_total -= old.pending.len();
        self.pending_bytes -= old.load.pending_bytes;
    }
}

impl Inner {
    fn publish(&self) {
        let m = kd_telemetry::metrics();
        m.in_flight_events.set(self.pending_total as i64);
        m.in_flight_bytes.set(self.pending_bytes as i64);
    }
}

fn forget_oldest_gauge(topic: &str, partition: i32) {
    let _ = kd_telemetry::metrics()
        .oldest_in_flight_seconds
        .remove_label_values(&[topic, &partition.to_string()]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tracker() -> OffsetTracker {
        let t = OffsetTracker::default();
        t.assign([("t", 0)]);
        t
    }

    #[test]
    fn commits_only_contiguous_offsets() {
        let t = tracker();
        let a = t.read("t", 0, 10).unwrap();
        let b = t.read("t", 0, 11).unwrap();
        let c = t.read("t", 0, 12).unwrap();
        t.done(&b);
        t.done(&c);
        // 10 is still in flight: nothing past it may be committed.
        assert_eq!(t.to_commit(None), vec![(Arc::from("t"), 0, 10)]);
        t.done(&a);
        assert_eq!(t.to_commit(None), vec![(Arc::from("t"), 0, 13)]);
        assert!(
            t.to_commit(None).is_empty(),
            "unchanged watermark is not re-committed"
        );
    }

    /// A transactional producer's partition: records, then the commit marker
    /// librdkafka passes over (offset 3), then an aborted transaction it filters out
    /// (4, 5) and its abort marker (6). The reader's position is past all of them once
    /// the last record it handed out is done.
    #[test]
    fn commits_move_past_transaction_markers_and_aborted_records_the_reader_passed() {
        let t = tracker();
        let a = t.read("t", 0, 0).unwrap();
        let b = t.read("t", 0, 1).unwrap();
        let c = t.read("t", 0, 2).unwrap();
        t.passed("t", 0, 7);
        t.done(&a);
        assert_eq!(t.to_commit(None), vec![(Arc::from("t"), 0, 1)]);
        t.done(&c);
        t.done(&b);
        assert_eq!(
            t.to_commit(None),
            vec![(Arc::from("t"), 0, 7)],
            "past the commit marker, the aborted records and the abort marker"
        );
        // A position behind what was read (a stale report) changes nothing.
        t.passed("t", 0, 5);
        let d = t.read("t", 0, 9).unwrap();
        t.done(&d);
        assert_eq!(t.to_commit(None), vec![(Arc::from("t"), 0, 10)]);
    }

    #[test]
    fn a_partition_of_only_markers_and_aborted_records_is_committed_to_its_position() {
        let t = tracker();
        assert!(t.to_commit(None).is_empty());
        t.passed("t", 0, 4);
        assert_eq!(t.to_commit(None), vec![(Arc::from("t"), 0, 4)]);
        // Not assigned: nothing.
        t.passed("u", 0, 4);
        assert!(t.to_commit(None).is_empty());
    }

    /// While skipped events are read again, the position is not believed until reading
    /// is past where it was before the seek back.
    #[test]
    fn the_position_is_ignored_while_skipped_events_are_read_again() {
        let t = tracker();
        let (big, small): (Arc<str>, Arc<str>) = ("big".into(), "small".into());
        let f = fair(2, 1);
        let admit = |o, s: &Arc<str>| t.admit("t", 0, o, 0, Some(s), f);
        let (b0, b1, s3) = big_skipped_at_2_small_handled_at_3(&t, f);
        // Skipping: the position (past 3) is not believed.
        t.passed("t", 0, 4);
        t.done(&b0);
        t.done(&b1);
        t.done(&s3);
        assert_eq!(t.to_commit(None), vec![(Arc::from("t"), 0, 2)]);
        t.reread_from("t", 0, 2);
        // Read again from 2: a position of 4 (a stale report) is not believed.
        t.passed("t", 0, 4);
        assert!(t.to_commit(None).is_empty(), "still at 2");
        let b2 = handle(admit(2, &big));
        assert!(matches!(admit(3, &small), Admission::Duplicate));
        t.done(&b2);
        assert_eq!(t.to_commit(None), vec![(Arc::from("t"), 0, 4)]);
        // Caught up: a marker at 4 passed over moves the watermark again.
        t.passed("t", 0, 5);
        assert_eq!(t.to_commit(None), vec![(Arc::from("t"), 0, 5)]);
    }

    /// Partition 0 contended at 2 events, a share of 1: `big` has 0 and 1 in flight and
    /// is skipped at 2; `small`'s 3 is handled ahead of the skip. The tickets of 0, 1, 3.
    fn big_skipped_at_2_small_handled_at_3(
        t: &OffsetTracker,
        f: Option<Fairness>,
    ) -> (Ticket, Ticket, Ticket) {
        let (big, small): (Arc<str>, Arc<str>) = ("big".into(), "small".into());
        let admit = |o, s: &Arc<str>| t.admit("t", 0, o, 0, Some(s), f);
        let b0 = handle(admit(0, &big));
        let b1 = handle(admit(1, &big));
        assert!(matches!(admit(2, &big), Admission::Skip));
        (b0, b1, handle(admit(3, &small)))
    }

    /// Whether `drained()` has resolved (a wake-up is waiting for the loop).
    fn woken(t: &OffsetTracker) -> bool {
        use std::future::Future;
        let mut drained = std::pin::pin!(t.drained());
        let waker = std::task::Waker::noop();
        drained
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker))
            .is_ready()
    }

    #[test]
    fn while_holding_the_loop_is_woken_once_the_totals_reach_its_level_not_at_each_event() {
        let t = tracker();
        let tickets: Vec<_> = (0..10).map(|o| t.read("t", 0, o).unwrap()).collect();
        t.set_holding(Some(Held {
            events: 7,
            bytes: usize::MAX,
        }));
        assert!(!woken(&t), "10 in flight, reading again at 7");
        t.done(&tickets[0]);
        t.done(&tickets[1]);
        assert!(!woken(&t), "8 in flight: no wake-up");
        t.done(&tickets[2]);
        assert!(woken(&t), "7 in flight: woken");
        t.set_holding(None);
        t.done(&tickets[3]);
        assert!(!woken(&t), "not holding: no wake-up");
        // Drained there before the loop said where: woken at once.
        t.set_holding(Some(Held {
            events: 6,
            bytes: usize::MAX,
        }));
        assert!(woken(&t));
    }

    #[test]
    fn nothing_to_commit_before_anything_is_read() {
        let t = tracker();
        assert!(t.to_commit(None).is_empty());
    }

    #[test]
    fn acknowledgements_from_an_old_assignment_are_ignored() {
        let t = tracker();
        let old = t.read("t", 0, 5).unwrap();
        t.revoke([("t", 0)]);
        assert!(
            t.read("t", 0, 6).is_none(),
            "revoked partition reads nothing"
        );
        t.assign([("t", 0)]);
        let new = t.read("t", 0, 5).unwrap();
        t.done(&old);
        assert_eq!(
            t.in_flight(),
            1,
            "old ticket does not complete the new read"
        );
        assert_eq!(t.to_commit(None), vec![(Arc::from("t"), 0, 5)]);
        t.done(&new);
        assert_eq!(t.to_commit(None), vec![(Arc::from("t"), 0, 6)]);
    }

    #[test]
    fn revoking_a_partition_cancels_its_in_flight_events() {
        let t = tracker();
        let ticket = t.read("t", 0, 1).unwrap();
        assert!(!ticket.cancel.is_cancelled());
        t.revoke([("t", 0)]);
        assert!(ticket.cancel.is_cancelled());
    }

    #[test]
    fn shutdown_cancels_every_partition() {
        let parent = CancellationToken::new();
        let t = OffsetTracker::new(parent.clone());
        t.assign([("t", 0)]);
        let ticket = t.read("t", 0, 1).unwrap();
        parent.cancel();
        assert!(ticket.cancel.is_cancelled());
    }

    #[test]
    fn flow_decisions_report_changes_only() {
        let t = tracker();
        for o in 0..10 {
            t.read("t", 0, o).unwrap();
        }
        let (pause, resume) =
            t.pause_decisions(Duration::from_secs(1), None, |f| f.in_flight >= 10);
        assert_eq!((pause.len(), resume.len()), (1, 0));
        let (pause, resume) =
            t.pause_decisions(Duration::from_secs(1), None, |f| f.in_flight >= 10);
        assert_eq!((pause.len(), resume.len()), (0, 0), "already paused");
        let (pause, resume) = t.pause_decisions(Duration::from_secs(1), None, |_| false);
        assert_eq!((pause.len(), resume.len()), (0, 1));
    }

    /// A budget of `events` events, bytes unlimited.
    fn below(events: usize) -> Budget {
        Budget {
            events,
            bytes: usize::MAX,
        }
    }

    /// Fairness for tests: skipping from `contended_at` events in flight, for tenants
    /// holding `per_source`, however fast they drain.
    fn fair(contended_at: usize, per_source: usize) -> Option<Fairness> {
        Some(Fairness {
            contended_at: below(contended_at),
            per_source: below(per_source),
            max_handled_ahead: 100,
            drain_target: Duration::ZERO,
        })
    }

    /// [`fair`], with tenants judged by how fast they drain: "quickly" is 1 s.
    fn judged(contended_at: usize, per_source: usize) -> Option<Fairness> {
        Some(Fairness {
            drain_target: Duration::from_secs(1),
            ..fair(contended_at, per_source).unwrap()
        })
    }

    fn handle(a: Admission) -> Ticket {
        match a {
            Admission::Handle(t, _) => t,
            a => panic!("expected to handle, got {a:?}"),
        }
    }

    #[test]
    fn a_tenant_over_its_share_of_a_contended_partition_is_skipped_then_read_again() {
        let t = tracker();
        let (big, small): (Arc<str>, Arc<str>) = ("big".into(), "small".into());
        let f = fair(3, 2);
        let admit = |o, s: &Arc<str>| t.admit("t", 0, o, 0, Some(s), f);
        // Below contention a tenant may go past its share.
        let b0 = handle(admit(0, &big));
        let b1 = handle(admit(1, &big));
        let b2 = handle(admit(2, &big));
        assert!(
            matches!(admit(3, &big), Admission::Skip),
            "the partition is contended and big is over its share"
        );
        let s4 = handle(admit(4, &small));
        assert!(
            matches!(admit(5, &big), Admission::Skip),
            "skipped until read again"
        );
        t.done(&s4);
        // Nothing past the first skipped offset may be committed.
        assert_eq!(t.to_commit(None), vec![(Arc::from("t"), 0, 0)]);
        assert!(
            t.skips_to_reread(below(1), below(2)).is_empty(),
            "big still has 3 in flight"
        );
        t.done(&b0);
        assert!(
            t.skips_to_reread(below(1), below(2)).is_empty(),
            "big still has 2 in flight"
        );
        t.done(&b1);
        assert_eq!(
            t.skips_to_reread(below(1), below(2)),
            vec![(Arc::from("t"), 0, 3)]
        );
        assert_eq!(
            t.skips_to_reread(below(1), below(2)),
            vec![(Arc::from("t"), 0, 3)],
            "offered until the seek back is done"
        );
        t.reread_from("t", 0, 3);
        assert!(t.skips_to_reread(below(1), below(2)).is_empty());
        // Until 3 is read again, nothing from 3 on may be committed, even with nothing
        // in flight below it.
        t.done(&b2);
        assert_eq!(t.to_commit(None), vec![(Arc::from("t"), 0, 3)]);
        // Read again from 3: 4 was handled already, 3 and 5 are handled now.
        let b3 = handle(admit(3, &big));
        assert!(matches!(admit(4, &small), Admission::Duplicate));
        let _b5 = handle(admit(5, &big));
        let _b6 = handle(admit(6, &big));
        assert!(
            matches!(admit(7, &big), Admission::Skip),
            "contended again (3, 5, 6 in flight)"
        );
        assert_eq!(t.to_commit(None), vec![], "3 is still in flight");
        t.done(&b3);
        assert_eq!(
            t.skips_to_reread(below(3), below(0)),
            vec![(Arc::from("t"), 0, 7)],
            "the partition drained below 3"
        );
    }

    #[test]
    fn events_handled_ahead_of_a_skip_do_not_let_commits_pass_it_once_it_is_read_again() {
        let t = tracker();
        let big: Arc<str> = "big".into();
        let f = fair(2, 1);
        let admit = |o, s: &Arc<str>| t.admit("t", 0, o, 0, Some(s), f);
        // 3 is handled ahead of the skip, and still in flight when the skip is read again.
        let (b0, b1, _s3) = big_skipped_at_2_small_handled_at_3(&t, f);
        t.done(&b0);
        t.done(&b1);
        assert_eq!(
            t.skips_to_reread(below(1), below(1)),
            vec![(Arc::from("t"), 0, 2)]
        );
        t.reread_from("t", 0, 2);
        assert_eq!(
            t.to_commit(None),
            vec![(Arc::from("t"), 0, 2)],
            "2 is not read again yet: 3 in flight must not let the commit pass it"
        );
        let b2 = handle(admit(2, &big));
        t.done(&b2);
        assert_eq!(
            t.to_commit(None),
            vec![(Arc::from("t"), 0, 3)],
            "up to 3, which is still in flight"
        );
    }

    #[test]
    fn a_failed_seek_back_leaves_the_skip_in_force() {
        let t = tracker();
        let big: Arc<str> = "big".into();
        let f = fair(1, 1);
        let b0 = handle(t.admit("t", 0, 0, 0, Some(&big), f));
        assert!(matches!(
            t.admit("t", 0, 1, 0, Some(&big), f),
            Admission::Skip
        ));
        t.done(&b0);
        assert_eq!(
            t.skips_to_reread(below(1), below(1)),
            vec![(Arc::from("t"), 0, 1)]
        );
        // The seek failed: reading goes on past the skip, and big is still skipped
        // there, or its event 2 would be written before its event 1.
        assert!(matches!(
            t.admit("t", 0, 2, 0, Some(&big), f),
            Admission::Skip
        ));
        assert_eq!(t.to_commit(None), vec![(Arc::from("t"), 0, 1)]);
    }

    #[test]
    fn a_tenant_of_large_records_is_skipped_once_a_partition_is_full_in_bytes() {
        let t = tracker();
        let (large, small): (Arc<str>, Arc<str>) = ("large".into(), "small".into());
        // 1,000 events or 10 MB per partition; a tenant's share is half of that.
        let partition = Budget {
            events: 1000,
            bytes: 10_000_000,
        };
        let f = Some(Fairness {
            contended_at: partition,
            per_source: partition.share(0.5),
            max_handled_ahead: 100,
            drain_target: Duration::ZERO,
        });
        let admit = |o, bytes, s: &Arc<str>| t.admit("t", 0, o, bytes, Some(s), f);
        let mut large_in_flight = Vec::new();
        for o in 0..11 {
            large_in_flight.push(handle(admit(o, 900_000, &large)));
        }
        assert_eq!(
            t.held().bytes,
            9_900_000,
            "below 10 MB: nobody is held back"
        );
        large_in_flight.push(handle(admit(11, 900_000, &large)));
        assert!(
            matches!(admit(12, 900_000, &large), Admission::Skip),
            "12 events is far below the event budget, but 10.8 MB is past the byte budget"
        );
        let s = handle(admit(13, 300, &small));
        assert_eq!(
            t.held(),
            Held {
                events: 13,
                bytes: 12 * 900_000 + 300
            }
        );
        t.done(&s);
        let half = Budget {
            events: 500,
            bytes: 5_000_000,
        };
        assert!(
            t.skips_to_reread(half, partition.share(0.5)).is_empty(),
            "the large tenant still holds its share in bytes"
        );
        for ticket in large_in_flight.drain(..7) {
            t.done(&ticket);
        }
        assert_eq!(
            t.skips_to_reread(half, partition.share(0.5)),
            vec![(Arc::from("t"), 0, 12)],
            "4.5 MB left: below half the partition's bytes"
        );
        assert_eq!(t.held().bytes, 5 * 900_000);
    }

    #[test]
    fn oldest_in_flight_is_the_longest_waiting_event_not_the_lowest_offset() {
        let t = tracker();
        assert_eq!(t.oldest_in_flight()[0].1, None);
        let first = t.read("t", 0, 5).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let _later = t.read("t", 0, 3).unwrap();
        let oldest = t.oldest_in_flight()[0].1.unwrap();
        assert!(oldest >= Duration::from_millis(30), "{oldest:?}");
        t.done(&first);
        let oldest = t.oldest_in_flight()[0].1.unwrap();
        assert!(oldest < Duration::from_millis(30), "{oldest:?}");
    }

    #[test]
    fn a_lone_tenant_is_never_skipped_below_contention() {
        let t = tracker();
        let lone: Arc<str> = "lone".into();
        let f = fair(10, 1);
        for o in 0..10 {
            let ticket = handle(t.admit("t", 0, o, 0, Some(&lone), f));
            if o % 2 == 0 {
                t.done(&ticket);
            }
        }
        assert_eq!(t.in_flight(), 5);
    }

    #[test]
    fn a_busy_tenant_that_drains_quickly_is_not_skipped_a_stuck_one_is() {
        let t = tracker();
        let (busy, stuck): (Arc<str>, Arc<str>) = ("busy".into(), "stuck".into());
        // Contended from 8 in flight; a tenant's share is 4; "quickly" is 1 s.
        let f = judged(8, 4);
        let t0 = Instant::now();
        let at = |ms: u64| move || t0 + Duration::from_millis(ms);
        let admit = |o, s: &Arc<str>, ms| t.admit_at("t", 0, o, 0, Some(s), f, at(ms));
        // The stuck tenant's four events are never done.
        let _stuck: Vec<Ticket> = (0..4).map(|o| handle(admit(o, &stuck, 0))).collect();
        // The busy one has 100 events done in 2 s (50 a second), one at a time.
        let mut prev = handle(admit(4, &busy, 0));
        for o in 5..105 {
            let next = handle(admit(o, &busy, 20 * (o as u64 - 5)));
            t.done(&prev);
            prev = next;
        }
        let _busy: Vec<Ticket> = (105..108).map(|o| handle(admit(o, &busy, 2000))).collect();
        assert_eq!(
            t.in_flight(),
            8,
            "contended from here on, both hold their share"
        );
        assert!(
            matches!(admit(108, &busy, 2000), Admission::Handle(..)),
            "4 in flight at 50 a second drain within a second"
        );
        assert!(
            matches!(admit(109, &stuck, 2000), Admission::Skip),
            "the stuck tenant holds its share and drains nothing"
        );
        assert!(matches!(admit(110, &busy, 2010), Admission::Handle(..)));
        assert_eq!(t.in_flight(), 10);
        assert!(matches!(admit(111, &busy, 2010), Admission::Handle(..)));
        assert!(matches!(admit(112, &busy, 2010), Admission::Handle(..)));
        assert_eq!(t.in_flight(), 12);
        assert!(
            matches!(admit(113, &busy, 2010), Admission::Skip),
            "at the cap (budget plus a share) a tenant over its share is skipped, draining or not"
        );
    }

    #[test]
    fn nobody_is_skipped_before_the_oldest_event_has_waited_as_long_as_draining_may_take() {
        let t = tracker();
        let stuck: Arc<str> = "stuck".into();
        let f = judged(20, 5);
        let t0 = Instant::now();
        let admit = |o, ms| {
            t.admit_at("t", 0, o, 0, Some(&stuck), f, move || {
                t0 + Duration::from_millis(ms)
            })
        };
        // Nothing was done yet, but writing may just be starting (credentials,
        // connections): no verdict before the first event has waited a second.
        for o in 0..20 {
            handle(admit(o, 0));
        }
        assert!(matches!(admit(20, 999), Admission::Handle(..)));
        assert!(matches!(admit(21, 1000), Admission::Skip));
    }

    #[test]
    fn until_then_a_tenant_is_skipped_only_at_the_partitions_cap() {
        let t = tracker();
        let (new, other): (Arc<str>, Arc<str>) = ("new".into(), "other".into());
        // Budget 20, share 4: nobody is judged before 24 are in flight, where the
        // partition would pause.
        let f = judged(20, 4);
        let t0 = Instant::now();
        handle(t.admit_at("t", 0, 0, 0, Some(&other), f, || t0));
        for o in 1..24 {
            handle(t.admit_at("t", 0, o, 0, Some(&new), f, || t0));
        }
        let later = move || t0 + Duration::from_millis(500);
        assert!(matches!(
            t.admit_at("t", 0, 24, 0, Some(&new), f, later),
            Admission::Skip
        ));
    }

    #[test]
    fn a_tenant_alone_in_its_partition_is_not_skipped_at_the_cap_before_it_is_judged() {
        let t = tracker();
        let alone: Arc<str> = "alone".into();
        let f = judged(20, 4);
        let t0 = Instant::now();
        let admit = |o, ms| {
            t.admit_at("t", 0, o, 0, Some(&alone), f, move || {
                t0 + Duration::from_millis(ms)
            })
        };
        // A backlog read one partition at a time: past the cap (24) at once. Skipping
        // it would only read ahead to drop its own events.
        for o in 0..40 {
            handle(admit(o, 0));
        }
        // Judged at the cap once the oldest has waited half a second: nothing was
        // done, so it does not drain.
        assert!(matches!(admit(40, 499), Admission::Handle(..)));
        assert!(matches!(admit(41, 500), Admission::Skip));
    }

    #[test]
    fn a_tenant_alone_at_the_cap_that_drains_is_not_skipped() {
        let t = tracker();
        let alone: Arc<str> = "alone".into();
        let f = judged(20, 4);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let tickets: Vec<Ticket> = (0..44)
            .map(|o| handle(t.admit_at("t", 0, o, 0, Some(&alone), f, move || at(0))))
            .collect();
        // 20 done in the 600 ms since they began to be read: 33 a second, so the 24
        // held (the cap) drain within the target of a second.
        for ticket in &tickets[..20] {
            t.done(ticket);
        }
        assert!(matches!(
            t.admit_at("t", 0, 44, 0, Some(&alone), f, move || at(600)),
            Admission::Handle(..)
        ));
    }

    #[test]
    fn a_tenant_alone_at_the_cap_is_bounded_all_the_same() {
        let t = tracker();
        let alone: Arc<str> = "alone".into();
        let f = judged(20, 4);
        let t0 = Instant::now();
        // Twice the cap (48) in events, before anything could be judged.
        for o in 0..48 {
            handle(t.admit_at("t", 0, o, 0, Some(&alone), f, || t0));
        }
        assert!(matches!(
            t.admit_at("t", 0, 48, 0, Some(&alone), f, || t0),
            Admission::Skip
        ));
        // In bytes, the cap itself: large records meet fairness as early as ever.
        let t = tracker();
        let f = Some(Fairness {
            contended_at: Budget {
                events: 1000,
                bytes: 100,
            },
            per_source: Budget {
                events: 500,
                bytes: 50,
            },
            max_handled_ahead: 100,
            drain_target: Duration::from_secs(1),
        });
        for o in 0..15 {
            handle(t.admit_at("t", 0, o, 10, Some(&alone), f, || t0));
        }
        assert!(matches!(
            t.admit_at("t", 0, 15, 10, Some(&alone), f, || t0),
            Admission::Skip
        ));
    }

    #[test]
    fn a_full_slow_partition_with_a_stuck_tenant_over_its_share_is_skippable_not_paused() {
        let t = tracker();
        let (stuck, other): (Arc<str>, Arc<str>) = ("stuck".into(), "other".into());
        // A zero target: nothing drains "quickly", everyone is judged at once.
        let f = fair(4, 3);
        for o in 0..2 {
            handle(t.admit("t", 0, o, 0, Some(&other), f));
        }
        let skippable = |t: &OffsetTracker| {
            let mut seen = None;
            t.pause_decisions(Duration::ZERO, f, |i| {
                seen = Some(i.skippable);
                false
            });
            seen.unwrap()
        };
        for o in 2..4 {
            handle(t.admit("t", 0, o, 0, Some(&stuck), f));
        }
        assert!(!skippable(&t), "nobody holds a share of 3");
        handle(t.admit("t", 0, 4, 0, Some(&stuck), f));
        assert!(skippable(&t), "stuck holds 3 of the 5 and drains nothing");
        assert!(matches!(
            t.admit("t", 0, 5, 0, Some(&stuck), f),
            Admission::Skip
        ));
    }

    #[test]
    fn a_partition_drains_quickly_only_once_events_are_done_at_a_rate_that_clears_it() {
        let t = tracker();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let tickets: Vec<Ticket> = (0..1010)
            .map(|o| handle(t.admit_at("t", 0, o, 0, None, None, || t0)))
            .collect();
        let (budget, target) = (below(10), Duration::from_millis(100));
        let slow = |ms| t.full_and_slow_at("t", 0, budget, target, None, || at(ms));
        assert!(!slow(50), "nothing has waited 100 ms yet");
        assert!(slow(110), "1,010 in flight, none done in 110 ms");
        for ticket in &tickets[..1000] {
            t.done(ticket);
        }
        // 1,000 done in 200 ms: 10 left drain within 100 ms.
        assert!(!slow(200));
        assert!(
            !t.full_and_slow_at("t", 0, below(11), target, None, || at(200)),
            "below budget"
        );
    }

    #[test]
    fn contended_everywhere_skips_a_stuck_tenant_over_its_share_below_the_partitions_budget() {
        let t = tracker();
        let down: Arc<str> = "down".into();
        let f = judged(10, 5);
        // Read 50 ms ago, nothing done since the partition was assigned 3 s ago.
        let t0 = Instant::now();
        let read_at = move || t0 + Duration::from_millis(2950);
        let now = move || t0 + Duration::from_secs(3);
        for o in 0..6 {
            handle(t.admit_at("t", 0, o, 0, Some(&down), f, read_at));
        }
        assert!(
            matches!(
                t.admit_at("t", 0, 6, 0, Some(&down), f, now),
                Admission::Handle(..)
            ),
            "7 of a budget of 10: not contended"
        );
        t.set_contended_everywhere(true);
        assert!(
            matches!(
                t.admit_at("t", 0, 7, 0, Some(&down), f, now),
                Admission::Skip
            ),
            "no judging period (its oldest event waited 50 ms): it holds its share and writes nothing"
        );
    }

    /// Drives the tracker the way the worker does (read in order, finish events in any
    /// order, read skips again or fail to seek back, lose and regain the partition,
    /// commit) through many random runs, and checks what must
    /// always hold: a commit never passes an event not done, every event is done in the
    /// end, and each tenant's events are handled in offset order.
    #[test]
    fn random_runs_never_commit_past_an_event_not_done() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        const EVENTS: i64 = 400;
        for seed in 0..1000u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let t = tracker();
            let tenants: Vec<Arc<str>> = vec!["big".into(), "a".into(), "b".into()];
            // Most events belong to the big tenant.
            let owner: Vec<usize> = (0..EVENTS)
                .map(|_| {
                    if rng.random_bool(0.7) {
                        0
                    } else {
                        rng.random_range(1..3)
                    }
                })
                .collect();
            let fairness = Fairness {
                contended_at: below(rng.random_range(2..12)),
                per_source: below(rng.random_range(1..6)),
                max_handled_ahead: 1000,
                // Against a clock that moves 1.5 ms a read on average: from skipping
                // every tenant over its share to skipping only the slow ones.
                drain_target: Duration::from_millis(rng.random_range(0..30)),
            };
            let f = Some(fairness);
            let (partition_below, source_below) = (
                below(fairness.contended_at.events.div_ceil(2)),
                fairness.per_source,
            );
            let mut position = 0i64;
            let (t0, mut clock) = (Instant::now(), Duration::ZERO);
            let mut in_flight: Vec<Ticket> = Vec::new();
            let mut done = std::collections::HashSet::new();
            let mut handled = std::collections::HashSet::new();
            let mut handled_last: std::collections::HashMap<usize, i64> = Default::default();
            let mut committed = 0i64;
            for _step in 0..20_000 {
                match rng.random_range(0..10) {
                    // Reading holds while the totals are at their budget (twice the
                    // contention point here), as the consume loop does.
                    0..=4
                        if position < EVENTS
                            && t.in_flight() < 2 * fairness.contended_at.events =>
                    {
                        let o = position;
                        position += 1;
                        let who = owner[o as usize];
                        // A clock that moves on a little with each read, so that
                        // tenants done quickly enough count as draining at times.
                        clock += Duration::from_micros(rng.random_range(0..3000));
                        let now = t0 + clock;
                        if let Admission::Handle(ticket, _) =
                            t.admit_at("t", 0, o, 0, Some(&tenants[who]), f, move || now)
                        {
                            if handled.insert(o) {
                                let last = handled_last.insert(who, o).unwrap_or(-1);
                                assert!(
                                    o > last,
                                    "seed {seed}: tenant {who} handled {o} after {last}"
                                );
                            }
                            in_flight.push(ticket);
                        }
                    }
                    0..=7 if !in_flight.is_empty() => {
                        let ticket = in_flight.swap_remove(rng.random_range(0..in_flight.len()));
                        done.insert(ticket.offset);
                        t.done(&ticket);
                    }
                    8 if rng.random_bool(0.02) => {
                        // A rebalance hands the partition back to us: a new assignment
                        // reads on from the last commit; the old one's events that are
                        // still being written finish, but their acknowledgements count
                        // for nothing.
                        t.revoke([("t", 0)]);
                        t.assign([("t", 0)]);
                        position = committed;
                    }
                    _ => {
                        for (_, _, from) in t.skips_to_reread(partition_below, source_below) {
                            // Now and then the seek back fails and is tried again later.
                            if rng.random_bool(0.8) {
                                position = from;
                                t.reread_from("t", 0, from);
                            }
                        }
                    }
                }
                for (_, _, offset) in t.to_commit(None) {
                    assert!(offset >= committed, "seed {seed}: commits go forward");
                    for o in committed..offset {
                        assert!(
                            done.contains(&o),
                            "seed {seed}: committed {offset} but {o} is not done"
                        );
                    }
                    committed = offset;
                }
                if committed == EVENTS {
                    break;
                }
            }
            assert_eq!(
                committed, EVENTS,
                "seed {seed}: everything done and committed in the end"
            );
        }
    }

    #[test]
    fn failed_commit_is_offered_again() {
        let t = tracker();
        let a = t.read("t", 0, 0).unwrap();
        t.done(&a);
        let offsets = t.to_commit(None);
        assert_eq!(offsets.len(), 1);
        t.commit_failed(&offsets);
        assert_eq!(t.to_commit(None), offsets);
    }

    #[test]
    fn commit_can_be_limited_to_some_partitions() {
        let t = OffsetTracker::default();
        t.assign([("t", 0), ("t", 1)]);
        for p in [0, 1] {
            let x = t.read("t", p, 0).unwrap();
            t.done(&x);
        }
        let only = vec![("t".to_string(), 1)];
        assert_eq!(t.to_commit(Some(&only)), vec![(Arc::from("t"), 1, 1)]);
        assert_eq!(t.to_commit(None), vec![(Arc::from("t"), 0, 1)]);
    }
}
