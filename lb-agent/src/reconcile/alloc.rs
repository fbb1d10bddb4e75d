//! Allocators for frontend ids, backend ids and Maglev table regions.

use std::collections::{BTreeMap, HashSet, VecDeque};

/// Ids from 1 to `capacity - 1`. Fresh ids are handed out before freed ones are reused, and freed
/// ones are reused oldest first, so an id rarely comes back while flows may still name it.
#[derive(Debug)]
pub struct IdAllocator {
    capacity: u32,
    next: u32,
    free: VecDeque<u32>,
    used: HashSet<u32>,
}

impl IdAllocator {
    pub fn new(capacity: u32) -> Self {
        Self { capacity, next: 1, free: VecDeque::new(), used: HashSet::new() }
    }

    /// Marks `id` as taken (restoring state from pinned maps).
    pub fn reserve(&mut self, id: u32) -> bool {
        if id == 0 || id >= self.capacity || !self.used.insert(id) {
            return false;
        }
        while self.next <= id {
            if self.next != id && !self.used.contains(&self.next) {
                self.free.push_back(self.next);
            }
            self.next += 1;
        }
        self.free.retain(|f| *f != id);
        true
    }

    pub fn alloc(&mut self) -> Option<u32> {
        let id = if self.next < self.capacity {
            self.next += 1;
            self.next - 1
        } else {
            self.free.pop_front()?
        };
        self.used.insert(id);
        Some(id)
    }

    pub fn release(&mut self, id: u32) {
        if self.used.remove(&id) {
            self.free.push_back(id);
        }
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

/// A region of the Maglev slot array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u32,
    pub size: u32,
}

/// How long a region that held a published table stays out of use once freed. A packet reads a
/// frontend's entry, then a slot of its table, within one run of a program (microseconds, under
/// RCU); a CPU that read the entry just before it was moved may still read the old table's slots.
/// Were the region reused at once, it could read a slot of another Service's new table and send
/// the flow to a backend outside its Service.
pub const REGION_GRACE_MS: u64 = 1_000;

/// First-fit allocator over `0..capacity` slots, coalescing freed neighbours. Regions that held a
/// published table are freed only [`REGION_GRACE_MS`] after their release (times in milliseconds
/// of a monotonic clock, given by the caller, so that tests can inject one).
#[derive(Debug)]
pub struct RegionAllocator {
    /// Free extents: offset → size.
    free: BTreeMap<u32, u32>,
    /// Released regions that may still be read, each with the time it becomes free.
    cooling: VecDeque<(Region, u64)>,
    capacity: u32,
}

impl RegionAllocator {
    pub fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self { free, cooling: VecDeque::new(), capacity }
    }

    /// A free region of `size` slots at time `now`, first fit; regions released at least
    /// [`REGION_GRACE_MS`] ago count as free.
    pub fn alloc(&mut self, size: u32, now: u64) -> Option<Region> {
        while self.cooling.front().is_some_and(|(_, at)| *at <= now) {
            let (r, _) = self.cooling.pop_front().expect("checked");
            self.free_now(r);
        }
        let (&offset, &len) = self.free.iter().find(|(_, len)| **len >= size)?;
        self.free.remove(&offset);
        if len > size {
            self.free.insert(offset + size, len - size);
        }
        Some(Region { offset, size })
    }

    /// Marks a region as used (restoring state). False if it is not wholly free.
    pub fn reserve(&mut self, r: Region) -> bool {
        let Some((&offset, &len)) = self.free.range(..=r.offset).next_back() else {
            return false;
        };
        if r.offset.checked_add(r.size).is_none_or(|end| end > offset + len) {
            return false;
        }
        self.free.remove(&offset);
        if r.offset > offset {
            self.free.insert(offset, r.offset - offset);
        }
        let end = r.offset + r.size;
        if end < offset + len {
            self.free.insert(end, offset + len - end);
        }
        true
    }

    /// Releases a region that held a published table, at time `now`: it is free from
    /// `now + REGION_GRACE_MS` on.
    pub fn release(&mut self, r: Region, now: u64) {
        self.cooling.push_back((r, now.saturating_add(REGION_GRACE_MS)));
    }

    /// Releases a region no packet can have read (its table was never published): free at once.
    pub fn release_unread(&mut self, r: Region) {
        self.free_now(r);
    }

