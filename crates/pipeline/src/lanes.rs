//! Lanes: per-user order with concurrency across users and tenants.
//!
//! Events with the same (tenant, partition key) go through one lane, in the order they
//! were read from Kafka, with at most one write in flight. Each busy lane is one task;
//! a lane that empties ends its task and disappears, so idle users cost nothing. A slow
//! or failing tenant only holds up its own lanes.
//!
//! A lane may hand several of its waiting jobs to one run (a group), in order, when
//! `joins` says the next may join the group taken so far: that is how one user's
//! consecutive events become one aggregated Kinesis record.

use std::collections::VecDeque;

use hashbrown::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use smallvec::SmallVec;

/// The jobs a lane runs at once: usually one, kept inline (no allocation per event).
pub type Group<J> = SmallVec<[J; 1]>;

/// Runs jobs through per-key FIFO lanes with `run`, in groups that `joins` allows.
pub struct Lanes<K, J, F, G> {
    queues: Mutex<HashMap<K, VecDeque<J>>>,
    run: F,
    joins: G,
}

impl<K, J, F, G, Fut> Lanes<K, J, F, G>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    J: Send + 'static,
    F: Fn(Group<J>) -> Fut + Send + Sync + 'static,
    G: Fn(&[J], &J) -> bool + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    pub fn new(run: F, joins: G) -> Arc<Self> {
        Arc::new(Lanes {
            queues: Mutex::new(HashMap::new()),
            run,
            joins,
        })
    }

    /// Queues a job behind the others of its lane, starting the lane if it is idle.
    pub fn push(self: &Arc<Self>, key: K, job: J) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(queue) = queues.get_mut(&key) {
            queue.push_back(job);
            return;
        }
        // A lane present in the map has a task draining it; an absent one needs one.
        queues.insert(key.clone(), VecDeque::from([job]));
        drop(queues);
        tokio::spawn(self.clone().drain(key));
    }

    async fn drain(self: Arc<Self>, key: K) {
        loop {
            // The key stays in the map while its job runs (even with an empty queue), so
            // a concurrent push queues behind it instead of starting a second task.
            let group = {
                let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                let Some(queue) = queues.get_mut(&key) else {
                    return;
                };
                let Some(first) = queue.pop_front() else {
                    queues.remove(&key);
                    return;
                };
                let mut group: Group<J> = SmallVec::from_buf([first]);
                while queue.front().is_some_and(|next| (self.joins)(&group, next)) {
                    group.extend(queue.pop_front());
                }
                group
            };
            (self.run)(group).await;
        }
    }

    /// Lanes currently busy.
    pub fn active(&self) -> usize {
        self.queues.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn keeps_order_within_a_key_and_runs_keys_concurrently() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        let lanes = Lanes::new(
            move |group: Group<(u32, u32, u64)>| {
                let log = log2.clone();
                async move {
                    for (key, n, delay) in group {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        log.lock().unwrap().push((key, n));
                    }
                }
            },
            |_: &[(u32, u32, u64)], _: &(u32, u32, u64)| false,
        );
        // Key 1 is slow; key 2 must not wait for it.
        for n in 0..5 {
            lanes.push(1, (1, n, 20));
        }
        for n in 0..5 {
            lanes.push(2, (2, n, 0));
        }
        for _ in 0..100 {
            if log.lock().unwrap().len() == 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let log = log.lock().unwrap().clone();
        let of = |k| {
            log.iter()
                .filter(|(key, _)| *key == k)
                .map(|(_, n)| *n)
                .collect::<Vec<_>>()
        };
        assert_eq!(of(1), vec![0, 1, 2, 3, 4]);
        assert_eq!(of(2), vec![0, 1, 2, 3, 4]);
        let first_slow = log.iter().position(|(k, _)| *k == 1).unwrap();
        let last_fast = log.iter().rposition(|(k, _)| *k == 2).unwrap();
        assert!(
            last_fast < first_slow,
            "fast lane finished before the slow one: {log:?}"
        );
        assert_eq!(lanes.active(), 0, "idle lanes are dropped");
    }

    #[tokio::test]
    async fn waiting_jobs_join_a_group_in_order_while_allowed() {
        let groups = Arc::new(Mutex::new(Vec::new()));
        let seen = groups.clone();
        let (release, gate) = tokio::sync::watch::channel(false);
        let lanes = Lanes::new(
            move |group: Group<u32>| {
                let seen = seen.clone();
                let mut gate = gate.clone();
                async move {
                    seen.lock().unwrap().push(group.into_vec());
                    let _ = gate.wait_for(|open| *open).await;
                }
            },
            // Groups of at most three; 10 never joins one.
            |group: &[u32], next: &u32| group.len() < 3 && *next != 10,
        );
        // All queue before the lane's task first runs (a current-thread runtime).
        for n in [1, 2, 3, 4, 5, 10, 11] {
            lanes.push("user", n);
        }
        release.send(true).unwrap();
        for _ in 0..100 {
            if lanes.active() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let groups = groups.lock().unwrap().clone();
        assert_eq!(groups, vec![vec![1, 2, 3], vec![4, 5], vec![10, 11]]);
    }
}
