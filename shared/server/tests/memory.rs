//! The runtime a service runs on shares two malloc arenas among all its threads, however many
//! allocate at once (glibc's default gives each of them an arena, up to 8 per core).
#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::ffi::CString;
use std::sync::{Arc, Barrier};

/// The arenas malloc has, from the `<heap nr=…>` entries of `malloc_info`.
fn arenas() -> usize {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("malloc_info.xml");
    let c_path = CString::new(path.to_string_lossy().as_bytes()).expect("path");
    // SAFETY: a file opened for writing, handed to malloc_info, then closed once.
    unsafe {
        let file = libc::fopen(c_path.as_ptr(), c"w".as_ptr());
        assert!(!file.is_null(), "cannot open {}", path.display());
        assert_eq!(libc::malloc_info(0, file), 0, "malloc_info failed");
        libc::fclose(file);
    }
    let info = std::fs::read_to_string(&path).expect("malloc_info output");
    info.matches("<heap nr=").count()
}

#[test]
fn threads_allocating_at_once_share_two_arenas() {
    const THREADS: usize = 12;
    let runtime = medallion_server::memory::runtime().expect("runtime");
    let count = runtime.block_on(async {
        // Every thread holds an allocation until all of them have one, so none can hand its
        // arena to another.
        let all_allocated = Arc::new(Barrier::new(THREADS + 1));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let all_allocated = all_allocated.clone();
                std::thread::spawn(move || {
                    let buffer = std::hint::black_box(vec![1u8; 64 * 1024]);
                    all_allocated.wait();
                    all_allocated.wait();
                    drop(buffer);
                })
            })
            .collect();
        all_allocated.wait();
        let count = arenas();
        all_allocated.wait();
        for thread in threads {
            thread.join().expect("allocating thread");
        }
        count
    });
    assert!(
        count <= 2,
        "{count} malloc arenas for {THREADS} threads allocating at once (GLIBC_TUNABLES: {:?}; \
         malloc tunables set there replace the service's own settings)",
        std::env::var("GLIBC_TUNABLES").ok()
    );
}
