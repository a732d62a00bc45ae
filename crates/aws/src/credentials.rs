//! Tenant credentials: STS AssumeRole into the role each tenant created for us, or, for
//! a tenant whose stream's resource policy grants us access, into the worker's own
//! writer role with the tenant's source ID as a session tag (the stream policy's
//! condition: AWS, not this code, keeps one tenant out of another's stream).
//!
//! Keyed by (role ARN, external ID or tag): tenants sharing a role and external ID
//! share one session. A cached session is dropped a margin before its credentials expire, so no
//! write is ever signed with expired credentials; concurrent misses for one key are
//! coalesced into a single AssumeRole (moka's `try_get_with`); a failed AssumeRole is
//! remembered for a short while so a broken tenant does not hammer STS.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_config::SdkConfig;
use aws_credential_types::Credentials;
use kd_tenants::{Access, Region, RoleArn, TenantSettings};
use moka::future::Cache;
use moka::Expiry;

use crate::errors::AwsError;

/// Tuning of the credential cache.
#[derive(Debug, Clone)]
pub struct CredentialSettings {
    pub role_session_name: String,
    /// Lifetime asked of STS (`DurationSeconds`).
    pub session_duration: Duration,
    /// Drop cached credentials this long before they expire (at most half their life).
    pub refresh_margin: Duration,
    /// How long a failed AssumeRole is remembered before STS is asked again.
    pub failure_ttl: Duration,
    /// Most sessions kept at once.
    pub max_entries: u64,
    /// Most AssumeRole calls on the wire at once (a cold start or a mass refresh of
    /// thousands of tenants would otherwise meet STS's request rate limit at once).
    pub max_concurrent_assume_role: usize,
    /// Share of those one STS region may hold (0 to 1).
    pub region_share: f64,
    /// The worker's own role for tenants without one (`aws.resource_policy_role`).
    pub resource_policy_role: Option<RoleArn>,
}

/// The session tag that carries a resource-policy tenant's source ID: the condition a
/// stream policy printed by `policy --stream-arn` grants access on.
pub const SOURCE_TAG: &str = "kinesis-destination-source-id";

