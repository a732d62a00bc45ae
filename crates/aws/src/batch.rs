//! Gathering records into `PutRecords` calls.
//!
//! Records for the same destination (one tenant's settings: role, region, stream) that
//! arrive within a short linger go out in one call, up to Kinesis' limits of 500 records and 10 MiB. A batch
//! never holds two records of one partition key: each of the pipeline's lanes (one per
//! tenant and key) waits for its record's own outcome before it sends the next, so a
//! refused record can be retried without overtaking or being overtaken by its key's
//! other records.

use hashbrown::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

/// Most records in one `PutRecords` call.
pub const MAX_RECORDS: usize = 500;
/// Most bytes (data plus partition keys) in one `PutRecords` call: 10 MiB since 2025
/// (it was 5 MiB while records were at most 1 MiB).
pub const MAX_BYTES: usize = 10 * 1024 * 1024;

/// Open batches, one per destination.
#[derive(Debug)]
pub struct Batches<K, T> {
    inner: Mutex<Inner<K, T>>,
}

#[derive(Debug)]
struct Inner<K, T> {
    open: HashMap<K, Open<T>>,
    next_id: u64,
}

#[derive(Debug)]
struct Open<T> {
    id: u64,
    items: Vec<T>,
    bytes: usize,
}

/// What adding a record did.
#[derive(Debug)]
pub struct Added<T> {
    /// A new batch was opened with this id: it is to be taken after the linger.
    pub opened: Option<u64>,
    /// Batches to send now: full ones.
    pub ready: Vec<Vec<T>>,
}

impl<K: Hash + Eq + Clone, T> Default for Batches<K, T> {
    fn default() -> Self {
        Batches {
            inner: Mutex::new(Inner {
                open: HashMap::new(),
                next_id: 0,
            }),
        }
    }
}

impl<K: Hash + Eq + Clone, T> Batches<K, T> {
    /// Adds a record of `bytes` to the open batch of `key`. A batch that cannot take it
    /// is closed first, and one that it fills is closed after: both come back as ready.
    pub fn add(&self, key: K, bytes: usize, item: T) -> Added<T> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut ready = Vec::new();
        if let Some(open) = inner.open.get(&key) {
            if open.items.len() >= MAX_RECORDS || open.bytes + bytes > MAX_BYTES {
                if let Some(full) = inner.open.remove(&key) {
                    ready.push(full.items);
                }
            }
        }
        let Inner { open, next_id } = &mut *inner;
        let mut opened = None;
        let batch = open.entry(key.clone()).or_insert_with(|| {
            *next_id += 1;
            opened = Some(*next_id);
            Open {
                id: *next_id,
                items: Vec::new(),
                bytes: 0,
            }
        });
        batch.items.push(item);
        batch.bytes += bytes;
        if batch.items.len() >= MAX_RECORDS || batch.bytes >= MAX_BYTES {
            if let Some(full) = open.remove(&key) {
                ready.push(full.items);
            }
        }
        Added { opened, ready }
    }

    /// Closes and returns the batch `id` of `key`, unless it was closed already (it
    /// filled up and was sent).
    pub fn take(&self, key: &K, id: u64) -> Option<Vec<T>> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.open.get(key).is_some_and(|b| b.id == id) {
            inner.open.remove(key).map(|b| b.items)
        } else {
            None
        }
    }

    /// Batches open now.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_one_destination_share_a_batch_until_the_linger_ends() {
        let b: Batches<&str, u32> = Batches::default();
        let first = b.add("s", 10, 1);
        let id = first.opened.expect("the first record opens a batch");
        assert!(first.ready.is_empty());
        let second = b.add("s", 10, 2);
        assert!(second.opened.is_none() && second.ready.is_empty());
        let other = b.add("t", 10, 3);
        assert!(other.opened.is_some(), "another destination, another batch");
        assert_eq!(b.take(&"s", id), Some(vec![1, 2]));
        assert_eq!(b.take(&"s", id), None, "taken once");
        assert_eq!(b.open(), 1);
    }

    #[test]
    fn a_batch_closes_at_500_records() {
        let b: Batches<&str, usize> = Batches::default();
        let id = b.add("s", 1, 0).opened.unwrap();
        for i in 1..MAX_RECORDS - 1 {
            assert!(b.add("s", 1, i).ready.is_empty());
        }
        let last = b.add("s", 1, MAX_RECORDS - 1);
        assert_eq!(last.ready.len(), 1);
        assert_eq!(last.ready[0].len(), MAX_RECORDS);
        assert_eq!(b.take(&"s", id), None, "the linger finds it sent");
        let next = b.add("s", 1, 0);
        assert!(next.opened.is_some(), "the next record opens a new batch");
    }

    #[test]
    fn a_record_that_would_pass_10_mib_goes_into_the_next_batch() {
        let b: Batches<&str, u32> = Batches::default();
        let mib = 1024 * 1024;
        let first = b.add("s", 6 * mib, 1).opened.unwrap();
        let second = b.add("s", 6 * mib, 2);
        assert_eq!(second.ready, vec![vec![1]], "the open batch is sent first");
        let id2 = second.opened.expect("and a new one holds the record");
        assert_ne!(first, id2);
        assert_eq!(b.take(&"s", first), None);
        assert_eq!(b.take(&"s", id2), Some(vec![2]));
        // A record as large as the whole limit goes alone.
        let alone = b.add("s", MAX_BYTES, 3);
        assert_eq!(alone.ready, vec![vec![3]]);
    }
}
