//! Handing freed heap back to the system.

/// Returns the heap freed since (by evicted sessions, a shrunk database cache) to the
/// system: glibc's allocator keeps freed memory in its arenas, so a process that once
/// held many sessions would otherwise keep their size. Does nothing on other
/// allocators.
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only walks the allocator's free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
