//! The allocator the binaries install: mimalloc, told to keep freed pages.
//!
//! A training step allocates and frees the same large buffers every time (the logits and their gradients are
//! `[tokens, vocab]`: 200 MB for 1024 tokens of SmolLM2). glibc returns every block over 32 MB to the kernel at once
//! and the next step faults it back in page by page; mimalloc's default purges freed memory after a delay, which
//! costs even more. On 2 cores, `offsite-train-bench --only emu-int8`: glibc 116.6 tokens/s (2.65M page faults),
//! mimalloc's default 78, mimalloc without purging 137.5 (5K faults; peak RSS 2287 against 2030 MiB).

pub use mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h`, v3; the binding names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never hand freed pages back to the kernel: the process keeps its peak footprint and reuses it. Call it first
/// thing in `main`.
pub fn keep_freed_pages() {
    // SAFETY: sets one entry of mimalloc's option table, which it documents as settable at run time; called at the
    // start of `main`, before other threads exist.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        super::keep_freed_pages();
        // `mi_option_use_numa_nodes` follows `mi_option_purge_delay` in the header's enum.
        assert_eq!(
            libmimalloc_sys::mi_option_use_numa_nodes,
            super::MI_OPTION_PURGE_DELAY + 1
        );
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) },
            -1
        );
    }
}
