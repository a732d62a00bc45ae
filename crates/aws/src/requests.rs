//! How many requests may be on the wire at once: in all, and per tenant.
//!
//! Every request holds a pooled connection and its buffers, so the total is capped. A
//! tenant whose stream answers slowly (or not at all, until the API timeout) would
//! otherwise fill that cap with its own requests and make every other tenant queue
//! behind them; so one tenant may hold at most its share of it. A tenant waits for its
//! own share first and only then for the shared budget, so a tenant at its share never
//! holds a place in the shared queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The request budgets: one shared, one per tenant (kept only while in use).
#[derive(Debug)]
pub struct RequestBudget {
    total: Arc<Semaphore>,
    per_tenant: usize,
    tenants: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
}

/// Leave to have one request on the wire; dropping it gives the place back.
#[derive(Debug)]
pub struct RequestPermit<'a> {
    // Fields drop in order: the places are given back before the tenant's entry is
    // looked at.
    _total: OwnedSemaphorePermit,
    _tenant: OwnedSemaphorePermit,
    _slot: TenantSlot<'a>,
}

/// A tenant's use of its entry, while waiting or holding a place: the entry is
/// forgotten when the last use ends (also when a wait is given up).
#[derive(Debug)]
struct TenantSlot<'a> {
    semaphore: Arc<Semaphore>,
    source: Arc<str>,
    budget: &'a RequestBudget,
}

impl RequestBudget {
    /// `total` requests at once, of which one tenant may hold `share` (0 to 1, at least
    /// one request).
    pub fn new(total: usize, share: f64) -> Self {
        let total = total.max(1);
        let per_tenant = ((total as f64 * share.clamp(0.0, 1.0)).ceil() as usize).clamp(1, total);
        RequestBudget {
            total: Arc::new(Semaphore::new(total)),
            per_tenant,
            tenants: Mutex::default(),
        }
    }

    /// Most requests one tenant may have on the wire.
    #[cfg(test)]
    pub fn per_tenant(&self) -> usize {
        self.per_tenant
    }

    /// Waits for a place for one request of `source`.
    pub async fn acquire(&self, source: &Arc<str>) -> RequestPermit<'_> {
        let slot = TenantSlot {
            semaphore: self
                .lock()
                .entry(source.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_tenant)))
                .clone(),
            source: source.clone(),
            budget: self,
        };
        // Neither semaphore is ever closed, so acquiring cannot fail.
        let tenant = slot
            .semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("request semaphores are never closed");
        let total = self
            .total
            .clone()
            .acquire_owned()
            .await
            .expect("request semaphores are never closed");
        RequestPermit {
            _total: total,
            _tenant: tenant,
            _slot: slot,
        }
    }

    /// Tenants with a request on the wire or waiting for one.
    #[cfg(test)]
    pub fn active_tenants(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Semaphore>>> {
        self.tenants.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for TenantSlot<'_> {
    fn drop(&mut self) {
        // Clones of a tenant's semaphore are only made under the lock (the permits'
        // clones are gone by now), so if the map's and ours are the only ones, nobody
        // else holds or awaits it: forget it, so that hundreds of thousands of tenants
        // do not each keep an entry.
        let mut tenants = self.budget.lock();
        if Arc::strong_count(&self.semaphore) == 2 {
            tenants.remove(&self.source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_tenant_holds_at_most_its_share_and_others_still_get_through() {
        let budget = Arc::new(RequestBudget::new(4, 0.5));
        assert_eq!(budget.per_tenant(), 2);
        let (slow, quick): (Arc<str>, Arc<str>) = ("slow".into(), "quick".into());
        let a = budget.acquire(&slow).await;
        let b = budget.acquire(&slow).await;
        // A third request of the slow tenant waits, without taking a shared place.
        let waiting = {
            let (budget, slow) = (budget.clone(), slow.clone());
            tokio::spawn(async move {
                let _p = budget.acquire(&slow).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "slow is at its share");
        let c = budget.acquire(&quick).await;
        let d = budget.acquire(&quick).await;
        drop((c, d));
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("a place of its own freed up")
            .unwrap();
        drop(b);
        assert_eq!(budget.active_tenants(), 0, "idle tenants are forgotten");
    }

    #[tokio::test]
    async fn the_total_bounds_all_tenants_together() {
        let budget = Arc::new(RequestBudget::new(2, 1.0));
        let held: Vec<_> = acquire_each(&budget, &["a", "b"]).await;
        let third = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let _p = budget.acquire(&Arc::from("c")).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished(), "the total is used up");
        drop(held);
        tokio::time::timeout(Duration::from_secs(1), third)
            .await
            .expect("a place freed up")
            .unwrap();
    }

    async fn acquire_each<'a>(
        budget: &'a RequestBudget,
        sources: &[&str],
    ) -> Vec<RequestPermit<'a>> {
        let mut out = Vec::new();
        for s in sources {
            out.push(budget.acquire(&Arc::from(*s)).await);
        }
        out
    }

    #[tokio::test]
    async fn a_given_up_wait_leaves_no_entry_behind() {
        let budget = RequestBudget::new(1, 1.0);
        let held = budget.acquire(&Arc::from("a")).await;
        let gave_up =
            tokio::time::timeout(Duration::from_millis(20), budget.acquire(&Arc::from("b"))).await;
        assert!(gave_up.is_err(), "b waited for the total");
        drop(held);
        assert_eq!(budget.active_tenants(), 0);
    }

    #[test]
    fn the_share_is_at_least_one_request() {
        assert_eq!(RequestBudget::new(10, 0.01).per_tenant(), 1);
        assert_eq!(RequestBudget::new(0, 0.5).per_tenant(), 1);
        assert_eq!(RequestBudget::new(256, 0.5).per_tenant(), 128);
    }
}
