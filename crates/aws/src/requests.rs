//! How many calls may be on the wire at once: in all, and per tenant, per account and
//! per region.
//!
//! Every request holds a pooled connection and its buffers, so the total is capped. A
//! tenant whose stream answers slowly (or not at all, until the API timeout) would
//! otherwise fill that cap with its own requests and make every other tenant queue
//! behind them; so would an account whose streams all answer slowly, or a region in an
//! outage, whose calls all hang until they time out. So no one tenant, account (in a
//! region) or region may hold more than its share of the places. A call waits for its
//! tenant's share, then its account's in its region, then its region's, and only then
//! for the shared total: one at its share never holds a place in a queue the others wait
//! in, and a call waiting for its region holds only places of that region (a tenant
//! writes to one stream, in one region), so an account's calls to a region that hangs do
//! not hold back its calls to another.
//!
//! AssumeRole calls have a budget of the same kind, by STS region (a region that hangs
//! must not stop cold starts and refreshes everywhere else).

use std::sync::{Arc, Mutex};

use hashbrown::{Equivalent, HashMap};
use kd_tenants::TenantSettings;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Places for calls: a shared total and, for each of `N` kinds of key (tenant, account
/// in a region, region), a share of it per key, kept only while in use.
#[derive(Debug)]
pub struct Places<const N: usize> {
    total: Arc<Semaphore>,
    levels: [Shares; N],
}

/// A key: one string, or two (an account and its region); the second is empty for a
/// one-string key.
type Key = (Arc<str>, Arc<str>);

/// A [`Key`] borrowed for a lookup: hashes as the key does, so a hit allocates nothing.
#[derive(Hash)]
struct KeyRef<'a>(&'a str, &'a str);

impl Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        *self.0 == *key.0 && *self.1 == *key.1
    }
}

/// The shares of one kind of key, each `size` places.
#[derive(Debug)]
struct Shares {
    size: usize,
    map: Mutex<HashMap<Key, Arc<Semaphore>>>,
}

impl Shares {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Semaphore>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `key`'s share, made when first used.
    fn slot(&self, key: (&str, &str)) -> Slot<'_> {
        let mut map = self.lock();
        let (key, semaphore) = match map.get_key_value(&KeyRef(key.0, key.1)) {
            Some((k, s)) => (k.clone(), s.clone()),
            None => {
                let k: Key = (Arc::from(key.0), Arc::from(key.1));
                let s = Arc::new(Semaphore::new(self.size));
                map.insert(k.clone(), s.clone());
                (k, s)
            }
        };
        Slot {
            semaphore,
            key,
            shares: self,
        }
    }
}

/// Leave to have one call on the wire; dropping it gives the places back.
#[derive(Debug)]
pub struct Permit<'a> {
    _total: OwnedSemaphorePermit,
    // Each share's place drops before its slot, which may then forget the key.
    _shares: Vec<(OwnedSemaphorePermit, Slot<'a>)>,
}

/// A key's use of its share, while waiting or holding a place: the key is forgotten
/// when the last use ends (also when a wait is given up), so that hundreds of thousands
/// of tenants do not each keep an entry.
#[derive(Debug)]
struct Slot<'a> {
    semaphore: Arc<Semaphore>,
    key: Key,
    shares: &'a Shares,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        // Clones of a share's semaphore are only made under the lock (the permits'
        // clones are gone by now), so if the map's and ours are the only ones, nobody
        // else holds or awaits it.
        let mut map = self.shares.lock();
        if Arc::strong_count(&self.semaphore) == 2 {
            map.remove(&self.key);
        }
    }
}

/// The places one key of a kind may hold: `share` (0 to 1) of `total`, at least one.
fn share_of(total: usize, share: f64) -> usize {
    ((total as f64 * share.clamp(0.0, 1.0)).ceil() as usize).clamp(1, total)
}

impl<const N: usize> Places<N> {
    /// `total` calls at once, of which one key of kind `i` may hold `shares[i]` (0 to 1,
    /// at least one call).
    pub fn new(total: usize, shares: [f64; N]) -> Self {
        let total = total.max(1);
        Places {
            total: Arc::new(Semaphore::new(total)),
            levels: shares.map(|share| Shares {
                size: share_of(total, share),
                map: Mutex::default(),
            }),
        }
    }

    /// Most calls one key of kind `level` may have on the wire.
    pub fn share(&self, level: usize) -> usize {
        self.levels[level].size
    }

    /// Waits for a place for one call of `keys` (one per kind, innermost first).
    pub async fn acquire(&self, keys: [(&str, &str); N]) -> Permit<'_> {
        let mut shares = Vec::with_capacity(N);
        for (level, key) in self.levels.iter().zip(keys) {
            let slot = level.slot(key);
            // No semaphore is ever closed, so acquiring cannot fail.
            let place = slot
                .semaphore
                .clone()
                .acquire_owned()
                .await
                .expect("semaphores of places are never closed");
            shares.push((place, slot));
        }
        let total = self
            .total
            .clone()
            .acquire_owned()
            .await
            .expect("semaphores of places are never closed");
        Permit {
            _total: total,
            _shares: shares,
        }
    }

    /// Keys of each kind with a call on the wire or waiting for one.
    #[cfg(test)]
    fn active(&self) -> [usize; N] {
        std::array::from_fn(|i| self.levels[i].lock().len())
    }
}

