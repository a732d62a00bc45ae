//! Route: tenant settings and the snapshot the hot path reads.
//!
//! Each source (tenant) has the settings of an Amazon Kinesis destination: the IAM role we
//! assume, the region and stream to write to, an optional secret external ID, and a few
//! capacity hints (see "Tenant settings" in the README). Settings are parsed and validated once, when they are loaded,
//! into [`TenantSettings`]; inner code only ever sees valid values. A tenant whose
//! settings are invalid stays in the snapshot as [`TenantEntry::Invalid`], so its events
//! are dead-lettered `invalid_settings` instead of `unknown_source`.
//!
//! Settings come from a JSON file ([`watch_file`]) or a compacted Kafka topic
//! ([`follow_topic`]). The [`TenantStore`] holds an immutable [`Snapshot`] behind an `ArcSwap`: lookups take
//! no lock, and a reload swaps the whole snapshot atomically.

mod file;
mod model;
mod topic;

pub use file::{load_file, load_file_into, watch_file, Contents, FileError};
pub use model::{
    parse_tenant, test_settings, Access, FieldError, Region, RoleArn, Secret, SettingsError,
    SourceId, StreamArn, StreamName, TenantSettings, WriteMode, DEFAULT_MAX_RECORD_KIB,
    MAX_RECORD_KIB_LIMIT, SOURCE_ID_MAX_CHARS,
};
pub use topic::{apply_record, follow_topic, TopicError, TopicSettings};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

/// What the snapshot knows about one source.
#[derive(Debug, Clone)]
pub enum TenantEntry {
    Valid(Arc<TenantSettings>),
    /// Present but unusable; `reason` names the offending setting (never a secret).
    Invalid {
        reason: Arc<str>,
    },
}

/// An immutable view of all tenants, keyed by source ID.
#[derive(Debug, Default)]
pub struct Snapshot {
    tenants: HashMap<Arc<str>, TenantEntry>,
}

impl Snapshot {
    /// The snapshot of `tenants`, with every tenant whose `secretId` is another tenant's
    /// source ID made invalid: the external ID a role trusts is the source ID of its
    /// tenant, so such a setting would let one tenant write through another's role.
    /// [`TenantStore::replace`] also checks against every source ID loaded before.
    pub fn new(tenants: HashMap<Arc<str>, TenantEntry>) -> Self {
        let mut snapshot = Snapshot { tenants };
        snapshot.refuse_impostors(|_| false);
        snapshot
    }

    /// Makes invalid every tenant whose `secretId` is the source ID of another tenant
    /// of this snapshot, or one that `known` knows.
    fn refuse_impostors(&mut self, known: impl Fn(&str) -> bool) {
        let tenants = &self.tenants;
        let impostors: Vec<Arc<str>> = tenants
            .iter()
            .filter_map(|(source, entry)| match entry {
                TenantEntry::Valid(t) => t
                    .secret_id
                    .as_ref()
                    .map(|s| s.expose())
                    .filter(|secret| {
                        *secret != &**source && (tenants.contains_key(*secret) || known(secret))
                    })
                    .map(|_| source.clone()),
                TenantEntry::Invalid { .. } => None,
            })
            .collect();
        for source in impostors {
            let reason: Arc<str> = format!(
                "tenant {}: secretId is the source ID of another tenant (external IDs must not name another tenant)",
                kd_event::text::escape_clip(&source, SOURCE_ID_MAX_CHARS)
            )
            .into();
            tracing::warn!(%reason, "invalid tenant settings; its events will be dead-lettered");
            self.tenants.insert(source, TenantEntry::Invalid { reason });
        }
    }

