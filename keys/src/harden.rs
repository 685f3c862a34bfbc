//! Hardening of processes that hold plaintext keys (host agent, transform worker, KMS): no core
//! dumps, and not dumpable, so neither a crash nor another process of the same user (ptrace,
//! `/proc/<pid>/mem`) can read keys out of memory.
#![allow(unsafe_code)] // two libc calls with plain integer arguments

use std::io;

/// Makes this process non-dumpable (`PR_SET_DUMPABLE` 0) and sets its core-file limit to 0.
/// Idempotent; children inherit the core limit.
pub fn harden_process() -> io::Result<()> {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass by reference; prctl with PR_SET_DUMPABLE
    // takes integers only. Neither touches memory of ours otherwise.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether this process is dumpable (for tests and `--check` style diagnostics).
pub fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointer and only returns an integer.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_the_process_undumpable_without_core_files() {
        harden_process().unwrap();
        assert!(!is_dumpable());
        let mut lim = libc::rlimit {
            rlim_cur: 1,
            rlim_max: 1,
        };
        // SAFETY: getrlimit writes the struct we pass.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut lim) }, 0);
        assert_eq!((lim.rlim_cur, lim.rlim_max), (0, 0));
        harden_process().unwrap();
    }
}
