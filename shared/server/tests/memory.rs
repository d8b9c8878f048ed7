//! The runtime a service runs on gives freed buffers back to the system, even after glibc's
//! defaults would have started keeping buffers of that size.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

/// The process's resident size, from `/proc/self/status`.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// Allocates `size` bytes, writes every page, and frees them.
fn touch_and_free(size: usize) {
    let buffer = vec![1u8; size];
    std::hint::black_box(&buffer);
}

#[test]
fn freed_buffers_leave_the_resident_size_where_it_was() {
    const SIZE: usize = 16 << 20;
    let runtime = medallion_server::memory::runtime().expect("runtime");
    runtime.block_on(async {
        let before = resident_bytes();
        // With glibc's defaults the first free raises the mmap threshold to this size, so the
        // next buffers come from the heap, which keeps them once freed.
        for _ in 0..3 {
            touch_and_free(SIZE);
        }
        let after = resident_bytes();
        assert!(
            after < before + SIZE as u64 / 2,
            "resident size grew by {} MiB after freeing every buffer (GLIBC_TUNABLES: {:?}; \
             malloc tunables set there replace the service's own settings)",
            (after.saturating_sub(before)) >> 20,
            std::env::var("GLIBC_TUNABLES").ok()
        );
    });
}
