//! How a service process gives freed memory back to the system.
//!
//! The layer services allocate large, short-lived buffers: Flight messages, Arrow columns,
//! row groups being encoded. With glibc's defaults two things keep that memory in the process
//! after it is freed, so a pod's resident size stays near its highest past peak:
//! - the mmap threshold rises to the size of every large block freed (up to 32 MiB), so later
//!   blocks of that size come from the heap, and the heap keeps what is freed;
//! - every thread that allocates under contention gets an arena of its own (up to 8 per core),
//!   and each arena keeps its own freed memory.
//!
//! A fixed 1 MiB threshold maps every large buffer on its own and unmaps it when freed, and two
//! arenas bound what the small allocations keep. On TPC-H SF1 (`medallion bench tpch`) the four
//! services' summed peak fell from 2.74–2.96 GiB to 1.99–2.23 GiB, for about 1.3 CPU-seconds
//! more kernel time (pages mapped afresh for each large buffer).

/// Blocks this large or larger are mapped on their own and returned to the system when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 1 << 20;

/// Most malloc arenas of the process.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENAS: libc::c_int = 2;

/// Sets the allocator up as described in the module docs, before any other thread starts (an
/// arena made before it stays). Settings given in `GLIBC_TUNABLES` (`glibc.malloc.*`) are left
/// as they are: the operator's choice wins. A no-op off glibc.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
            return;
        }
        // SAFETY: mallopt takes two integers and only changes allocator parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        }
    }
}

/// The multi-threaded runtime a service runs on, with the allocator set up first (see the
/// module docs) so that the runtime's threads share the bounded arenas. Call it first in `main`.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    return_freed_memory();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}
