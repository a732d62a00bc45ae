//! One partition's state under the tracker's lock: its commit ledger (the epoch, the
//! offsets in flight, how far it was read, what was committed, a skip and what was
//! handled past it) and its load (events and bytes in flight, per tenant, and how fast
//! they drain).

use std::collections::BTreeMap;

use hashbrown::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::Held;
use crate::drain_rate::DrainRate;
use crate::offset_set::OffsetSet;

#[derive(Debug)]
pub(super) struct PartitionState {
    pub(super) epoch: u64,
    /// Offsets in flight, with when each was read and the bytes it holds.
    pub(super) pending: BTreeMap<i64, (Instant, usize)>,
    /// One past the highest offset read, once something was read.
    pub(super) next: Option<i64>,
    /// The highest `next` has been in this assignment (`next` moves back when skipped
    /// events are read again; this does not).
    pub(super) seen: Option<i64>,
    /// The last offset committed (or handed out to commit) for this assignment.
    pub(super) committed: Option<i64>,
    pub(super) cancel: Arc<CancellationToken>,
    /// Tenants whose events are being skipped, and the first offset skipped.
    pub(super) skip: Option<Skip>,
    /// Offsets handled after a skip began: passed over when the partition is read again.
    pub(super) handled_ahead: OffsetSet,
    /// What flow control reads.
    pub(super) load: PartitionLoad,
}

/// A partition's load: what its events in flight hold, per tenant, and how fast they
/// drain. The ledger's fields above say which offsets are in flight; these only
/// weigh them.
#[derive(Debug)]
pub(super) struct PartitionLoad {
    /// Whether backpressure paused fetching from this partition.
    pub(super) paused: bool,
    /// Events and bytes in flight per tenant, and how fast each drains.
    pub(super) by_source: HashMap<Arc<str>, (Held, DrainRate)>,
    /// How fast the partition's events in flight drain.
    pub(super) rate: DrainRate,
    /// Bytes of this partition's events in flight.
    pub(super) pending_bytes: usize,
}

impl PartitionLoad {
    pub(super) fn new(now: Instant) -> Self {
        PartitionLoad {
            paused: false,
            by_source: HashMap::new(),
            rate: DrainRate::new(now),
            pending_bytes: 0,
        }
    }
}

#[derive(Debug)]
pub(super) struct Skip {
    pub(super) from: i64,
    pub(super) sources: HashSet<Arc<str>>,
}

impl PartitionState {
    pub(super) fn held(&self) -> Held {
        Held {
            events: self.pending.len(),
            bytes: self.load.pending_bytes,
        }
    }

    pub(super) fn held_by(&self, source: &Arc<str>) -> Held {
        self.load
            .by_source
            .get(source)
            .map(|(held, _)| *held)
            .unwrap_or_default()
    }

    pub(super) fn watermark(&self) -> Option<i64> {
        // `next` is below some pending offsets while a partition is read again after a
        // skip: the events handled ahead of the skip are pending, the ones between the
        // skip and them are not read yet.
        let w = match (self.pending.first_key_value(), self.next) {
            (Some((&lowest, _)), Some(next)) => Some(lowest.min(next)),
            (Some((&lowest, _)), None) => Some(lowest),
            (None, next) => next,
        };
        match (&self.skip, w) {
            (Some(skip), Some(w)) => Some(w.min(skip.from)),
            (Some(skip), None) => Some(skip.from),
            (None, w) => w,
        }
    }
}
