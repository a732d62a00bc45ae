//! Lanes: per-user order with concurrency across users and tenants.
//!
//! Events with the same (tenant, partition key) go through one lane, in the order they
//! were read from Kafka, with at most one write in flight. Each busy lane is one task;
//! a lane that empties ends its task and disappears, so idle users cost nothing. A slow
//! or failing tenant only holds up its own lanes.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Runs jobs through per-key FIFO lanes with `run`.
pub struct Lanes<K, J, F> {
    queues: Mutex<HashMap<K, VecDeque<J>>>,
    run: F,
}

impl<K, J, F, Fut> Lanes<K, J, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    J: Send + 'static,
    F: Fn(J) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    pub fn new(run: F) -> Arc<Self> {
        Arc::new(Lanes {
            queues: Mutex::new(HashMap::new()),
            run,
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
            let job = {
                let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                match queues.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(job) => job,
                    None => {
                        queues.remove(&key);
                        return;
                    }
                }
            };
            (self.run)(job).await;
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
        let lanes = Lanes::new(move |(key, n, delay): (u32, u32, u64)| {
            let log = log2.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                log.lock().unwrap().push((key, n));
            }
        });
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
}
