//! Counting and rate limiting, shared by every program.

use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, maps::PerCpuArray};
use gateway_common::EVENTS_PER_SECOND;

/// The monotonic clock in nanoseconds.
pub fn now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Whether this CPU may send one more event this second (and counts it).
pub fn within_budget(budget: &PerCpuArray<[u64; 2]>) -> bool {
    let Some(budget) = budget.get_ptr_mut(0) else {
        return false;
    };
    let second = now_ns() / 1_000_000_000;
    // SAFETY: this CPU's slot, valid for the program's run, no concurrent writer.
    let budget = unsafe { &mut *budget };
    if budget[0] != second {
        budget[0] = second;
        budget[1] = 0;
    }
    if budget[1] >= EVENTS_PER_SECOND {
        return false;
    }
    budget[1] += 1;
    true
}

pub fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: the pointer comes from the map lookup for this CPU's slot and
        // stays valid for the program's run; per-CPU slots have no concurrent writer.
        unsafe { *slot += 1 };
    }
}
