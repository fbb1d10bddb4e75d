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

/// First-fit allocator over `0..capacity` slots, coalescing freed neighbours.
#[derive(Debug)]
pub struct RegionAllocator {
    /// Free extents: offset → size.
    free: BTreeMap<u32, u32>,
    capacity: u32,
}

impl RegionAllocator {
    pub fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self { free, capacity }
    }

    pub fn alloc(&mut self, size: u32) -> Option<Region> {
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

    pub fn release(&mut self, r: Region) {
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

    pub fn used(&self) -> u32 {
        self.capacity - self.free.values().sum::<u32>()
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
        let a = r.alloc(30).expect("a");
        let b = r.alloc(30).expect("b");
        let c = r.alloc(40).expect("c");
        assert!(r.alloc(1).is_none());
        r.release(a);
        r.release(b);
        assert_eq!(r.alloc(60), Some(Region { offset: 0, size: 60 }));
        r.release(c);
        assert_eq!(r.used(), 60);
        assert!(r.reserve(Region { offset: 70, size: 10 }));
        assert!(!r.reserve(Region { offset: 65, size: 10 }));
        assert_eq!(r.alloc(10), Some(Region { offset: 60, size: 10 }));
    }
}