    fn free_now(&mut self, r: Region) {
        let mut offset = r.offset;
        let mut size = r.size;
        if let Some((&prev, &prev_len)) = self.free.range(..offset).next_back() {
            if prev + prev_len == offset {
                self.free.remove(&prev);
                offset = prev;
                size += prev_len;
            }
        }
        if let Some(&next_len) = self.free.get(&(offset + size)) {
            self.free.remove(&(offset + size));
            size += next_len;
        }
        self.free.insert(offset, size);
    }

    /// All slots.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// When the earliest released region is free again, if one is cooling.
    pub fn next_free_at(&self) -> Option<u64> {
        self.cooling.front().map(|(_, at)| *at)
    }

    /// Slots released but not yet free again.
    pub fn cooling(&self) -> u32 {
        self.cooling.iter().map(|(r, _)| r.size).sum()
    }

    /// Slots not free (regions in use, and released ones still in their grace period).
    pub fn used(&self) -> u32 {
        self.capacity - self.free.values().sum::<u32>()
    }

    /// Slots in use at time `now`: released regions whose grace has passed count as free.
    pub fn used_at(&self, now: u64) -> u32 {
        let cooled: u32 = self.cooling.iter().filter(|(_, at)| *at <= now).map(|(r, _)| r.size).sum();
        self.used() - cooled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fresh_first_then_reused_oldest_first() {
        let mut a = IdAllocator::new(4);
        assert_eq!((a.alloc(), a.alloc(), a.alloc()), (Some(1), Some(2), Some(3)));
        assert_eq!(a.alloc(), None);
        a.release(2);
        a.release(1);
        assert_eq!((a.alloc(), a.alloc(), a.alloc()), (Some(2), Some(1), None));
    }

    #[test]
    fn reserved_ids_are_skipped() {
        let mut a = IdAllocator::new(10);
        assert!(a.reserve(3));
        assert!(!a.reserve(3));
        assert!(!a.reserve(0));
        let got: Vec<u32> = std::iter::from_fn(|| a.alloc()).collect();
        assert_eq!(got, vec![4, 5, 6, 7, 8, 9, 1, 2]);
    }

    #[test]
    fn regions_coalesce_and_reuse() {
        let mut r = RegionAllocator::new(100);
        let a = r.alloc(30, 0).expect("a");
        let b = r.alloc(30, 0).expect("b");
        let c = r.alloc(40, 0).expect("c");
        assert!(r.alloc(1, 0).is_none());
        r.release_unread(a);
        r.release_unread(b);
        assert_eq!(r.alloc(60, 0), Some(Region { offset: 0, size: 60 }));
        r.release_unread(c);
        assert_eq!(r.used(), 60);
        assert!(r.reserve(Region { offset: 70, size: 10 }));
        assert!(!r.reserve(Region { offset: 65, size: 10 }));
        assert_eq!(r.alloc(10, 0), Some(Region { offset: 60, size: 10 }));
    }

    /// A region freed at t is not handed out before t + grace, whatever is asked for meanwhile;
    /// from then on it is (and coalesces with its free neighbours). Never-published regions are
    /// free at once.
    #[test]
    fn a_published_region_is_not_reused_before_the_grace_period() {
        let mut r = RegionAllocator::new(100);
        let a = r.alloc(50, 0).expect("a");
        let b = r.alloc(50, 0).expect("b");
        let t = 5_000;
        r.release(a, t);
        assert_eq!(r.used(), 100, "a cooling region is not free");
        assert_eq!(r.cooling(), 50);
        for now in [t, t + 1, t + REGION_GRACE_MS / 2, t + REGION_GRACE_MS - 1] {
            assert_eq!(r.alloc(1, now), None, "handed out at {now}, before {t} + grace");
        }
        assert_eq!(r.alloc(50, t + REGION_GRACE_MS), Some(a), "free once the grace has passed");
        // Released in order, freed in order; each after its own grace.
        r.release(a, 10_000);
        r.release(b, 10_400);
        assert_eq!(r.alloc(50, 10_000 + REGION_GRACE_MS), Some(a));
        assert_eq!(r.alloc(50, 10_399 + REGION_GRACE_MS), None);
        r.release(a, 12_000);
        assert_eq!(
            r.alloc(100, 12_000 + REGION_GRACE_MS),
            Some(Region { offset: 0, size: 100 }),
            "coalesced"
        );
        // Never published: at once.
        let whole = Region { offset: 0, size: 100 };
        r.release_unread(whole);
        assert_eq!(r.alloc(100, 0), Some(whole));
    }
}
