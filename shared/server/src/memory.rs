//! How much freed memory a service process keeps.
//!
//! glibc's malloc gives each thread that allocates an arena of its own, until there are 8 per
//! core, and each arena keeps its own freed memory for reuse. The layer services allocate from many
//! threads at once (tokio's workers and blocking threads, polars' pool, the parquet encoders),
//! so each of them ends up with its own cache of freed Arrow buffers, and a pod's resident size
//! grows by all of them. Two arenas bound that.
//!
//! Measured on TPC-H SF1 (`medallion bench tpch`, 5 alternating pairs of runs): the four
//! services' summed peak fell from 2.69–2.88 GiB to 2.35–2.41 GiB (the refiner's from
//! 0.79–0.94 to 0.55–0.61 GiB), kernel time fell in every pair (fewer pages faulted in), and
//! wall time moved by -0.5 to +1.1 s, inside the run-to-run spread. A fixed 1 MiB mmap
//! threshold on top took the peak to about 2.2 GiB but added about 1.4 s, every large buffer
//! being mapped afresh, so it is not set.

/// Most malloc arenas of a service process.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENAS: libc::c_int = 2;

/// Bounds the process's arenas, before any other thread starts (an arena made before stays).
/// A `glibc.malloc.*` setting in `GLIBC_TUNABLES` is left as it is: the operator's choice
/// wins. A no-op off glibc.
fn bound_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
            return;
        }
        // SAFETY: mallopt takes two integers and only changes allocator parameters.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        }
    }
}

/// The multi-threaded runtime a service runs on, with the arenas bounded first (see the module
/// docs) so that the runtime's threads share them. Call it first in `main`.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    bound_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}
