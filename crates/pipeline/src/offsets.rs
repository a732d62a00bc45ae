//! Acknowledge: which Kafka offsets may be committed.
//!
//! An event is *done* once its record is written to Kinesis or its dead letter is
//! confirmed by Kafka. The committable offset of a partition is the lowest offset not yet
//! done (or, with nothing pending, one past the highest read): never past an event that
//! is still in flight, so a crash can only re-deliver, never skip (SPEC 5.4).
//!
//! Each assignment of a partition gets a new epoch; acknowledgements of events read
//! under an older assignment are ignored, so a revoked partition's late completions
//! cannot commit on behalf of its new owner. Each assignment also has its own
//! cancellation token: revoking a partition abandons its in-flight events at once, so
//! the old owner does not keep writing events that the new owner is writing too.
//!
//! The tracker also knows how many events each partition has in flight, which is what
//! backpressure (pausing a partition) is decided on.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

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
    pub cancel: CancellationToken,
}

#[derive(Debug)]
struct PartitionState {
    epoch: u64,
    pending: BTreeSet<i64>,
    /// One past the highest offset read, once something was read.
    next: Option<i64>,
    /// The last offset committed (or handed out to commit) for this assignment.
    committed: Option<i64>,
    cancel: CancellationToken,
    /// Whether backpressure paused fetching from this partition.
    paused: bool,
}

impl PartitionState {
    fn watermark(&self) -> Option<i64> {
        match self.pending.first() {
            Some(&lowest) => Some(lowest),
            None => self.next,
        }
    }
}

/// The offset state of every partition this consumer owns.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    inner: Mutex<Inner>,
    /// Parent of every partition's token: cancelled at shutdown.
    cancel: CancellationToken,
}

#[derive(Debug, Default)]
struct Inner {
    partitions: HashMap<(Arc<str>, i32), PartitionState>,
    next_epoch: u64,
    pending_total: usize,
}

impl OffsetTracker {
    /// A tracker whose partitions' tokens are children of `cancel`.
    pub fn new(cancel: CancellationToken) -> Self {
        OffsetTracker {
            inner: Mutex::default(),
            cancel,
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
                    pending: BTreeSet::new(),
                    next: None,
                    committed: None,
                    cancel: self.cancel.child_token(),
                    paused: false,
                },
            );
            if let Some(old) = old {
                old.cancel.cancel();
                inner.pending_total -= old.pending.len();
            }
        }
        publish_in_flight(inner.pending_total);
    }

    /// Stops tracking revoked partitions; their in-flight events are abandoned (the new
    /// owner reads them again from the last commit).
    pub fn revoke<'a>(&self, partitions: impl IntoIterator<Item = (&'a str, i32)>) {
        let mut inner = self.lock();
        for (topic, partition) in partitions {
            if let Some(old) = inner.partitions.remove(&(Arc::from(topic), partition)) {
                old.cancel.cancel();
                inner.pending_total -= old.pending.len();
            }
        }
        publish_in_flight(inner.pending_total);
    }

    /// Registers an event as read and in flight. `None` when the partition is not
    /// (or no longer) assigned to us: the event must then be ignored.
    pub fn read(&self, topic: &str, partition: i32, offset: i64) -> Option<Ticket> {
        let mut inner = self.lock();
        let key = (Arc::<str>::from(topic), partition);
        let state = inner.partitions.get_mut(&key)?;
        let epoch = state.epoch;
        let cancel = state.cancel.clone();
        let inserted = state.pending.insert(offset);
        state.next = Some(state.next.map_or(offset + 1, |n| n.max(offset + 1)));
        if inserted {
            inner.pending_total += 1;
        }
        publish_in_flight(inner.pending_total);
        Some(Ticket {
            topic: key.0,
            partition,
            offset,
            epoch,
            cancel,
        })
    }

    /// Marks an event done (written or dead-lettered).
    pub fn done(&self, ticket: &Ticket) {
        let mut inner = self.lock();
        let key = (ticket.topic.clone(), ticket.partition);
        let Some(state) = inner.partitions.get_mut(&key) else {
            return;
        };
        if state.epoch != ticket.epoch {
            return;
        }
        if state.pending.remove(&ticket.offset) {
            inner.pending_total -= 1;
        }
        publish_in_flight(inner.pending_total);
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
            if let Some(state) = inner.partitions.get_mut(&(topic.clone(), *partition)) {
                if state.committed == Some(*offset) {
                    state.committed = None;
                }
            }
        }
    }

    /// Events read and not yet done, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.lock().pending_total
    }

    /// Events in flight of one partition (`None` when it is not assigned).
    pub fn in_flight_of(&self, topic: &str, partition: i32) -> Option<usize> {
        let inner = self.lock();
        inner
            .partitions
            .get(&(Arc::from(topic), partition))
            .map(|s| s.pending.len())
    }

    /// Applies backpressure decisions: `decide(in_flight_of_partition, paused_now,
    /// in_flight_total)` returns the partition's new paused state. Returns the
    /// partitions to pause and to resume.
    pub fn rebalance_flow(
        &self,
        mut decide: impl FnMut(usize, bool, usize) -> bool,
    ) -> (Vec<TopicPartition>, Vec<TopicPartition>) {
        let mut inner = self.lock();
        let total = inner.pending_total;
        let (mut pause, mut resume) = (Vec::new(), Vec::new());
        for ((topic, partition), state) in inner.partitions.iter_mut() {
            let paused = decide(state.pending.len(), state.paused, total);
            if paused != state.paused {
                state.paused = paused;
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

fn publish_in_flight(n: usize) {
    kd_telemetry::metrics().in_flight_events.set(n as i64);
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let (pause, resume) = t.rebalance_flow(|n, _, _| n >= 10);
        assert_eq!((pause.len(), resume.len()), (1, 0));
        let (pause, resume) = t.rebalance_flow(|n, _, _| n >= 10);
        assert_eq!((pause.len(), resume.len()), (0, 0), "already paused");
        let (pause, resume) = t.rebalance_flow(|_, _, _| false);
        assert_eq!((pause.len(), resume.len()), (0, 1));
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
