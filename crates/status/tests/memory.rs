//! What the book holds per tenant, counted by the allocator: at most 256 bytes for a
//! tenant without traffic in the open window (the key is shared with its settings), and
//! a bounded amount for one with traffic.

use std::sync::Arc;
use std::time::Duration;

use kd_status::StatusBook;
use kd_testkit::live_bytes;

#[global_allocator]
static ALLOCATOR: kd_testkit::CountingAllocator = kd_testkit::CountingAllocator;

#[test]
fn an_idle_tenant_costs_at_most_256_bytes_and_an_active_one_a_bounded_amount() {
    const TENANTS: usize = 100_000;
    // The tenants' source IDs, as their settings hold them.
    let ids: Vec<Arc<str>> = (0..TENANTS)
        .map(|n| Arc::from(format!("src_{n:08}")))
        .collect();
    let book = StatusBook::new("pod".into(), Duration::from_secs(60));
    let before = live_bytes();
    for id in &ids {
        book.received(id);
        book.delivered(id, Some(Duration::from_millis(30)));
    }
    let active = (live_bytes() - before) as usize / TENANTS;
    let records = book.close(0, 60);
    assert_eq!(records.len(), TENANTS);
    drop(records);
    let idle = (live_bytes() - before) as usize / TENANTS;
    eprintln!("per tenant: {active} bytes with traffic, {idle} bytes idle");
    assert!(idle <= 256, "{idle} bytes per idle tenant");
    assert!(active <= 1024, "{active} bytes per active tenant");
    assert_eq!(book.len(), TENANTS, "idle tenants are kept for an hour");
}
