//! The cache against the AWS fake's STS: one AssumeRole per (role, external ID) however
//! many ask at once, failures remembered for `failure_ttl`, sessions forgotten on
//! `invalidate` and replaced before their credentials expire.

use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_smithy_types::retry::RetryConfig;
use kd_testkit::FakeAws;
use serde_json::json;

use super::*;

fn tenant(source: &str, secret: Option<&str>) -> TenantSettings {
    kd_tenants::test_settings(json!({"sourceId": source, "secretId": secret,
        "roleAddress": "arn:aws:iam::111111111111:role/kinesis"}))
}

/// A cache whose STS is the fake, signing as a worker with static credentials.
pub(crate) fn cache(fake: &FakeAws, settings: CredentialSettings) -> CredentialCache {
    let base = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(fake.endpoint())
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "AKIDWORKER",
            "worker-secret",
            None,
            None,
            "test",
        )))
        .retry_config(RetryConfig::disabled())
        .build();
    CredentialCache::new(base, settings)
}

fn calls(fake: &FakeAws) -> usize {
    fake.assume_role_calls().len()
}

#[tokio::test]
async fn concurrent_lookups_of_one_tenant_share_one_assume_role() {
    let fake = FakeAws::start().await;
    let cache = cache(&fake, CredentialSettings::default());
    let t = tenant("src_a", None);
    let lookups = (0..20).map(|_| cache.session(&t));
    for s in futures::future::join_all(lookups).await {
        s.unwrap();
    }
    assert_eq!(calls(&fake), 1);
    cache.session(&t).await.unwrap();
    assert_eq!(calls(&fake), 1, "served from the cache");
    // Another external ID on the same role is another session.
    cache
        .session(&tenant("src_a", Some("s3cret")))
        .await
        .unwrap();
    assert_eq!(calls(&fake), 2);
}

#[tokio::test]
async fn a_refused_assume_role_is_remembered_for_the_failure_ttl_only() {
    let fake = FakeAws::start().await;
    fake.set_trust_policy(
        "arn:aws:iam::111111111111:role/kinesis",
        json!({"Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
            "Principal": {"AWS": "arn:aws:iam::999999999999:root"},
            "Condition": {"StringEquals": {"sts:ExternalId": "someone-else"}}}]}),
    );
    let settings = CredentialSettings {
        failure_ttl: Duration::from_secs(2),
        ..CredentialSettings::default()
    };
    let cache = cache(&fake, settings);
    let t = tenant("src_a", None);
    let first = cache.session(&t).await.unwrap_err();
    assert_eq!(first.class, crate::ErrorClass::Permanent, "{first}");
    let again = cache.session(&t).await.unwrap_err();
    assert_eq!(again.code, first.code);
    assert_eq!(calls(&fake), 1, "the failure was remembered");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    cache.session(&t).await.unwrap_err();
    assert_eq!(calls(&fake), 2, "and asked again after failure_ttl");
}

#[tokio::test]
async fn invalidate_makes_the_next_lookup_assume_the_role_again() {
    let fake = FakeAws::start().await;
    let cache = cache(&fake, CredentialSettings::default());
    let t = tenant("src_a", None);
    let first = cache.session(&t).await.unwrap();
    cache.invalidate(&t, &first).await;
    let second = cache.session(&t).await.unwrap();
    assert_eq!(calls(&fake), 2);
    // A write sent with the first session's credentials, refused after the second
    // came: the second stays.
    cache.invalidate(&t, &first).await;
    let again = cache.session(&t).await.unwrap();
    assert!(Arc::ptr_eq(&again, &second));
    assert_eq!(calls(&fake), 2, "not assumed again for a stale refusal");
}

#[tokio::test]
async fn sessions_are_replaced_before_their_credentials_expire() {
    let fake = FakeAws::start().await;
    // Credentials that live 6 s (5 to 6 s as STS's expiry is in whole seconds),
    // replaced 1 s (the margin) and up to half a margin more before they expire: from
    // 3.5 to 5 s after they were assumed.
    fake.set_credential_lifetime(Duration::from_secs(6));
    let settings = CredentialSettings {
        refresh_margin: Duration::from_secs(1),
        ..CredentialSettings::default()
    };
    let cache = cache(&fake, settings);
    let t = tenant("src_a", None);
    cache.session(&t).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cache.session(&t).await.unwrap();
    assert_eq!(calls(&fake), 1, "still fresh");
    tokio::time::sleep(Duration::from_millis(4700)).await;
    cache.session(&t).await.unwrap();
    assert_eq!(calls(&fake), 2, "replaced ahead of expiry");
}

#[tokio::test]
async fn resource_policy_tenants_get_tagged_sessions_of_the_writer_role_but_never_our_own_streams()
{
    let fake = FakeAws::start().await;
    let writer = "arn:aws:iam::222222222222:role/kinesis-destination-writer";
    let settings = CredentialSettings {
        resource_policy_role: Some(RoleArn::parse(writer).unwrap()),
        ..CredentialSettings::default()
    };
    let cache = cache(&fake, settings);
    let by_policy = |source: &str, account: &str| {
        kd_tenants::parse_tenant(&json!({"sourceId": source,
            "streamArn": format!("arn:aws:kinesis:us-east-1:{account}:stream/s")}))
        .unwrap()
    };

    // Two tenants of one shared stream: a session each, both of the writer role.
    cache
        .session(&by_policy("src_a", "111111111111"))
        .await
        .unwrap();
    cache
        .session(&by_policy("src_b", "111111111111"))
        .await
        .unwrap();
    let assumed = fake.assume_role_calls();
    assert_eq!(assumed.len(), 2, "one tagged session per source ID");
    assert!(assumed.iter().all(|c| c.role_arn == writer), "{assumed:?}");

    // A stream in the writer role's own account: refused before STS is asked.
    let own = cache
        .session(&by_policy("src_c", "222222222222"))
        .await
        .unwrap_err();
    assert_eq!(own.code, "OwnAccountStreamRefused");
    assert_eq!(own.class, crate::ErrorClass::Permanent, "{own}");

    // A tenant that names the writer role as its own role: refused too.
    let mut v = json!({"sourceId": "src_d", "region": "us-east-1", "stream": "s",
        "roleAddress": writer});
    v["secretId"] = json!("guess");
    let borrowed = cache
        .session(&kd_tenants::parse_tenant(&v).unwrap())
        .await
        .unwrap_err();
    assert_eq!(borrowed.code, "WriterRoleRefused");
    assert!(!borrowed.to_string().contains("guess"), "{borrowed}");
    assert_eq!(fake.assume_role_calls().len(), 2, "neither reached STS");
}
