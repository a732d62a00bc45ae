//! Which tenants have shown they may write to the stream they name.

use std::sync::Arc;
use std::time::Duration;

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
pub(super) struct Proofs(moka::sync::Cache<Arc<str>, Arc<TenantSettings>>);

impl Default for Proofs {
    fn default() -> Self {
        Proofs(
            moka::sync::Cache::builder()
                .time_to_idle(Duration::from_secs(3600))
                .build(),
        )
    }
}

impl Proofs {
    pub(super) fn holds(&self, tenant: &Arc<TenantSettings>) -> bool {
        self.0
            .get(tenant.source_id.as_str())
            .is_some_and(|proven| Arc::ptr_eq(&proven, tenant) || proven.same_destination(tenant))
    }

    /// Records that `tenant`'s write was accepted: true when it was not proven (with
    /// these very settings) before.
    pub(super) fn record(&self, tenant: &Arc<TenantSettings>) -> bool {
        let known = self
            .0
            .get(tenant.source_id.as_str())
            .is_some_and(|proven| Arc::ptr_eq(&proven, tenant));
        if !known {
            // The settings in force replace older ones: the next check is a pointer
            // comparison, and the old settings are not kept alive.
            self.0.insert(tenant.source_id.shared(), tenant.clone());
        }
        !known
    }

    pub(super) fn withdraw(&self, tenant: &TenantSettings) {
        self.0.invalidate(tenant.source_id.as_str());
    }
}
