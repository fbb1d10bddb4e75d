//! The Maglev slot array: tables written through a short-lived memory mapping of just their
//! pages, read with batched lookups.
//!
//! The kernel maps every page of a BPF array at `mmap` time (`remap_vmalloc_range`), so a mapping
//! of the whole array stays resident in the process: with the default 16,777,216 slots, 64 MiB of
//! the agent's RSS that is the map's kernel memory counted a second time. A window over the pages
//! one table covers is mapped for each write and unmapped after it.

use aya::maps::{MapData, MapError};
use lb_common::MAP_LB4_MAGLEV;

use super::{maps::map_err, DatapathError};

/// Slots read per batched lookup (two a map element).
const READ_CHUNK: u32 = 1 << 16;

/// The Maglev slot array. The datapath reads a region only after its frontend entry points at
/// it, which is written afterwards through a syscall (a full barrier), so a packet never sees a
/// half-written table.
pub struct MaglevSlots {
    /// The map: a writable descriptor for the agent, a read-only one for readers (`lbctl`), which
    /// read through lookups (the kernel refuses to share-map a read-only descriptor).
    pub(super) data: MapData,
    len: u32,
    writable: bool,
}

impl MaglevSlots {
    pub(super) fn map(data: MapData, writable: bool) -> Result<Self, DatapathError> {
        // Two u32 slots per element (see the map's declaration).
        let len = data.info().map_err(map_err(MAP_LB4_MAGLEV))?.max_entries() * 2;
        Ok(Self { data, len, writable })
    }

    /// Slots in the array.
    pub fn slots(&self) -> u32 {
        self.len
    }

    /// Copies slots `0..end` of `other` into this one: a layout's tables carried into another's
    /// (see `migrate`), before any frontend points at them.
    pub(super) fn copy_from(&mut self, other: &MaglevSlots, end: u32) -> Result<(), MapError> {
        if end > other.len {
            return Err(MapError::OutOfBounds { index: end, max_entries: other.len });
        }
        let mut at = 0;
        while at < end {
            let n = (end - at).min(READ_CHUNK);
            let chunk = other.read(at, n)?;
            self.write(at, &chunk)?;
            at += n;
        }
        Ok(())
    }

    /// The backend id in `slot` (`None` past the end, or when the lookup fails): one system
    /// call; [`MaglevSlots::read`] reads a table in a few.
    pub fn get(&self, slot: u32) -> Option<u32> {
        self.read(slot, 1).ok()?.first().copied()
    }

    /// Slots `start..start + count`, read with batched lookups (`BPF_MAP_LOOKUP_BATCH`).
    pub fn read(&self, start: u32, count: u32) -> Result<Vec<u32>, MapError> {
        let end = start.checked_add(count).filter(|e| *e <= self.len);
        let Some(end) = end else {
            return Err(MapError::OutOfBounds { index: start.saturating_add(count), max_entries: self.len });
        };
        if count == 0 {
            return Ok(Vec::new());
        }
        let (first, last) = (start / 2, (end - 1) / 2);
        let want = (last - first + 1) as usize;
        let mut elems: Vec<(u32, [u32; 2])> = Vec::with_capacity(want);
        // The kernel's cursor is the last index read: the lookup starts after it.
        let mut cursor = first.checked_sub(1);
        while elems.len() < want {
            let room = (want - elems.len()) as u32;
            let before = elems.len();
            cursor = super::maps::lookup_batch(&self.data, cursor, room, &mut elems)?;
            if cursor.is_none() || elems.len() == before {
                break;
            }
        }
        if elems.len() < want {
            return Err(MapError::OutOfBounds { index: end, max_entries: self.len });
        }
        elems.truncate(want);
        let slots = elems.iter().flat_map(|(_, pair)| *pair);
        Ok(slots.skip((start - first * 2) as usize).take(count as usize).collect())
    }

    /// Writes `table` at slot `offset` through a mapping of the pages it covers, unmapped after.
    pub(super) fn write(&mut self, offset: u32, table: &[u32]) -> Result<(), MapError> {
        let end = offset as usize + table.len();
        if !self.writable {
            return Err(MapError::IoError(std::io::Error::from_raw_os_error(libc::EPERM)));
        }
        if end > self.len as usize {
            return Err(MapError::OutOfBounds { index: end as u32, max_entries: self.len });
        }
        if table.is_empty() {
            return Ok(());
        }
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let (from, to) = (offset as usize * 4, end * 4);
        let window = from / page * page;
        let bytes = to.div_ceil(page) * page - window;
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = self.data.fd().as_fd().as_raw_fd();
        // SAFETY: a shared mapping of whole pages of a BPF_F_MMAPABLE array, inside it (the
        // array's pages cover 4 * len bytes, page-rounded).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                window as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MapError::IoError(std::io::Error::last_os_error()));
        }
        // SAFETY: `from - window + 4 * table.len()` is within the `bytes` mapped; the region is
        // free, so no packet reads it yet.
        unsafe {
            std::ptr::copy_nonoverlapping(
                table.as_ptr(),
                p.cast::<u8>().add(from - window).cast::<u32>(),
                table.len(),
            );
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: unmapping exactly what was mapped above.
        unsafe { libc::munmap(p, bytes) };
        Ok(())
    }
}
