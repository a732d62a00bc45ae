//! File provider: a JSON array of tenant objects, re-read when it changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::{model::parse_tenant, SettingsError, Snapshot, TenantEntry, TenantStore};

/// Why a whole settings file was rejected (the last good settings stay in force).
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read tenants file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tenants file {path} is not a JSON array of tenant objects: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// An edit that would remove every tenant at once, without `tenants.allow_empty`.
    #[error("tenants file {path}: the edit removes all {had} tenants at once (set tenants.allow_empty = true if that is meant)")]
    RemovesAll { path: PathBuf, had: usize },
}

/// Reads and validates the tenants file. Individual invalid tenants do not fail the
/// load: they become [`TenantEntry::Invalid`] (and are logged here, once per load).
/// Returns the snapshot and the bytes it was read from (for [`watch_file`]).
pub fn load_file(path: &Path) -> Result<(Snapshot, Vec<u8>), FileError> {
    let bytes = std::fs::read(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let snapshot = parse_array(&bytes).map_err(|source| FileError::Parse {
        path: path.to_owned(),
        source,
    })?;
    Ok((snapshot, bytes))
}

/// What a tenants file held, to tell whether it changed: its SHA-256 (keeping the bytes
/// themselves cost 14 MB at 100,000 tenants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contents([u8; 32]);

impl Contents {
    pub fn of(bytes: &[u8]) -> Contents {
        use sha2::Digest;
        Contents(sha2::Sha256::digest(bytes).into())
    }
}

/// A file's size, modification time and inode: a change to any says its contents may
/// have changed (an edit, a rename over it, a ConfigMap's symlink swap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    ino: u64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            len: m.len(),
            modified: m.modified().ok(),
            ino: m.ino(),
        })
    }

    /// Whether the file was last modified long enough ago that an edit within the same
    /// tick of a coarse clock (some file systems keep seconds) would show in a later
    /// stamp: a stamp taken sooner is not trusted (the file is read again).
    fn settled(&self) -> bool {
        self.modified
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age >= Duration::from_secs(3))
    }
}

/// Loads the tenants file into `store` (see [`load_file`]); returns what it held, for
/// [`watch_file`].
pub fn load_file_into(path: &Path, store: &TenantStore) -> Result<Contents, FileError> {
    let (snapshot, bytes) = load_file(path)?;
    install(store, path, snapshot);
    Ok(Contents::of(&bytes))
}

/// Puts a newly read file's settings in force, and says so.
fn install(store: &TenantStore, path: &Path, snapshot: Snapshot) {
    tracing::info!(
        path = %path.display(),
        tenants = snapshot.len(),
        invalid = snapshot.invalid_count(),
        "tenant settings loaded"
    );
    store.replace(snapshot);
}

/// Parses the array one tenant at a time: only one entry's JSON tree exists at once
/// (the whole file's would be about seven times its size, over a gigabyte at 1,000,000
/// tenants). What is wrong with single entries is logged once the whole file has parsed:
/// a file that fails (and is read again at every poll) logs only its own error.
fn parse_array(bytes: &[u8]) -> Result<Snapshot, serde_json::Error> {
    use serde::Deserializer as _;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let (tenants, warnings) = de.deserialize_seq(TenantsVisitor)?;
    de.end()?;
    for warning in warnings {
        warning.log();
    }
    Ok(Snapshot::new(tenants))
}

/// What is wrong with one entry of the file.
enum EntryWarning {
    /// A source listed again; the last one wins.
    Twice { index: usize },
    /// Invalid settings of a source: its events will be dead-lettered.
    Invalid { error: SettingsError },
    /// An entry without a usable source ID, left out.
    Skipped { index: usize, error: SettingsError },
}

impl EntryWarning {
    fn log(&self) {
        match self {
            EntryWarning::Twice { index } => tracing::warn!(
                index,
                "tenants file lists a source twice; the last one wins"
            ),
            EntryWarning::Invalid { error } => {
                tracing::warn!(error = %error, "invalid tenant settings; its events will be dead-lettered")
            }
            EntryWarning::Skipped { index, error } => {
                tracing::warn!(index, error = %error, "tenant entry skipped")
            }
        }
    }
}

struct TenantsVisitor;

