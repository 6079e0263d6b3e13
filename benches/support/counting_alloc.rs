//! A global allocator that counts live heap bytes, so benches measure memory instead of
//! estimating it. Included by the benches that report bytes per stored object.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

pub(crate) struct Counting;

pub(crate) static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The highest `LIVE` has been since the last [`reset_peak`].
pub(crate) static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Every byte ever allocated (a realloc counts its new size), for benches that report churn.
#[allow(dead_code)]
pub(crate) static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

/// Starts a new peak measurement from the bytes live now.
#[allow(dead_code)]
pub(crate) fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

fn grew(by: usize) {
    ALLOCATED.fetch_add(by, Ordering::Relaxed);
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// Bench-only: a counting allocator has to implement the unsafe GlobalAlloc trait.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;
