//! Listing shards and describing streams against the AWS fake: a refusal is the role's
//! that asked, so it is remembered for a while, not for good, and a failed listing
//! waits before it is tried again.

use std::time::Duration;

use kd_testkit::FakeAws;
use serde_json::json;

use super::*;
use crate::api::KinesisApi;
use crate::credentials::cache_tests::cache;
use crate::credentials::{CredentialCache, CredentialSettings};

fn tenant(source: &str, role: &str) -> TenantSettings {
    kd_tenants::test_settings(json!({"sourceId": source,
        "roleAddress": format!("arn:aws:iam::111111111111:role/{role}")}))
}

/// Writes one record for `t`, bringing its session so the stream is listed when due,
/// and waits until a listing started by it (if any) has ended.
async fn write(limits: &RateLimits, api: &KinesisApi, cache: &CredentialCache, t: &TenantSettings) {
    let session = cache.session(t).await.unwrap();
    limits.stream(t).refresh_if_due(limits, t, (api, &session));
    limits.acquire(t, "user-1", 100).await;
    listing_ended(limits, t).await;
}

#[tokio::test]
async fn a_refused_listing_is_the_askers_and_is_asked_again_after_a_while() {
    let fake = FakeAws::start().await;
    fake.create_stream("s", 4);
    fake.set_stream_shape("s", false, 4096);
    let intruder_role = "arn:aws:iam::111111111111:role/only-writes";
    for op in ["ListShards", "DescribeStreamSummary"] {
        fake.deny_role_operation(intruder_role, op, true);
    }
    let cache = cache(&fake, CredentialSettings::default());
    let api = KinesisApi::new(cache.base(), cache.clock().clone(), None).unwrap();
    let limits = RateLimits::new(1.0).with_retry_periods(RetryPeriods {
        denied: Duration::from_secs(1),
        failed: Duration::from_secs(1),
    });
    let (intruder, owner) = (tenant("src_a", "only-writes"), tenant("src_b", "owner"));

    write(&limits, &api, &cache, &intruder).await;
    assert_eq!(fake.requests("ListShards"), 1);
    assert_eq!(fake.requests("DescribeStreamSummary"), 1);
    assert_eq!(
        limits.open_shards(&owner),
        None,
        "refused: stream-wide budget"
    );
    let stream = limits.stream(&owner);
    assert_eq!(
        stream.max_record_bytes(&owner),
        (1024 * 1024, false),
        "refused: Kinesis' default, not waiting for a summary"
    );

    // The refusal holds for a while, whoever writes next ...
    write(&limits, &api, &cache, &owner).await;
    assert_eq!(fake.requests("ListShards"), 1, "not asked again at once");

    // ... and not for good: the owner's role lists and describes the stream.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    write(&limits, &api, &cache, &owner).await;
    assert_eq!(fake.requests("ListShards"), 2);
    assert_eq!(limits.open_shards(&owner), Some(4));
    assert_eq!(stream.max_record_bytes(&owner), (4096 * 1024, false));
}

