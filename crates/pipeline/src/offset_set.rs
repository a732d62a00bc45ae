//! A set of Kafka offsets kept as runs of consecutive offsets.
//!
//! The offsets handled past a fairness skip come in long runs (everything but the skipped
//! tenant's events), up to 100,000 per partition: as runs they take a few hundred KiB at
//! most where a `BTreeSet<i64>` took about 1.8 MiB.

use std::collections::BTreeMap;

/// Offsets, as runs `start..end` (end exclusive) that neither overlap nor touch.
#[derive(Debug, Default, Clone)]
pub struct OffsetSet {
    runs: BTreeMap<i64, i64>,
    len: usize,
}

impl OffsetSet {
    /// How many offsets the set holds.
    pub fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, offset: i64) -> bool {
        self.runs
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, &end)| offset < end)
    }

    /// Adds `offset`; returns whether it was new.
    pub fn insert(&mut self, offset: i64) -> bool {
        let before = self
            .runs
            .range(..=offset)
            .next_back()
            .map(|(&s, &e)| (s, e));
        if let Some((_, end)) = before {
            if offset < end {
                return false;
            }
        }
        let next_start = offset + 1;
        let after_end = self.runs.remove(&next_start);
        match before {
            // Extends the run before it, and joins the one after it if it touches.
            Some((start, end)) if end == offset => {
                self.runs.insert(start, after_end.unwrap_or(next_start));
            }
            _ => {
                self.runs.insert(offset, after_end.unwrap_or(next_start));
            }
        }
        self.len += 1;
        true
    }

    /// Keeps only the offsets at or past `from`. Costs in proportion to the runs it
    /// drops (it is called for every offset read again past a skip).
    pub fn retain_from(&mut self, from: i64) {
        let kept = self.runs.split_off(&from);
        let below = std::mem::replace(&mut self.runs, kept);
        for (start, end) in below {
            if end > from {
                // Straddles `from`: its upper part stays. It cannot touch the next run,
                // which started past its end.
                self.runs.insert(from, end);
                self.len -= (from - start) as usize;
            } else {
                self.len -= (end - start) as usize;
            }
        }
    }

    /// How many runs the set is stored as.
    #[cfg(test)]
    pub fn runs(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeSet;

    #[test]
    fn consecutive_offsets_are_one_run() {
        let mut s = OffsetSet::default();
        for o in [5, 7, 6, 3, 4, 9] {
            assert!(s.insert(o));
        }
        assert!(!s.insert(6), "already there");
        assert_eq!((s.len(), s.runs()), (6, 2), "3..8 and 9..10");
        assert!(s.contains(3) && s.contains(7) && s.contains(9));
        assert!(!s.contains(2) && !s.contains(8) && !s.contains(10));
        s.retain_from(5);
        assert_eq!((s.len(), s.runs()), (4, 2), "5..8 and 9..10");
        assert!(!s.contains(4) && s.contains(5));
        s.retain_from(11);
        assert!(s.is_empty());
    }

    #[test]
    fn behaves_like_a_set_of_offsets() {
        for seed in 0..200u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let (mut ours, mut model) = (OffsetSet::default(), BTreeSet::new());
            for _ in 0..500 {
                let o = rng.random_range(0..120i64);
                if rng.random_bool(0.05) {
                    ours.retain_from(o);
                    model = model.split_off(&o);
                } else {
                    assert_eq!(ours.insert(o), model.insert(o), "seed {seed}: insert {o}");
                }
                assert_eq!(ours.len(), model.len(), "seed {seed}");
                for probe in 0..121 {
                    assert_eq!(ours.contains(probe), model.contains(&probe), "seed {seed}");
                }
            }
        }
    }
}