impl<'de> serde::de::Visitor<'de> for TenantsVisitor {
    type Value = (HashMap<Arc<str>, TenantEntry>, Vec<EntryWarning>);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of tenant objects")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut tenants: HashMap<Arc<str>, TenantEntry> =
            HashMap::with_capacity(seq.size_hint().unwrap_or(0));
        let mut warnings = Vec::new();
        let mut index = 0usize;
        while let Some(item) = seq.next_element::<Value>()? {
            warnings.extend(add_entry(&mut tenants, index, &item));
            index += 1;
        }
        Ok((tenants, warnings))
    }
}

/// Adds the file's entry number `index` (valid or not) to `tenants`; what is wrong with
/// it, if anything.
fn add_entry(
    tenants: &mut HashMap<Arc<str>, TenantEntry>,
    index: usize,
    item: &Value,
) -> Option<EntryWarning> {
    match parse_tenant(item) {
        Ok(t) => {
            let key: Arc<str> = t.source_id.shared();
            tenants
                .insert(key, TenantEntry::Valid(Arc::new(t)))
                .map(|_| EntryWarning::Twice { index })
        }
        Err(e) => match e.source_id() {
            Some(id) => {
                tenants.insert(
                    id.into(),
                    TenantEntry::Invalid {
                        reason: e.to_string().into(),
                    },
                );
                Some(EntryWarning::Invalid { error: e })
            }
            None => Some(EntryWarning::Skipped { index, error: e }),
        },
    }
}

