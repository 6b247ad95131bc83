//! Free space of the Maglev pool and of the id spaces, with a quarantine: space a switched-away
//! service entry referenced is reused only from the next apply on, when no packet can still be
//! reading it (a program run lasts microseconds; applies are a system call round trip apart).

use std::collections::{BTreeMap, BTreeSet};

/// First-fit allocator of ranges in `0..capacity`, merging neighbours when freed.
#[derive(Debug)]
pub struct RangePool {
    capacity: u32,
    /// Free ranges: start -> length.
    free: BTreeMap<u32, u32>,
    /// Freed in this apply, free from the next one.
    quarantine: Vec<(u32, u32)>,
    used: u64,
}

impl RangePool {
    /// An empty pool of `capacity` entries.
    pub fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self {
            capacity,
            free,
            quarantine: Vec::new(),
            used: 0,
        }
    }

    /// Entries in the pool.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Entries in use (including quarantined ones).
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Entries free now or after the quarantine ends.
    pub fn available(&self) -> u64 {
        u64::from(self.capacity) - self.used
            + self
                .quarantine
                .iter()
                .map(|(_, l)| u64::from(*l))
                .sum::<u64>()
    }

    /// Takes `len` entries; `None` when no free range is long enough.
    pub fn allocate(&mut self, len: u32) -> Option<u32> {
        if len == 0 {
            return Some(0);
        }
        let (&start, &free_len) = self.free.iter().find(|(_, l)| **l >= len)?;
        self.free.remove(&start);
        if free_len > len {
            self.free.insert(start + len, free_len - len);
        }
        self.used += u64::from(len);
        Some(start)
    }

    /// Marks `start..start+len` as used (recovering a pool written by an earlier meshd).
    /// False when any part of it is not free (overlapping or out of range).
    pub fn reserve(&mut self, start: u32, len: u32) -> bool {
        if len == 0 {
            return true;
        }
        let Some(end) = start.checked_add(len).filter(|e| *e <= self.capacity) else {
            return false;
        };
        let Some((&free_start, &free_len)) = self.free.range(..=start).next_back() else {
            return false;
        };
        if free_start + free_len < end {
            return false;
        }
        self.free.remove(&free_start);
        if free_start < start {
            self.free.insert(free_start, start - free_start);
        }
        if end < free_start + free_len {
            self.free.insert(end, free_start + free_len - end);
        }
        self.used += u64::from(len);
        true
    }

    /// Frees `start..start+len` from the next [`RangePool::end_quarantine`] on.
    pub fn release_later(&mut self, start: u32, len: u32) {
        if len > 0 {
            self.quarantine.push((start, len));
        }
    }

    /// Makes everything released so far reusable.
    pub fn end_quarantine(&mut self) {
        for (start, len) in std::mem::take(&mut self.quarantine) {
            self.used -= u64::from(len);
            let mut start = start;
            let mut len = len;
            if let Some((&prev, &prev_len)) = self.free.range(..start).next_back() {
                if prev + prev_len == start {
                    self.free.remove(&prev);
                    start = prev;
                    len += prev_len;
                }
            }
            if let Some(&next_len) = self.free.get(&(start + len)) {
                self.free.remove(&(start + len));
                len += next_len;
            }
            self.free.insert(start, len);
        }
    }
}

/// Ids `0..capacity`, lowest free first (keeps the counter arrays dense), with the same
/// quarantine as [`RangePool`].
#[derive(Debug)]
pub struct IdPool {
    capacity: u32,
    used: BTreeSet<u32>,
    quarantine: Vec<u32>,
    /// Every id below this is in `used`.
    dense_below: u32,
}

impl IdPool {
    /// No id in use.
    pub fn new(capacity: u32) -> Self {
        Self {
            capacity,
            used: BTreeSet::new(),
            quarantine: Vec::new(),
            dense_below: 0,
        }
    }

    /// Ids in use (including quarantined ones).
    pub fn used(&self) -> usize {
        self.used.len()
    }

    /// Ids that can still be allocated (now or after the quarantine).
    pub fn available(&self) -> usize {
        self.capacity as usize - self.used.len() + self.quarantine.len()
    }

    /// The lowest free id.
    pub fn allocate(&mut self) -> Option<u32> {
        let mut candidate = self.dense_below;
        for id in self.used.range(self.dense_below..) {
            if *id != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate >= self.capacity {
            return None;
        }
        self.used.insert(candidate);
        self.dense_below = candidate + 1;
        Some(candidate)
    }

    /// Marks `id` as used; false when it already is or is out of range.
    pub fn reserve(&mut self, id: u32) -> bool {
        id < self.capacity && self.used.insert(id)
    }

    /// Frees `id` from the next [`IdPool::end_quarantine`] on.
    pub fn release_later(&mut self, id: u32) {
        self.quarantine.push(id);
    }

    /// Makes everything released so far reusable.
    pub fn end_quarantine(&mut self) {
        for id in std::mem::take(&mut self.quarantine) {
            self.used.remove(&id);
            self.dense_below = self.dense_below.min(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_reused_only_after_the_quarantine_and_merge() {
        let mut pool = RangePool::new(100);
        let a = pool.allocate(40).unwrap();
        let b = pool.allocate(40).unwrap();
        assert_eq!((a, b), (0, 40));
        assert_eq!(pool.allocate(30), None);
        pool.release_later(a, 40);
        assert_eq!(
            pool.allocate(30),
            None,
            "quarantined space is not reused at once"
        );
        assert_eq!(pool.available(), 60);
        pool.end_quarantine();
        assert_eq!(pool.allocate(30), Some(0));
        pool.release_later(0, 30);
        pool.release_later(b, 40);
        pool.end_quarantine();
        assert_eq!(
            pool.allocate(100),
            Some(0),
            "all ranges merged back into one"
        );
        assert_eq!(pool.used(), 100);
    }

    #[test]
    fn reserve_refuses_overlaps() {
        let mut pool = RangePool::new(100);
        assert!(pool.reserve(10, 10));
        assert!(!pool.reserve(15, 10));
        assert!(!pool.reserve(95, 10));
        assert!(pool.reserve(20, 5));
        assert_eq!(pool.allocate(10), Some(0));
        assert_eq!(pool.allocate(10), Some(25));
    }

    #[test]
    fn ids_take_the_lowest_free_one_after_the_quarantine() {
        let mut ids = IdPool::new(3);
        assert_eq!(ids.allocate(), Some(0));
        assert_eq!(ids.allocate(), Some(1));
        ids.release_later(0);
        assert_eq!(ids.allocate(), Some(2));
        assert_eq!(ids.allocate(), None);
        ids.end_quarantine();
        assert_eq!(ids.allocate(), Some(0));
        assert!(!ids.reserve(5) && !ids.reserve(1));
    }
}