    pub fn get(&self, source_id: &str) -> Option<&TenantEntry> {
        self.tenants.get(source_id)
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    pub fn invalid_count(&self) -> usize {
        self.tenants
            .values()
            .filter(|e| matches!(e, TenantEntry::Invalid { .. }))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(source: &str, secret: Option<&str>) -> (Arc<str>, TenantEntry) {
        let mut v = serde_json::json!({"sourceId": source,
            "roleAddress": "arn:aws:iam::123456789012:role/r", "region": "us-east-1",
            "stream": "s"});
        if let Some(secret) = secret {
            v["secretId"] = secret.into();
        }
        (
            source.into(),
            TenantEntry::Valid(Arc::new(parse_tenant(&v).unwrap())),
        )
    }

    #[test]
    fn a_secret_id_naming_another_tenant_makes_its_tenant_invalid() {
        let s = Snapshot::new(HashMap::from([
            tenant("src_victim", None),
            tenant("src_evil", Some("src_victim")),
            tenant("src_own", Some("src_own")),
            tenant("src_shared_a", Some("shared-secret")),
            tenant("src_shared_b", Some("shared-secret")),
        ]));
        let Some(TenantEntry::Invalid { reason }) = s.get("src_evil") else {
            panic!("src_evil must be invalid")
        };
        assert!(reason.contains("another tenant"), "{reason}");
        for ok in ["src_victim", "src_own", "src_shared_a", "src_shared_b"] {
            assert!(
                matches!(s.get(ok), Some(TenantEntry::Valid(_))),
                "{ok} stays valid"
            );
        }
        assert_eq!(s.invalid_count(), 1);
    }

    #[test]
    fn a_secret_id_naming_any_tenant_ever_loaded_is_refused() {
        let store = TenantStore::new();
        store.replace(Snapshot::new(HashMap::from([tenant("src_victim", None)])));
        // The victim is removed, and the impostor arrives: still refused.
        store.replace(Snapshot::new(HashMap::from([tenant(
            "src_evil",
            Some("src_victim"),
        )])));
        assert!(matches!(
            store.snapshot().get("src_evil"),
            Some(TenantEntry::Invalid { .. })
        ));
        // The impostor first, then its victim: refused from the victim's arrival.
        let store = TenantStore::new();
        store.replace(Snapshot::new(HashMap::from([tenant(
            "src_evil",
            Some("src_later"),
        )])));
        assert!(matches!(
            store.snapshot().get("src_evil"),
            Some(TenantEntry::Valid(_))
        ));
        store.replace(Snapshot::new(HashMap::from([
            tenant("src_evil", Some("src_later")),
            tenant("src_later", None),
        ])));
        assert!(matches!(
            store.snapshot().get("src_evil"),
            Some(TenantEntry::Invalid { .. })
        ));
        store.replace(Snapshot::new(HashMap::from([tenant(
            "src_evil",
            Some("src_later"),
        )])));
        assert!(
            matches!(
                store.snapshot().get("src_evil"),
                Some(TenantEntry::Invalid { .. })
            ),
            "once seen, always refused"
        );
    }
}

/// The current snapshot, swapped whole when settings change.
#[derive(Debug, Default)]
pub struct TenantStore {
    current: ArcSwap<Snapshot>,
    loaded: AtomicBool,
    /// Every valid source ID loaded since the process started: a `secretId` naming one
    /// of them is refused even after that tenant was removed.
    seen: std::sync::Mutex<Seen>,
}

/// Source IDs seen, as 64-bit hashes under a key chosen at start (8 bytes each: a
/// million tenants cost some 16 MB; a secret that collides with one is refused, at odds
/// of one in 2^64 per ID).
#[derive(Debug, Default)]
struct Seen {
    hasher: std::hash::RandomState,
    ids: std::collections::HashSet<u64>,
}

impl Seen {
    fn hash(&self, id: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(id)
    }
}

impl TenantStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The snapshot in force now. Cheap: one atomic load.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Installs a new snapshot and records the tenant gauges.
    pub fn replace(&self, mut snapshot: Snapshot) {
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            // Valid tenants only: an invalid entry's key may be any bytes a producer
            // wrote.
            let valid: Vec<u64> = snapshot
                .tenants
                .iter()
                .filter(|(_, e)| matches!(e, TenantEntry::Valid(_)))
                .map(|(id, _)| seen.hash(id))
                .collect();
            seen.ids.extend(valid);
            snapshot.refuse_impostors(|source| seen.ids.contains(&seen.hash(source)));
        }
        let m = kd_telemetry::metrics();
        let invalid = snapshot.invalid_count();
        m.tenant_settings
            .with_label_values(&["valid"])
            .set((snapshot.len() - invalid) as i64);
        m.tenant_settings
            .with_label_values(&["invalid"])
            .set(invalid as i64);
        self.current.store(Arc::new(snapshot));
        self.loaded.store(true, Ordering::SeqCst);
    }

    /// True once a first set of settings has been installed.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }
}