/// Waits until a listing of `t`'s stream (if one runs) has ended.
async fn listing_ended(limits: &RateLimits, t: &TenantSettings) {
    let limiter = limits.limiter(t);
    tokio::time::timeout(Duration::from_secs(5), async {
        while limiter.listing.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the listing ended");
}

#[tokio::test]
async fn a_listing_takes_a_request_place_of_the_asking_tenant() {
    let fake = FakeAws::start().await;
    fake.create_stream("s", 4);
    let cache = cache(&fake, CredentialSettings::default());
    let api = KinesisApi::new(cache.base(), cache.clock().clone(), None).unwrap();
    let requests = Arc::new(crate::requests::RequestBudget::new(2, 0.5, 1.0));
    let limits = RateLimits::new(1.0).with_request_budget(requests.clone());
    let t = tenant("src_a", "owner");
    let session = cache.session(&t).await.unwrap();
    // The tenant's one place is taken by a write on the wire.
    let write = requests.acquire(&t).await;
    limits
        .stream(&t)
        .refresh_if_due(&limits, &t, (&api, &session));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        fake.requests("ListShards"),
        0,
        "waits for the tenant's place"
    );
    drop(write);
    listing_ended(&limits, &t).await;
    assert_eq!(fake.requests("ListShards"), 1);
    assert_eq!(limits.open_shards(&t), Some(4));
}

#[tokio::test]
async fn a_tenant_on_trial_refused_a_listing_holds_back_only_itself() {
    let fake = FakeAws::start().await;
    fake.create_stream("s", 4);
    fake.set_stream_shape("s", false, 4096);
    let intruder_role = "arn:aws:iam::111111111111:role/only-writes";
    for op in ["ListShards", "DescribeStreamSummary"] {
        fake.deny_role_operation(intruder_role, op, true);
    }
    let cache = cache(&fake, CredentialSettings::default());
    let api = KinesisApi::new(cache.base(), cache.clock().clone(), None).unwrap();
    let limits = RateLimits::new(1.0);
    let (intruder, owner) = (tenant("src_a", "only-writes"), tenant("src_b", "owner"));

    let session = cache.session(&intruder).await.unwrap();
    let stream = limits.stream(&intruder);
    stream.refresh_for_trial_if_due(&limits, &intruder, (&api, &session));
    listing_ended(&limits, &intruder).await;
    assert_eq!(fake.requests("ListShards"), 1);
    // Asked again at once: not, for the tenant refused ...
    stream.refresh_for_trial_if_due(&limits, &intruder, (&api, &session));
    listing_ended(&limits, &intruder).await;
    assert_eq!(fake.requests("ListShards"), 1, "the refused tenant waits");
    assert_eq!(
        stream.max_record_bytes(&owner),
        (1024 * 1024, true),
        "nothing is known of the stream: the default, and only that"
    );
    // ... but the owner's first write lists and describes the stream.
    write(&limits, &api, &cache, &owner).await;
    assert_eq!(fake.requests("ListShards"), 2);
    assert_eq!(limits.open_shards(&owner), Some(4));
    assert_eq!(stream.max_record_bytes(&owner), (4096 * 1024, false));

    // What AWS does tell a tenant on trial is kept: the stream's summary, for the
    // size of its first records.
    let limits = RateLimits::new(1.0);
    let newcomer = tenant("src_c", "owner");
    let session = cache.session(&newcomer).await.unwrap();
    let stream = limits.stream(&newcomer);
    stream.refresh_for_trial_if_due(&limits, &newcomer, (&api, &session));
    listing_ended(&limits, &newcomer).await;
    assert_eq!(stream.max_record_bytes(&owner), (4096 * 1024, false));
    assert_eq!(limits.open_shards(&owner), Some(4));
}

#[tokio::test]
async fn a_failed_listing_waits_before_it_is_tried_again() {
    let fake = FakeAws::start().await;
    let cache = cache(&fake, CredentialSettings::default());
    let api = KinesisApi::new(cache.base(), cache.clock().clone(), None).unwrap();
    let limits = RateLimits::new(1.0).with_retry_periods(RetryPeriods {
        denied: Duration::from_secs(600),
        failed: Duration::from_secs(1),
    });
    let t = tenant("src_a", "owner");

    // The stream does not exist yet (a tenant still creating it): not found.
    for _ in 0..5 {
        write(&limits, &api, &cache, &t).await;
    }
    assert_eq!(
        fake.requests("ListShards"),
        1,
        "one listing, not one per write"
    );
    assert_eq!(limits.open_shards(&t), None);

    fake.create_stream("s", 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    write(&limits, &api, &cache, &t).await;
    assert_eq!(fake.requests("ListShards"), 2);
    assert_eq!(limits.open_shards(&t), Some(2));
}

#[tokio::test]
async fn a_one_shard_stream_keeps_one_budget_for_the_stream_and_its_shard() {
    let fake = FakeAws::start().await;
    fake.create_stream("s", 1);
    fake.create_stream("s4", 4);
    let cache = cache(&fake, CredentialSettings::default());
    let api = KinesisApi::new(cache.base(), cache.clock().clone(), None).unwrap();
    let limits = RateLimits::new(1.0);
    let one = tenant("src_1", "owner");
    let mut four = tenant("src_4", "owner");
    four.stream = kd_tenants::StreamName::parse("s4").unwrap();
    for t in [&one, &four] {
        write(&limits, &api, &cache, t).await;
    }
    let shared = |t: &TenantSettings| {
        let StreamLimits(limiter) = limits.stream(t);
        let whole = limiter.stream.load_full();
        match &**limiter.shards.load() {
            ShardMap::Known { shards, .. } => shards.iter().any(|s| Arc::ptr_eq(&s.bucket, &whole)),
            _ => panic!("shards listed"),
        }
    };
    assert!(shared(&one), "one shard: the same budget, kept once");
    assert!(
        !shared(&four),
        "four shards: each its own, and the stream's"
    );
}
