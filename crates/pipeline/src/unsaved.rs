//! Work done on partitions the group took away before it could be committed. When the
//! group forgets this pod (a Kafka outage longer than the session timeout, the broker
//! restarted, a network path lost), its partitions are revoked as lost and the commit
//! of what it had written meanwhile fails: without this, the next owner reads all of it
//! again. Most often the next owner is this pod, rejoining: before the partitions are
//! read again, what was done is committed then, unless the group's committed offset is
//! already past it (another member took the partitions meanwhile and went further) or
//! missing (the topic may have been made again).
//! Everything below such an offset was written or dead-lettered by this pod, so
//! committing it never skips an event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use crate::commits::try_commit;

/// How long done work is kept for its partition to come back.
const KEEP_FOR: Duration = Duration::from_secs(600);

/// Per partition: the offset to commit, and when it was kept.
type Kept = HashMap<(Arc<str>, i32), (i64, Instant)>;

#[derive(Default)]
pub(crate) struct Unsaved {
    offsets: Mutex<Kept>,
}

impl Unsaved {
    /// Keeps offsets whose commit failed as their partitions were revoked.
    pub(crate) fn keep(&self, offsets: &[(Arc<str>, i32, i64)]) {
        if offsets.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut kept = self.lock();
        kept.retain(|_, (_, at)| now.duration_since(*at) < KEEP_FOR);
        for (topic, partition, offset) in offsets {
            let entry = kept
                .entry((topic.clone(), *partition))
                .or_insert((*offset, now));
            if *offset >= entry.0 {
                *entry = (*offset, now);
            }
        }
        tracing::info!(
            ?offsets,
            "kept the offsets of work done on partitions revoked before they could be committed"
        );
    }

    /// Those kept for partitions now `assigned` (taken out of what is kept).
    pub(crate) fn take(&self, assigned: &[(String, i32)]) -> Vec<(Arc<str>, i32, i64)> {
        let mut kept = self.lock();
        if kept.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        kept.retain(|_, (_, at)| now.duration_since(*at) < KEEP_FOR);
        assigned
            .iter()
            .filter_map(|(topic, partition)| {
                let ((topic, partition), (offset, _)) =
                    kept.remove_entry(&(Arc::from(topic.as_str()), *partition))?;
                Some((topic, partition, offset))
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.offsets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Of `kept`, the offsets beyond what the group has committed for their partitions
/// (`committed`: `None` where it has nothing). Where the group has nothing, nothing is
/// committed either: the topic may have been deleted and made again since, and an
/// offset of the old one would skip the new one's first events.
pub(crate) fn ahead_of(
    kept: &[(Arc<str>, i32, i64)],
    committed: impl Fn(&str, i32) -> Option<i64>,
) -> Vec<(Arc<str>, i32, i64)> {
    kept.iter()
        .filter(|(topic, partition, offset)| {
            committed(topic, *partition).is_some_and(|c| *offset > c)
        })
        .cloned()
        .collect()
}

/// Commits what `kept` holds beyond the group's committed offsets, for partitions
/// about to be assigned to this pod (so that reading starts there). Synchronous.
pub(crate) fn commit_kept<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    kept: Vec<(Arc<str>, i32, i64)>,
) {
    if kept.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, _) in &kept {
        tpl.add_partition(topic, *partition);
    }
    let committed = match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read committed offsets: work done before the group lost this pod is read again");
            return;
        }
    };
    let ahead = ahead_of(&kept, |topic, partition| {
        match committed.find_partition(topic, partition)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    });
    if ahead.is_empty() {
        return;
    }
    if try_commit(consumer, &ahead) {
        tracing::info!(offsets = ?ahead, "committed work done before the group lost this pod");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_offsets_come_back_for_their_partitions_once() {
        let u = Unsaved::default();
        let t: Arc<str> = "t".into();
        u.keep(&[(t.clone(), 0, 10), (t.clone(), 1, 20)]);
        u.keep(&[(t.clone(), 0, 7)]);
        let assigned = [("t".to_owned(), 0), ("t".to_owned(), 2)];
        assert_eq!(
            u.take(&assigned),
            vec![(t.clone(), 0, 10)],
            "the highest kept"
        );
        assert!(u.take(&assigned).is_empty(), "taken once");
        assert_eq!(u.take(&[("t".to_owned(), 1)]), vec![(t, 1, 20)]);
    }

    #[test]
    fn only_offsets_beyond_the_groups_commit_are_committed() {
        let t: Arc<str> = "t".into();
        let kept = vec![(t.clone(), 0, 10), (t.clone(), 1, 20), (t.clone(), 2, 30)];
        let committed = |_: &str, p: i32| match p {
            0 => Some(4),
            1 => Some(25),
            _ => None,
        };
        assert_eq!(
            ahead_of(&kept, committed),
            vec![(t, 0, 10)],
            "partition 1's next owner went further, partition 2 has no commit: left alone"
        );
    }
}
