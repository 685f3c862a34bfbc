//! Memory for plaintext keys that the OS keeps out of swap and core dumps where it allows:
//! each [`Locked`] value has page-aligned pages of its own, `mlock`ed and marked
//! `MADV_DONTDUMP`, and zeroed before they are freed. Pages are never shared between values,
//! so unlocking one value's pages cannot unlock another's.
//!
//! Where the OS refuses (`RLIMIT_MEMLOCK` reached, no privilege) the value still works, in
//! unlocked pages; the first refusal is logged once and [`lock_failures`] counts them.
#![allow(unsafe_code)] // the one place keys touch raw memory: every block says why it is sound

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

const PAGE: usize = 4096;

static LOCK_FAILURES: AtomicU64 = AtomicU64::new(0);

/// How many key allocations the OS refused to lock since start (they work, but may be swapped).
pub fn lock_failures() -> u64 {
    LOCK_FAILURES.load(Ordering::Relaxed)
}

/// A `T` on pages of its own, locked in memory and left out of core dumps.
pub struct Locked<T> {
    ptr: NonNull<T>,
    layout: Layout,
    locked: bool,
}

// SAFETY: `Locked<T>` owns its `T` exactly as a `Box<T>` does (unique pointer, freed on drop),
// so it may cross threads when `T` may.
unsafe impl<T: Send> Send for Locked<T> {}
// SAFETY: shared access only hands out `&T`, as `Box<T>` does.
unsafe impl<T: Sync> Sync for Locked<T> {}

impl<T> Locked<T> {
    pub fn new(value: T) -> Self {
        let size = std::mem::size_of::<T>().max(1).next_multiple_of(PAGE);
        let layout = Layout::from_size_align(size, PAGE.max(std::mem::align_of::<T>()))
            .expect("a key type fits in a page-aligned layout");
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<T>()) else {
            alloc::handle_alloc_error(layout);
        };
        // SAFETY: `ptr` is valid for `size` bytes, which covers `T` and is aligned for it; the
        // memory is ours alone, so writing `value` into it cannot alias anything.
        unsafe { ptr.as_ptr().write(value) };
        // SAFETY: `raw` is the start of a live allocation of `size` bytes, page-aligned, as
        // mlock and madvise require; neither call reads or writes the memory.
        let locked = unsafe {
            let dontdump = libc::madvise(raw.cast(), size, libc::MADV_DONTDUMP) == 0;
            libc::mlock(raw.cast(), size) == 0 && dontdump
        };
        if !locked && LOCK_FAILURES.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "the OS refused to lock key memory (RLIMIT_MEMLOCK?): keys stay usable but may be swapped"
            );
        }
        Locked {
            ptr,
            layout,
            locked,
        }
    }

    /// Whether the OS locked this value's pages.
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl<T> std::fmt::Debug for Locked<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Locked(<redacted>)")
    }
}

impl<T> Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `ptr` holds an initialised `T` for as long as `self` lives.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        let raw = self.ptr.as_ptr().cast::<u8>();
        // SAFETY: the `T` is initialised and dropped exactly once, here; then every byte of
        // the allocation (ours alone) is overwritten with volatile writes, which the compiler
        // may not elide, before the pages are unlocked and freed with the layout they had.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            for i in 0..self.layout.size() {
                std::ptr::write_volatile(raw.add(i), 0);
            }
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
            if self.locked {
                libc::munlock(raw.cast(), self.layout.size());
            }
            alloc::dealloc(raw, self.layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_its_value_on_locked_pages_of_its_own() {
        let a = Locked::new([7u8; 64]);
        let b = Locked::new([9u8; 5000]);
        assert_eq!(a[..], [7u8; 64]);
        assert_eq!(b[4999], 9);
        let pa = &*a as *const _ as usize;
        let pb = &*b as *const _ as usize;
        assert_eq!(pa % PAGE, 0);
        assert_eq!(pb % PAGE, 0);
        assert!(pa.abs_diff(pb) >= PAGE, "each value has its own pages");
        // Root (CI, the dev box) may lock; elsewhere the refusal is counted.
        assert!(a.is_locked() || lock_failures() > 0);
    }

    #[test]
    fn drops_what_it_holds() {
        let rc = std::rc::Rc::new(());
        let l = Locked::new(std::rc::Rc::clone(&rc));
        assert_eq!(std::rc::Rc::strong_count(&rc), 2);
        drop(l);
        assert_eq!(std::rc::Rc::strong_count(&rc), 1);
    }
}