/// Polls the file every `interval` and loads it into the store whenever its contents
/// differ from what was last seen (`last_seen`: what the file held when it was loaded, if
/// it was). A bad
/// edit is reported (log and `kinesis_destination_tenant_settings_errors_total`) and the
/// last good settings stay. So is an edit that removes every tenant at once (a truncated
/// or emptied file would dead-letter all traffic), unless `allow_empty`.
///
/// Polling (rather than inotify) also sees files replaced through symlinks, as
/// Kubernetes does for mounted ConfigMaps. Reading and parsing run off the async
/// runtime's threads (100,000 tenants are 14 MB of JSON).
pub async fn watch_file(
    path: PathBuf,
    store: Arc<TenantStore>,
    interval: Duration,
    last_seen: Option<Contents>,
    allow_empty: bool,
) {
    let mut last = last_seen;
    // The file's metadata when it last held `last`: while it is the same, the file is
    // not read again (reading and hashing 14 MB every second cost ~10 ms each time).
    let mut stamp: Option<Stamp> = None;
    loop {
        let read = {
            let path = path.clone();
            let known = stamp.filter(|_| last.is_some());
            // Read and hashed there too: 14 MB at 100,000 tenants.
            tokio::task::spawn_blocking(move || {
                let now = Stamp::of(&path);
                if now.is_some() && now == known {
                    return Ok(None);
                }
                std::fs::read(&path).map(|bytes| {
                    let contents = Contents::of(&bytes);
                    Some((bytes, contents, now))
                })
            })
            .await
        };
        match read {
            Ok(Ok(None)) => {}
            Ok(Ok(Some((bytes, contents, now)))) if last == Some(contents) => {
                stamp = now.filter(Stamp::settled);
                drop(bytes);
            }
            Ok(Ok(Some((bytes, contents, now)))) => {
                let parsed = {
                    let (path, had) = (path.clone(), store.snapshot().len());
                    tokio::task::spawn_blocking(move || {
                        let parsed = parse_array(&bytes)
                            .map_err(|source| FileError::Parse {
                                path: path.clone(),
                                source,
                            })
                            .and_then(|snapshot| {
                                if snapshot.is_empty() && had > 0 && !allow_empty {
                                    Err(FileError::RemovesAll { path, had })
                                } else {
                                    Ok(snapshot)
                                }
                            });
                        drop(bytes);
                        parsed
                    })
                    .await
                };
                let parsed = match parsed {
                    Ok(done) => done,
                    Err(e) => {
                        kd_telemetry::metrics().tenant_settings_errors.inc();
                        tracing::error!(path = %path.display(), error = %e, "tenants file parser failed; keeping the last good settings");
                        tokio::time::sleep(interval).await;
                        continue;
                    }
                };
                match parsed {
                    Ok(snapshot) => install(&store, &path, snapshot),
                    Err(error) => {
                        kd_telemetry::metrics().tenant_settings_errors.inc();
                        tracing::error!(
                            %error,
                            "tenants file rejected; keeping the last good settings"
                        );
                    }
                }
                last = Some(contents);
                // What the stamp describes: the contents just taken in (a parser that
                // failed leaves both, so the file is read again).
                stamp = now.filter(Stamp::settled);
            }
            Ok(Err(e)) => {
                if last.is_some() {
                    kd_telemetry::metrics().tenant_settings_errors.inc();
                }
                tracing::error!(path = %path.display(), error = %e, "cannot read tenants file; keeping the last good settings");
                last = None;
            }
            Err(e) => tracing::error!(error = %e, "tenants file reader failed"),
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_changes_with_an_edit_or_a_replacement_and_is_trusted_once_settled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.json");
        std::fs::write(&path, "[]").unwrap();
        let first = Stamp::of(&path).unwrap();
        assert!(!first.settled(), "just written: read again next time");
        let old = std::time::SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let settled = Stamp::of(&path).unwrap();
        assert!(settled.settled());
        assert_eq!(
            Stamp::of(&path),
            Some(settled),
            "unchanged file, same stamp"
        );
        // An edit in place (its time set back as before): the size tells.
        std::fs::write(&path, "[ ]").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(old).unwrap();
        assert_ne!(Stamp::of(&path), Some(settled));
        // A file of the same size and time renamed over it: the inode tells.
        let other = dir.path().join("next.json");
        std::fs::write(&other, "[ ]").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let before = Stamp::of(&path).unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert_ne!(Stamp::of(&path), Some(before));
    }

    #[test]
    fn invalid_tenants_are_kept_as_invalid_and_others_load() {
        let json = br#"[
          {"sourceId":"a","roleAddress":"arn:aws:iam::123456789012:role/r","region":"us-east-1","stream":"s"},
          {"sourceId":"b","roleAddress":"nope","region":"us-east-1","stream":"s"},
          {"region":"us-east-1"}
        ]"#;
        let snap = parse_array(json).unwrap();
        assert!(matches!(snap.get("a"), Some(TenantEntry::Valid(_))));
        assert!(matches!(snap.get("b"), Some(TenantEntry::Invalid { .. })));
        assert_eq!(snap.len(), 2);
    }

    #[test]
    fn a_file_that_is_not_an_array_is_rejected_whole() {
        assert!(parse_array(b"{\"sourceId\":\"a\"}").is_err());
        assert!(parse_array(b"[{").is_err());
    }

    #[tokio::test]
    async fn watcher_reloads_on_change_and_keeps_last_good_on_bad_edit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.json");
        let (store, task) = watching(&path, false).await;

        std::fs::write(&path, "[ not json").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            store.snapshot().get("a").is_some(),
            "bad edit keeps last good"
        );

        let two = ONE.replace("\"a\"", "\"b\"");
        std::fs::write(&path, two).unwrap();
        wait_for(|| store.snapshot().get("b").is_some()).await;
        assert!(store.snapshot().get("a").is_none());
        task.abort();
    }

    #[tokio::test]
    async fn an_edit_that_removes_every_tenant_is_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.json");
        for allow_empty in [false, true] {
            let (store, task) = watching(&path, allow_empty).await;
            std::fs::write(&path, "[]").unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert_eq!(
                store.snapshot().is_empty(),
                allow_empty,
                "allow_empty = {allow_empty}"
            );
            task.abort();
        }
    }

    /// One valid tenant, `a`.
    const ONE: &str = r#"[{"sourceId":"a","roleAddress":"arn:aws:iam::123456789012:role/r","region":"us-east-1","stream":"s"}]"#;

    /// Writes [`ONE`] to `path` and watches it until tenant `a` is loaded.
    async fn watching(
        path: &Path,
        allow_empty: bool,
    ) -> (Arc<TenantStore>, tokio::task::JoinHandle<()>) {
        std::fs::write(path, ONE).unwrap();
        let store = Arc::new(TenantStore::new());
        let task = tokio::spawn(watch_file(
            path.to_owned(),
            store.clone(),
            Duration::from_millis(20),
            None,
            allow_empty,
        ));
        wait_for(|| store.snapshot().get("a").is_some()).await;
        (store, task)
    }

    async fn wait_for(cond: impl Fn() -> bool) {
        for _ in 0..200 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached");
    }
}
