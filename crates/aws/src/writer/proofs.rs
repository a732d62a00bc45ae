//! Which tenants have shown they may write to the stream they name.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hashbrown::{DefaultHashBuilder, HashMap};
use kd_tenants::TenantSettings;

/// Which tenants have shown they may write to the stream they name: a `PutRecord` or
/// `PutRecords` call with their credentials was accepted (AWS checks the role, the
/// external ID and the stream's policies before it counts a write against a shard).
///
/// Only a proven tenant spends its stream's shared capacity (the per-shard budgets
/// every tenant of that stream draws on) or lists its shards. Until then its writes
/// draw on a budget of its own ([`RateLimits::acquire_trial`]): a tenant that names
/// someone else's stream, with a role it cannot assume or one the stream does not
/// admit, slows nobody down while its events fail. Keyed by source ID; the proof holds
/// only while the settings name the same identity and stream, and an access-denied
/// answer withdraws it.
///
/// A proof lives as long as the settings it was made with are in use: one whose
/// settings nobody else holds any more (the tenant was removed, or its settings were
/// replaced and no event of the old ones is in flight) is swept out as proofs are
/// recorded. Plain maps, not a cache: a proof is an entry of a few dozen bytes, looked
/// up for every record.
/// Proven tenants whose source ID hashes to one shard, with the settings proven.
type Shard = Mutex<HashMap<Arc<str>, Arc<TenantSettings>>>;

pub(super) struct Proofs {
    shards: Box<[Shard]>,
    hasher: DefaultHashBuilder,
    /// Proofs recorded, for the sweep.
    recorded: AtomicUsize,
}

const SHARDS: usize = 16;
/// One shard is swept after this many proofs are recorded.
const SWEEP_EVERY: usize = 256;

impl Default for Proofs {
    fn default() -> Self {
        Proofs {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: DefaultHashBuilder::default(),
            recorded: AtomicUsize::new(0),
        }
    }
}

impl Proofs {
    fn shard(&self, source: &str) -> MutexGuard<'_, HashMap<Arc<str>, Arc<TenantSettings>>> {
        let i = self.hasher.hash_one(source) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn holds(&self, tenant: &Arc<TenantSettings>) -> bool {
        self.shard(tenant.source_id.as_str())
            .get(tenant.source_id.as_str())
            .is_some_and(|proven| Arc::ptr_eq(proven, tenant) || proven.same_destination(tenant))
    }

    /// Records that `tenant`'s write was accepted: true when it was not proven (with
    /// these very settings) before.
    pub(super) fn record(&self, tenant: &Arc<TenantSettings>) -> bool {
        let known = {
            let mut shard = self.shard(tenant.source_id.as_str());
            let known = shard
                .get(tenant.source_id.as_str())
                .is_some_and(|proven| Arc::ptr_eq(proven, tenant));
            if !known {
                // The settings in force replace older ones: the next check is a pointer
                // comparison, and the old settings are not kept alive.
                shard.insert(tenant.source_id.shared(), tenant.clone());
            }
            known
        };
        if !known {
            let n = self.recorded.fetch_add(1, Ordering::Relaxed);
            if n % SWEEP_EVERY == SWEEP_EVERY - 1 {
                self.sweep(n / SWEEP_EVERY % SHARDS);
            }
        }
        !known
    }

    pub(super) fn withdraw(&self, tenant: &TenantSettings) {
        self.shard(tenant.source_id.as_str())
            .remove(tenant.source_id.as_str());
    }

    /// Drops shard `i`'s proofs whose settings nobody else holds.
    fn sweep(&self, i: usize) {
        let mut shard = self.shards[i].lock().unwrap_or_else(|p| p.into_inner());
        shard.retain(|_, settings| Arc::strong_count(settings) > 1);
        if shard.capacity() > 2 * shard.len() + 64 {
            shard.shrink_to_fit();
        }
    }

    /// Proofs held (for tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(n: usize) -> Arc<TenantSettings> {
        Arc::new(kd_tenants::test_settings(
            serde_json::json!({"sourceId": format!("src_{n}")}),
        ))
    }

    #[test]
    fn proofs_of_settings_no_longer_in_use_are_swept_and_others_stay() {
        let proofs = Proofs::default();
        let kept = tenant(0);
        assert!(proofs.record(&kept));
        assert!(!proofs.record(&kept), "the same settings: known");
        assert!(proofs.holds(&kept));
        // Tenants proven once, whose settings are then dropped (removed tenants).
        for n in 1..=SWEEP_EVERY * SHARDS * 2 {
            assert!(proofs.record(&tenant(n)));
        }
        assert!(
            proofs.len() < SWEEP_EVERY * SHARDS,
            "{} proofs left",
            proofs.len()
        );
        assert!(
            proofs.holds(&kept),
            "settings still in use keep their proof"
        );
        // New settings of the same tenant replace the proof; a withdrawal ends it.
        let replaced = tenant(0);
        assert!(proofs.holds(&replaced), "the same destination");
        proofs.withdraw(&replaced);
        assert!(!proofs.holds(&kept));
    }
}