impl Default for CredentialSettings {
    fn default() -> Self {
        CredentialSettings {
            role_session_name: "kinesis-destination".into(),
            session_duration: Duration::from_secs(3600),
            refresh_margin: Duration::from_secs(300),
            failure_ttl: Duration::from_secs(10),
            max_entries: 100_000,
            max_concurrent_assume_role: 32,
            region_share: 0.75,
            resource_policy_role: None,
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    role: RoleArn,
    /// Part of the key only; never logged (it may be the tenant's secret). For a
    /// resource-policy tenant, the source ID its session is tagged with.
    external_id: Arc<str>,
    /// The worker's own role, tagged with the source ID, rather than the tenant's.
    tagged: bool,
}

/// One assumed-role session: its credentials and when to stop using them. Nothing more
/// is kept per session (a cached session is a few hundred bytes): writes sign with the
/// credentials through the one shared [`KinesisApi`](crate::api::KinesisApi), and the
/// rare SDK calls build a client when they need one ([`CredentialCache::kinesis`]).
pub struct Session {
    credentials: Credentials,
    /// When the cache must stop handing this session out.
    refresh_at: Instant,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Credentials print redacted in the SDK, but there is nothing worth showing.
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    /// The credentials to sign this session's requests with.
    pub(crate) fn credentials(&self) -> &Credentials {
        &self.credentials
    }
}

struct RefreshAhead;

impl Expiry<Key, Arc<Session>> for RefreshAhead {
    fn expire_after_create(&self, _: &Key, s: &Arc<Session>, now: Instant) -> Option<Duration> {
        Some(s.refresh_at.saturating_duration_since(now))
    }
}

/// The per-(role, external ID) session cache.
#[derive(Clone)]
pub struct CredentialCache {
    sessions: Cache<Key, Arc<Session>>,
    failures: Cache<Key, AwsError>,
    sts_clients: Arc<Mutex<HashMap<Region, aws_sdk_sts::Client>>>,
    base: SdkConfig,
    settings: CredentialSettings,
    readiness: Option<Arc<kd_telemetry::Readiness>>,
    /// Places for AssumeRole calls on the wire: `region_share` of them at most for one
    /// STS region, so a region whose STS hangs cannot hold back cold starts and
    /// refreshes elsewhere.
    assume_places: Arc<crate::requests::Places<1>>,
    /// When STS was last asked about the worker's own identity, and its answer.
    identity_checked: Arc<Mutex<Option<(Instant, bool)>>>,
    /// AWS's time, learned from its answers: what credentials' lifetimes are counted in.
    clock: Arc<crate::clock::Clock>,
}

impl CredentialCache {
    /// Takes readiness away while STS refuses the worker's own credentials.
    pub fn with_readiness(mut self, readiness: Arc<kd_telemetry::Readiness>) -> Self {
        self.clock.set_readiness(readiness.clone());
        self.readiness = Some(readiness);
        self
    }

    /// The readiness it was given, if any (the Kinesis calls report to it too).
    pub fn readiness(&self) -> Option<&Arc<kd_telemetry::Readiness>> {
        self.readiness.as_ref()
    }

    fn identity(&self, why: Option<String>) {
        if let Some(r) = &self.readiness {
            r.set_problem(kd_telemetry::Problem::AwsIdentity, why);
        }
    }

    pub fn new(base: SdkConfig, settings: CredentialSettings) -> Self {
        CredentialCache {
            sessions: Cache::builder()
                .max_capacity(settings.max_entries)
                .expire_after(RefreshAhead)
                .build(),
            failures: Cache::builder()
                .max_capacity(settings.max_entries)
                .time_to_live(settings.failure_ttl)
                .build(),
            sts_clients: Arc::default(),
            base,
            assume_places: Arc::new(crate::requests::Places::new(
                settings.max_concurrent_assume_role,
                [settings.region_share],
            )),
            settings,
            readiness: None,
            identity_checked: Arc::default(),
            clock: Arc::default(),
        }
    }

    /// The role assumed for `tenant` and what distinguishes its session.
    ///
    /// Two tenants are refused here, whatever IAM would say: one that names the worker's
    /// writer role as its own `roleAddress` (a session of it without the source tag is
    /// no tenant's), and a resource-policy tenant whose stream is in the writer role's
    /// own account (the writer role may write there by its identity policy alone, with
    /// no stream policy granting anything to this tenant).
    fn key(&self, tenant: &TenantSettings) -> Result<Key, AwsError> {
        let refuse = |code: &str, message: String| AwsError {
            request_id: None,
            class: crate::ErrorClass::Permanent,
            code: code.into(),
            message,
        };
        let writer = self.settings.resource_policy_role.as_ref();
        match &tenant.access {
            Access::Role(role) if writer == Some(role) => Err(refuse(
                "WriterRoleRefused",
                format!(
                    "source {} names the worker's own writer role as its roleAddress; a tenant's role must be its own",
                    tenant.source_id
                ),
            )),
            Access::Role(role) => Ok(Key {
                role: role.clone(),
                external_id: tenant.external_id_shared(),
                tagged: false,
            }),
            Access::ResourcePolicy => match writer {
                Some(role) if role.account() == &*tenant.account => Err(refuse(
                    "OwnAccountStreamRefused",
                    format!(
                        "source {}'s stream {} is in the worker's own account; resource-policy mode writes only to tenants' accounts",
                        tenant.source_id,
                        tenant.stream_label()
                    ),
                )),
                Some(role) => Ok(Key {
                    role: role.clone(),
                    external_id: tenant.source_id.shared(),
                    tagged: true,
                }),
                None => Err(refuse(
                    "NoResourcePolicyRole",
                    format!(
                        "source {} has no roleAddress (resource-policy mode) and the worker has no aws.resource_policy_role to write to {} with",
                        tenant.source_id,
                        tenant.stream_label()
                    ),
                )),
            },
        }
    }

    /// The role a tenant's writes are signed by: its own, or the worker's writer role.
    pub fn role_of<'a>(&'a self, tenant: &'a TenantSettings) -> Option<&'a RoleArn> {
        tenant
            .role()
            .or(self.settings.resource_policy_role.as_ref())
    }

    /// The session for a tenant: cached, or assumed now.
    pub async fn session(&self, tenant: &TenantSettings) -> Result<Arc<Session>, AwsError> {
        let m = kd_telemetry::metrics();
        let key = self.key(tenant)?;
        if let Some(s) = self.sessions.get(&key).await {
            m.credential_cache_hits.inc();
            return Ok(s);
        }
        if let Some(e) = self.failures.get(&key).await {
            m.credential_cache_hits.inc();
            return Err(e);
        }
        // Boxed: the miss path is a large future, which would otherwise sit in every
        // event's task, cached session or not.
        Box::pin(self.assume_and_cache(key, tenant)).await
    }

    /// Assumes the role (once for concurrent lookups of one key) and caches the session,
    /// or remembers the failure.
    async fn assume_and_cache(
        &self,
        key: Key,
        tenant: &TenantSettings,
    ) -> Result<Arc<Session>, AwsError> {
        let m = kd_telemetry::metrics();
        // Concurrent lookups of one key share a single AssumeRole: only the caller whose
        // future runs it counts a miss; the others were served by the cache.
        let assumed_here = AtomicBool::new(false);
        let result = self
            .sessions
            .try_get_with(key.clone(), async {
                assumed_here.store(true, Ordering::Relaxed);
                self.assume(&key, tenant).await
            })
            .await;
        if assumed_here.load(Ordering::Relaxed) {
            m.credential_cache_misses.inc();
        } else {
            m.credential_cache_hits.inc();
        }
        match result {
            Ok(s) => Ok(s),
            Err(e) => {
                let e = AwsError::clone(&e);
                self.failures.insert(key, e.clone()).await;
                Err(e)
            }
        }
    }

    /// Forgets a tenant's session `refused` (its credentials were refused as expired)
    /// and any remembered failure, so the next call assumes the role again. A session
    /// that has replaced it meanwhile stays: writes sent with the old credentials before
    /// it came are refused after it, and would otherwise have it assumed again, once per
    /// write in flight.
    pub async fn invalidate(&self, tenant: &TenantSettings, refused: &Arc<Session>) {
        let Ok(key) = self.key(tenant) else { return };
        if self
            .sessions
            .get(&key)
            .await
            .is_some_and(|current| !Arc::ptr_eq(&current, refused))
        {
            return;
        }
        self.sessions.invalidate(&key).await;
        self.failures.invalidate(&key).await;
    }

    /// Whether STS refuses the worker's own credentials in the worker's own region
    /// (`GetCallerIdentity`), asked at most every 10 s. An identity error from a
    /// tenant's region alone may mean that region is not enabled for the worker's
    /// account (STS then answers `InvalidClientTokenId` too): that is the tenant's
    /// problem, not every tenant's.
    async fn identity_refused(&self) -> bool {
        const RECHECK: Duration = Duration::from_secs(10);
        if let Some((at, refused)) = *self
            .identity_checked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
        {
            if at.elapsed() < RECHECK {
                return refused;
            }
        }
        let region = self
            .base
            .region()
            .map(|r| r.as_ref().to_owned())
            .unwrap_or_else(|| "us-east-1".into());
        let conf = aws_sdk_sts::config::Builder::from(&self.base)
            .region(aws_config::Region::new(region))
            .interceptor(self.sdk_calls())
            .build();
        let refused = match aws_sdk_sts::Client::from_conf(conf)
            .get_caller_identity()
            .send()
            .await
        {
            Ok(_) => false,
            Err(e) => AwsError::from_sdk("GetCallerIdentity", &e).refuses_worker_identity(),
        };
        *self
            .identity_checked
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), refused));
        refused
    }

    /// An SDK Kinesis client for `region` signing with `session`'s credentials, for the
    /// calls made now and then (listing shards, `check`, `tail`); built on each call
    /// and sharing the base config's connection pool.
    pub fn kinesis(&self, session: &Session, region: &Region) -> aws_sdk_kinesis::Client {
        let conf = aws_sdk_kinesis::config::Builder::from(&self.base)
            .region(aws_config::Region::new(region.as_str().to_owned()))
            .credentials_provider(session.credentials.clone())
            .interceptor(self.sdk_calls())
            .build();
        aws_sdk_kinesis::Client::from_conf(conf)
    }

    /// What every SDK client of the worker's adds to its calls.
    fn sdk_calls(&self) -> crate::sdk_calls::SdkCalls {
        crate::sdk_calls::SdkCalls::new(self.clock.clone())
    }

    /// AWS's time as the worker knows it (shared with the calls that sign with it).
    pub fn clock(&self) -> &Arc<crate::clock::Clock> {
        &self.clock
    }

    /// The worker's own AWS configuration (endpoint, timeouts, identity).
    pub fn base(&self) -> &SdkConfig {
        &self.base
    }

    fn sts(&self, region: &Region) -> aws_sdk_sts::Client {
        per_region(&self.sts_clients, region, |r| {
            let conf = aws_sdk_sts::config::Builder::from(&self.base)
                .region(r)
                .interceptor(self.sdk_calls())
                .build();
            aws_sdk_sts::Client::from_conf(conf)
        })
    }

    async fn assume(&self, key: &Key, tenant: &TenantSettings) -> Result<Arc<Session>, AwsError> {
        let m = kd_telemetry::metrics();
        // The place is held for the call only.
        let _place = self
            .assume_places
            .acquire([(tenant.region.as_str(), "")])
            .await;
        let started = Instant::now();
        // The SDK's call is a ~13 KiB future: boxed, it is allocated only once the
        // permit is held, not by every tenant waiting for one (a cold start of 100,000
        // tenants has them all waiting at once).
        let role = &key.role;
        // Our own role: no external ID; the tag is what the stream policy checks.
        let tag = match key.tagged {
            true => Some(
                aws_sdk_sts::types::Tag::builder()
                    .key(SOURCE_TAG)
                    .value(tenant.source_id.as_str())
                    .build()
                    .map_err(|e| AwsError::construction("AssumeRole", &e))?,
            ),
            false => None,
        };
        let call = || {
            let request = self
                .sts(&tenant.region)
                .assume_role()
                .role_arn(role.as_str())
                .role_session_name(&self.settings.role_session_name)
                .duration_seconds(self.settings.session_duration.as_secs() as i32);
            let request = match &tag {
                Some(tag) => request.tags(tag.clone()),
                None => request.external_id(tenant.external_id()),
            };
            Box::pin(request.send())
        };
        let context = || format!("AssumeRole {role} for source {}", tenant.source_id);
        let mut out = call().await.map_err(|e| AwsError::from_sdk(&context(), &e));
        if out.as_ref().is_err_and(|e| e.refuses_time()) {
            // The SDK has learned AWS's time from the refusal's `Date` (aws-runtime's
            // service_clock_skew, kept per client) but, with its retries off, does not
            // send again: signed again at once rather than after the failure's TTL.
            out = call().await.map_err(|e| AwsError::from_sdk(&context(), &e));
        }
        let out = match out {
            Ok(out) => out,
            Err(err) => {
                m.assume_role.with_label_values(&[outcome(&err)]).inc();
                if err.refuses_worker_identity() && Box::pin(self.identity_refused()).await {
                    tracing::error!(error = %err, "STS refuses the worker's own AWS credentials; no tenant can be served until they are fixed");
                    self.identity(Some(format!(
                        "the worker's own AWS credentials are refused by STS ({}); check the credential chain (IRSA, Pod Identity, environment)",
                        err.code
                    )));
                } else {
                    tracing::warn!(source_id = %tenant.source_id, %role, error = %err, "AssumeRole failed");
                }
                return Err(err);
            }
        };
        let Some(c) = out.credentials() else {
            m.assume_role.with_label_values(&["error"]).inc();
            return Err(AwsError {
                request_id: None,
                class: crate::ErrorClass::Retryable,
                code: "MissingCredentials".into(),
                message: format!("AssumeRole {role} returned no credentials"),
            });
        };
        let expires = SystemTime::try_from(*c.expiration())
            .unwrap_or_else(|_| self.clock.now() + self.settings.session_duration);
        // The expiry is in STS's time: counted from AWS's time, not the machine's, or a
        // clock behind AWS's would keep credentials past their end.
        let lifetime = expires
            .duration_since(self.clock.now())
            .unwrap_or(Duration::ZERO);
        let refresh_at = Instant::now()
            + refresh_after(
                lifetime,
                self.settings.refresh_margin,
                rand::random::<f64>(),
            );
        m.assume_role.with_label_values(&["ok"]).inc();
        self.identity(None);
        tracing::debug!(
            source_id = %tenant.source_id,
            %role,
            lifetime_s = lifetime.as_secs(),
            took_ms = started.elapsed().as_millis() as u64,
            "assumed tenant role"
        );
        Ok(Arc::new(Session {
            credentials: Credentials::new(
                c.access_key_id(),
                c.secret_access_key(),
                Some(c.session_token().to_owned()),
                Some(expires),
                "AssumeRole",
            ),
            refresh_at,
        }))
    }
}

