//! What the book holds per tenant, counted by the allocator: at most 256 bytes for a
//! tenant without traffic in the open window (the key is shared with its settings), and
//! a bounded amount for one with traffic.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kd_status::StatusBook;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; only the sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn an_idle_tenant_costs_at_most_256_bytes_and_an_active_one_a_bounded_amount() {
    const TENANTS: usize = 100_000;
    // The tenants' source IDs, as their settings hold them.
    let ids: Vec<Arc<str>> = (0..TENANTS)
        .map(|n| Arc::from(format!("src_{n:08}")))
        .collect();
    let book = StatusBook::new("pod".into(), Duration::from_secs(60));
    let before = LIVE.load(Ordering::Relaxed);
    for id in &ids {
        book.received(id);
        book.delivered(id, Some(Duration::from_millis(30)));
    }
    let active = (LIVE.load(Ordering::Relaxed) - before) as usize / TENANTS;
    let records = book.close(0, 60);
    assert_eq!(records.len(), TENANTS);
    drop(records);
    let idle = (LIVE.load(Ordering::Relaxed) - before) as usize / TENANTS;
    eprintln!("per tenant: {active} bytes with traffic, {idle} bytes idle");
    assert!(idle <= 256, "{idle} bytes per idle tenant");
    assert!(active <= 1024, "{active} bytes per active tenant");
    assert_eq!(book.len(), TENANTS, "idle tenants are kept for an hour");
}
