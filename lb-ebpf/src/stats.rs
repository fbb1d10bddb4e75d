//! Counting: global per-CPU counters and per-frontend statistics.

use lb_common::Lb4SvcStats;

use crate::maps::{LB4_SVC_STATS, LB_COUNTERS};

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = LB_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU value, only this CPU writes it while this program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn svc_update(svc_id: u32, f: impl FnOnce(&mut Lb4SvcStats)) {
    if let Some(s) = LB4_SVC_STATS.get_ptr_mut(svc_id) {
        // SAFETY: per-CPU value, as above.
        f(unsafe { &mut *s });
    }
}
