//! Faults done to the daemon process from outside: its open-file limit squeezed so it
//! cannot open a single descriptor, and a SIGCONT that follows a SIGSTOP even when the
//! test fails meanwhile.

use std::collections::BTreeSet;
use std::io;

/// Lowers a process's soft open-file limit to its lowest free fd number (no new fd can be
/// opened) and restores it when dropped.
pub struct FdLimit {
    pid: i32,
    old: libc::rlimit,
}

impl FdLimit {
    pub fn squeeze(pid: i32) -> FdLimit {
        let used: BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        let lowest_free = (0..).find(|n| !used.contains(n)).unwrap();
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit reads `new` and writes `old`.
        let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
        assert_eq!(r, 0, "prlimit: {}", io::Error::last_os_error());
        let new = libc::rlimit {
            rlim_cur: lowest_free,
            rlim_max: old.rlim_max,
        };
        let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
        assert_eq!(r, 0, "prlimit: {}", io::Error::last_os_error());
        FdLimit { pid, old }
    }
}

impl Drop for FdLimit {
    fn drop(&mut self) {
        unsafe {
            libc::prlimit(
                self.pid,
                libc::RLIMIT_NOFILE,
                &self.old,
                std::ptr::null_mut(),
            )
        };
    }
}

/// Sends SIGCONT to `pid` when dropped (also when the test fails while it is stopped).
pub fn cont_on_drop(pid: i32) -> impl Drop {
    struct Cont(i32);
    impl Drop for Cont {
        fn drop(&mut self) {
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    Cont(pid)
}