/// Places for Kinesis requests: by tenant, by the stream's account in its region, and
/// by region.
#[derive(Debug)]
pub struct RequestBudget(Places<3>);

impl RequestBudget {
    /// `total` requests at once, of which one tenant may hold `share`, and one account
    /// in a region, or one region, `region_share`.
    pub fn new(total: usize, share: f64, region_share: f64) -> Self {
        RequestBudget(Places::new(total, [share, region_share, region_share]))
    }

    /// Waits for a place for one request of `tenant`. (Not an `async fn`: its future is
    /// the places' own, with no layer around it, as it sits in every write's.)
    pub fn acquire<'a>(
        &'a self,
        tenant: &'a TenantSettings,
    ) -> impl std::future::Future<Output = Permit<'a>> + 'a {
        self.acquire_for(
            tenant.source_id.as_str(),
            &tenant.account,
            tenant.region.as_str(),
        )
    }

    /// Waits for a place for one request of `source` to a stream of `account` in
    /// `region`.
    pub fn acquire_for<'a>(
        &'a self,
        source: &'a str,
        account: &'a str,
        region: &'a str,
    ) -> impl std::future::Future<Output = Permit<'a>> + 'a {
        self.0
            .acquire([(source, ""), (account, region), (region, "")])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits for a place for `keys` in a task of its own, held until the task is aborted.
    fn hold<const N: usize>(
        places: &Arc<Places<N>>,
        keys: [(&'static str, &'static str); N],
    ) -> tokio::task::JoinHandle<()> {
        let places = places.clone();
        tokio::spawn(async move {
            let _p = places.acquire(keys).await;
            std::future::pending::<()>().await;
        })
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn a_key_holds_at_most_its_share_and_others_still_get_through() {
        // (tenant, region): four places, two for any one tenant or region.
        let places = Arc::new(Places::<2>::new(4, [0.5, 0.5]));
        assert_eq!((places.share(0), places.share(1)), (2, 2));
        let a = places.acquire([("slow", ""), ("eu", "")]).await;
        let b = places.acquire([("slow", ""), ("eu", "")]).await;
        // A third call of the slow tenant waits, without taking a shared place.
        let waiting = hold(&places, [("slow", ""), ("eu", "")]);
        // So does one of another tenant in the same region: the region is at its share.
        let same_region = hold(&places, [("other", ""), ("eu", "")]);
        settle().await;
        assert!(!waiting.is_finished() && !same_region.is_finished());
        // Another region gets the rest.
        let c = places.acquire([("quick", ""), ("us", "")]).await;
        let d = places.acquire([("quick2", ""), ("us", "")]).await;
        drop((c, d));
        drop((a, b));
        settle().await;
        assert_eq!(
            places.active(),
            [2, 1],
            "the two waiting ones hold their places"
        );
        waiting.abort();
        same_region.abort();
        settle().await;
        assert_eq!(places.active(), [0, 0], "idle keys are forgotten");
    }

    #[tokio::test]
    async fn an_account_waiting_in_a_region_that_hangs_is_not_held_back_elsewhere() {
        // Eight places; a tenant holds half, an account in a region or a region six.
        let budget = Arc::new(RequestBudget::new(8, 0.5, 0.75));
        // Two tenants of one account write to eu-west-1, which hangs: their calls
        // hold the account's eu-west-1 share, and one more waits for it.
        let mut hung = Vec::new();
        for source in ["a", "b", "a", "b", "a", "b", "a"] {
            let budget = budget.clone();
            hung.push(tokio::spawn(async move {
                let _p = budget
                    .acquire_for(source, "111111111111", "eu-west-1")
                    .await;
                std::future::pending::<()>().await;
            }));
        }
        settle().await;
        // The same account's tenant in us-east-1 gets its places at once.
        let us = tokio::time::timeout(
            Duration::from_millis(100),
            budget.acquire_for("c", "111111111111", "us-east-1"),
        )
        .await;
        assert!(us.is_ok(), "held back by the account's calls to eu-west-1");
        drop(us);
        for h in hung {
            h.abort();
        }
    }

    #[tokio::test]
    async fn the_total_bounds_all_keys_together() {
        let places = Arc::new(Places::<2>::new(2, [1.0, 1.0]));
        let held = (
            places.acquire([("a", ""), ("x", "")]).await,
            places.acquire([("b", ""), ("y", "")]).await,
        );
        let third = hold(&places, [("c", ""), ("z", "")]);
        settle().await;
        assert!(!third.is_finished(), "the total is used up");
        drop(held);
        settle().await;
        assert_eq!(places.active(), [1, 1], "the third holds the freed place");
        third.abort();
    }

    #[tokio::test]
    async fn a_given_up_wait_leaves_no_entry_behind() {
        let places = Places::<2>::new(1, [1.0, 1.0]);
        let held = places.acquire([("a", ""), ("x", "")]).await;
        let gave_up = tokio::time::timeout(
            Duration::from_millis(20),
            places.acquire([("b", ""), ("y", "")]),
        )
        .await;
        assert!(gave_up.is_err(), "b waited for the total");
        drop(held);
        assert_eq!(places.active(), [0, 0]);
    }

    #[test]
    fn a_share_is_at_least_one_call() {
        assert_eq!(Places::<1>::new(10, [0.01]).share(0), 1);
        assert_eq!(Places::<1>::new(0, [0.5]).share(0), 1);
        assert_eq!(Places::<2>::new(256, [0.5, 0.75]).share(1), 192);
    }
}
