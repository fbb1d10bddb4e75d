//! The Maglev slot array, memory-mapped: the agent writes tables as plain memory.

use aya::maps::{MapData, MapError};
use lb_common::MAP_LB4_MAGLEV;

use super::{maps::map_err, DatapathError};

/// The Maglev slot array, memory-mapped: tables are written as plain memory. The datapath reads
/// a region only after its frontend entry points at it, which is written afterwards through a
/// syscall (a full barrier), so a packet never sees a half-written table.
pub struct MaglevSlots {
    /// The map's file descriptor, kept for writers; a read-only mapping drops it (the mapping
    /// outlives it), so no writable handle stays open.
    pub(super) data: Option<MapData>,
    ptr: std::ptr::NonNull<u32>,
    len: u32,
    bytes: usize,
    writable: bool,
}

// SAFETY: the mapping is owned by this value and only written through `&mut self`.
unsafe impl Send for MaglevSlots {}
// SAFETY: shared access only reads (volatile) from the mapping.
unsafe impl Sync for MaglevSlots {}

impl MaglevSlots {
    pub(super) fn map(data: MapData, writable: bool) -> Result<Self, DatapathError> {
        // Two u32 slots per element (see the map's declaration).
        let len = data.info().map_err(map_err(MAP_LB4_MAGLEV))?.max_entries() * 2;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = (len as usize * 4).div_ceil(page) * page;
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF_F_MMAPABLE array of `len` u32 values, shared, page-rounded.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ },
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DatapathError::Map {
                map: MAP_LB4_MAGLEV,
                source: MapError::IoError(std::io::Error::last_os_error()),
            });
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u32>()).expect("mmap returned non-null");
        // A read-only mapping has no VM_MAYWRITE (the kernel clears it): it cannot be made
        // writable later, and with the descriptor closed nothing writable remains.
        Ok(Self { data: writable.then_some(data), ptr, len, bytes, writable })
    }

    /// Slots in the array.
    pub(super) fn len(&self) -> u32 {
        self.len
    }

    /// Copies slots `0..end` of `other` into this one: a layout's tables carried into another's
    /// (see `migrate`), before any frontend points at them.
    pub(super) fn copy_from(&mut self, other: &MaglevSlots, end: u32) -> Result<(), MapError> {
        if end > other.len {
            return Err(MapError::OutOfBounds { index: end, max_entries: other.len });
        }
        let mut buf = vec![0u32; end as usize];
        for (i, slot) in buf.iter_mut().enumerate() {
            // SAFETY: in bounds of `other`'s mapping; volatile because the kernel shares it.
            *slot = unsafe { other.ptr.as_ptr().add(i).read_volatile() };
        }
        self.write(0, &buf)
    }

    /// The backend id in `slot`.
    pub fn get(&self, slot: u32) -> Option<u32> {
        // SAFETY: in bounds of the mapping; volatile because the kernel shares it.
        (slot < self.len).then(|| unsafe { self.ptr.as_ptr().add(slot as usize).read_volatile() })
    }

    pub(super) fn write(&mut self, offset: u32, table: &[u32]) -> Result<(), MapError> {
        let end = offset as usize + table.len();
        if !self.writable {
            return Err(MapError::IoError(std::io::Error::from_raw_os_error(libc::EPERM)));
        }
        if end > self.len as usize {
            return Err(MapError::OutOfBounds { index: end as u32, max_entries: self.len });
        }
        // SAFETY: in bounds (checked above); the region is free, so no packet reads it yet.
        unsafe {
            std::ptr::copy_nonoverlapping(table.as_ptr(), self.ptr.as_ptr().add(offset as usize), table.len())
        };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for MaglevSlots {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}
