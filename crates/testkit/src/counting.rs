//! An allocator that counts the heap bytes live (allocated and not freed), for tests and
//! benches that state what a structure holds: declare it as the binary's global
//! allocator, then compare [`live_bytes`] before and after.
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: kd_testkit::CountingAllocator = kd_testkit::CountingAllocator;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

static LIVE: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, counting the sizes it hands out and takes back.
pub struct CountingAllocator;

// SAFETY: every call goes to the system allocator unchanged; only the sizes are counted.
unsafe impl GlobalAlloc for CountingAllocator {
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

/// Heap bytes live now, as counted by [`CountingAllocator`] (0 where it is not the
/// global allocator).
pub fn live_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}
