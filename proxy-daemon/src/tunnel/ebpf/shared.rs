//! The fast path's memory accounting, shared with the verdict: `LEDGER` (one [`Ledger`]
//! per direction slot) and `MEMORY` (the machine-wide [`KernelMemory`]) are
//! `BPF_F_MMAPABLE` arrays mapped into the daemon, so both sides update them with plain
//! atomics (the daemon must take bytes off the count for directions the verdict no longer
//! sees: quiet ones, and those that left the kernel).

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use proxy_common::{KernelMemory, Ledger};

/// An `mmap` of a `BPF_F_MMAPABLE` array map, viewed as `[T]`.
pub struct MappedArray<T> {
    ptr: NonNull<T>,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is only ever accessed through `T`'s atomics.
unsafe impl<T: Sync> Send for MappedArray<T> {}
unsafe impl<T: Sync> Sync for MappedArray<T> {}

impl<T> MappedArray<T> {
    /// Maps the `len` entries of the array map `fd`. The kernel lays entries out every
    /// `round_up(size_of::<T>(), 8)` bytes; `T` must be a multiple of 8 bytes.
    pub fn new(fd: impl AsFd, len: u32) -> io::Result<Self> {
        assert!(size_of::<T>().is_multiple_of(8) && align_of::<T>() <= 8);
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = (len as usize * size_of::<T>()).div_ceil(page) * page;
        // SAFETY: a shared read-write mapping of the map's value area, which the kernel
        // keeps alive as long as the mapping exists (even after the map fd is closed).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MappedArray {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len: len as usize,
            bytes,
        })
    }

    pub fn get(&self, index: u32) -> Option<&T> {
        // SAFETY: within the mapping, which lives as long as `self`; `T` is atomics only.
        ((index as usize) < self.len).then(|| unsafe { &*self.ptr.as_ptr().add(index as usize) })
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// The fast path's kernel-memory accounting as the daemon sees it.
pub struct Accounting {
    ledger: MappedArray<Ledger>,
    memory: MappedArray<KernelMemory>,
    slots: Mutex<Slots>,
}

/// Who uses which ledger slot.
struct Slots {
    /// Slots not in use by a direction.
    free: Vec<u32>,
    /// No slot is handed out any more: the maps are moving to a successor.
    frozen: bool,
    /// Slots the daemon taken over was using that no adopted direction has claimed
    /// yet: freed once that daemon is done (its own tunnels that ended freed them).
    unclaimed: HashSet<u32>,
}

impl Accounting {
    pub fn new(ledger: MappedArray<Ledger>, memory: MappedArray<KernelMemory>) -> Self {
        Self::adopted(ledger, memory, &[])
    }

    /// The accounting of maps taken over from another daemon, which used `used`.
    pub fn adopted(
        ledger: MappedArray<Ledger>,
        memory: MappedArray<KernelMemory>,
        used: &[u32],
    ) -> Self {
        let unclaimed: HashSet<u32> = used.iter().copied().collect();
        let free = (0..ledger.len as u32)
            .rev()
            .filter(|s| !unclaimed.contains(s))
            .collect();
        Accounting {
            ledger,
            memory,
            slots: Mutex::new(Slots {
                free,
                frozen: false,
                unclaimed,
            }),
        }
    }

    /// Stops handing out slots and returns those in use (for a successor).
    pub fn freeze(&self) -> Vec<u32> {
        let mut slots = self.slots.lock().unwrap();
        slots.frozen = true;
        let free: HashSet<u32> = slots.free.iter().copied().collect();
        (0..self.ledger.len as u32)
            .filter(|s| !free.contains(s))
            .collect()
    }

    /// An adopted direction uses `slot`.
    pub fn claim(&self, slot: u32) {
        self.slots.lock().unwrap().unclaimed.remove(&slot);
    }

    /// The daemon taken over is done: slots it used that no adopted direction claimed
    /// are free. Returns how many.
    pub fn release_unclaimed(&self) -> usize {
        let mut slots = self.slots.lock().unwrap();
        let unclaimed: Vec<u32> = slots.unclaimed.drain().collect();
        slots.free.extend(&unclaimed);
        unclaimed.len()
    }

    fn memory(&self) -> &KernelMemory {
        self.memory.get(0).expect("MEMORY has one entry")
    }

    /// A zeroed ledger slot for a new direction; `None` when every slot is taken (the
    /// maps are full: the tunnel uses the userspace relay).
    pub fn take_slot(&self) -> Option<u32> {
        let slot = {
            let mut slots = self.slots.lock().unwrap();
            if slots.frozen {
                return None;
            }
            slots.free.pop()?
        };
        let l = self.ledger.get(slot).expect("slot in range");
        l.redirected.store(0, Relaxed);
        l.delivered.store(0, Relaxed);
        l.handoff.store(0, Relaxed);
        Some(slot)
    }

    /// Gives a slot back. Only once no verdict can reach it (its direction is out of the
    /// map) and it was [`settle_all`](Self::settle_all)ed.
    pub fn free_slot(&self, slot: u32) {
        self.slots.lock().unwrap().free.push(slot);
    }

    /// Bytes the verdict counted as redirected in `slot`.
    pub fn redirected(&self, slot: u32) -> u64 {
        self.ledger
            .get(slot)
            .map_or(0, |l| l.redirected.load(Relaxed))
    }

    /// Bytes of `slot` still counted as queued in the kernel.
    pub fn outstanding(&self, slot: u32) -> u64 {
        self.ledger.get(slot).map_or(0, |l| {
            l.redirected
                .load(Relaxed)
                .saturating_sub(l.delivered.load(Relaxed))
        })
    }

    /// `HANDOFF_*` the verdict set for `slot` (0: none).
    pub fn handoff(&self, slot: u32) -> u32 {
        self.ledger
            .get(slot)
            .map_or(0, |l| l.handoff.load(Relaxed) as u32)
    }

    /// Records that the first `delivered` bytes of `slot` are in its peer's stream (the
    /// same compare-and-swap as the verdict's, retried until it holds).
    pub fn settle(&self, slot: u32, delivered: u64) {
        let Some(l) = self.ledger.get(slot) else {
            return;
        };
        let mut known = l.delivered.load(Relaxed);
        while delivered > known {
            match l
                .delivered
                .compare_exchange(known, delivered, Relaxed, Relaxed)
            {
                Ok(_) => {
                    self.memory().queued.fetch_sub(delivered - known, Relaxed);
                    return;
                }
                Err(now) => known = now,
            }
        }
    }

    /// Takes every byte of `slot` off the machine-wide count: its direction left the
    /// kernel (its bytes were delivered, or purged with the tunnel). Only once the
    /// verdict no longer runs for it.
    pub fn settle_all(&self, slot: u32) {
        self.settle(slot, self.redirected(slot));
    }

    /// Bytes queued in the kernel now, over every direction.
    pub fn queued(&self) -> u64 {
        (self.memory().queued.load(Relaxed) as i64).max(0) as u64
    }

    /// Highest `queued` the verdict has seen.
    pub fn peak(&self) -> u64 {
        (self.memory().peak.load(Relaxed) as i64).max(0) as u64
    }

    /// Over-budget events the ring buffer had no room for, since load.
    pub fn events_missed(&self) -> u64 {
        self.memory().events_missed.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    /// Shared memory standing in for a `BPF_F_MMAPABLE` array.
    fn memory(bytes: usize) -> OwnedFd {
        // SAFETY: memfd_create with a static name; the fd is ours.
        let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: sizing the memfd we own.
        assert_eq!(unsafe { libc::ftruncate(fd, bytes as libc::off_t) }, 0);
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn accounting(used: &[u32]) -> Accounting {
        let slots = 8u32;
        let ledger = MappedArray::new(memory(4096), slots).unwrap();
        let mem = MappedArray::new(memory(4096), 1).unwrap();
        Accounting::adopted(ledger, mem, used)
    }

    /// Takeover: the running daemon freezes allocation and names the slots in use; the
    /// successor never hands those out until the daemon taken over is done, and then
    /// frees only the ones no adopted direction claimed.
    #[test]
    fn slots_move_with_a_takeover() {
        let old = accounting(&[]);
        let a = old.take_slot().unwrap();
        let b = old.take_slot().unwrap();
        let c = old.take_slot().unwrap();
        old.free_slot(b);
        let used = old.freeze();
        assert_eq!(old.take_slot(), None, "frozen");
        let mut expected = vec![a, c];
        expected.sort();
        assert_eq!(used, expected);

        let new = accounting(&used);
        new.claim(a);
        let mut got: Vec<u32> = std::iter::from_fn(|| new.take_slot()).collect();
        got.sort();
        assert!(!got.contains(&a) && !got.contains(&c), "{got:?}");
        assert_eq!(got.len(), 6);
        // `c`'s tunnel ended in the old daemon: freed once it is done; `a` stays in use.
        assert_eq!(new.release_unclaimed(), 1);
        assert_eq!(new.take_slot(), Some(c));
        assert_eq!(new.take_slot(), None);
    }
}