/// When cached credentials of `lifetime` are replaced: `margin` before they expire (at
/// most half their life), less a further share of up to half the margin drawn from
/// `jitter` (0 to 1), so sessions assumed together (a cold start, a rebalance) do not all
/// call STS again in the same second.
fn refresh_after(lifetime: Duration, margin: Duration, jitter: f64) -> Duration {
    let margin = margin.min(lifetime / 2);
    let spread = margin.mul_f64(jitter.clamp(0.0, 1.0) / 2.0);
    lifetime.saturating_sub(margin + spread)
}

fn outcome(err: &AwsError) -> &'static str {
    match err.class {
        crate::ErrorClass::Permanent | crate::ErrorClass::RecordTooLarge => "denied",
        _ => "error",
    }
}

/// The client for `region` from `clients`, built on first use (clients of one base
/// config share its HTTP connection pool).
fn per_region<C: Clone>(
    clients: &Mutex<HashMap<Region, C>>,
    region: &Region,
    build: impl FnOnce(aws_config::Region) -> C,
) -> C {
    let mut clients = clients.lock().unwrap_or_else(|p| p.into_inner());
    clients
        .entry(region.clone())
        .or_insert_with(|| build(aws_config::Region::new(region.as_str().to_owned())))
        .clone()
}

#[cfg(test)]
mod refresh_tests {
    use super::*;

    #[test]
    fn credentials_are_replaced_at_a_jittered_point_before_they_expire() {
        let hour = Duration::from_secs(3600);
        let margin = Duration::from_secs(300);
        assert_eq!(refresh_after(hour, margin, 0.0), Duration::from_secs(3300));
        assert_eq!(refresh_after(hour, margin, 1.0), Duration::from_secs(3150));
        assert_eq!(refresh_after(hour, margin, 0.5), Duration::from_secs(3225));
        // Short-lived credentials: the margin is at most half their life.
        let minute = Duration::from_secs(60);
        assert_eq!(refresh_after(minute, margin, 0.0), Duration::from_secs(30));
        assert_eq!(refresh_after(minute, margin, 1.0), Duration::from_secs(15));
        // Sessions assumed together spread over the jitter window.
        let points: std::collections::HashSet<u64> = (0..100)
            .map(|_| refresh_after(hour, margin, rand::random::<f64>()).as_secs())
            .collect();
        assert!(points.len() > 20, "{} distinct seconds", points.len());
        assert!(points.iter().all(|&p| (3150..=3300).contains(&p)));
    }
}

#[cfg(test)]
pub(crate) mod cache_tests;
