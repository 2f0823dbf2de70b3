//! `fork()`: the child has one thread, the one that called fork, and a copy of every lock as it
//! was. A lock another thread held is held forever in the child, so the allocator takes all of
//! its pool locks, and each pool's backend's (the simulated device's map of mappings), just
//! before fork (`prepare`) and releases them on both sides afterwards.
//!
//! The child also gets an allocator with nothing in hand: the caches of the threads it lacks go
//! back to the arenas, the parent's live allocations are not reported at the child's exit (they
//! are the parent's to report), and CUDA is unusable (the driver does not survive fork), so the
//! pools of a CUDA process answer as the runtime does in a forked child. The simulated device,
//! host memory, keeps working.
//!
//! A set-up in progress on another thread (the configuration, the backend choice, a device's
//! backend or pool, the tracker: `process::init::InitCell`s) is waited for first: the set-up
//! lock is taken before every lock here, so the pools enumerated are all there are, and the
//! child finds each set-up either not begun or finished.
//!
//! The tracker's overflow map (records that do not fit its table) has a lock of its own, taken
//! last (nothing is locked under it). The live-table keys, which a thread holds for the length of
//! one insert or remove, are not locked at fork: the child drops those held
//! (`track::after_fork_child`).

use crate::pool::caching::PoolLocks;
use crate::process::init::{set_fork_hooks, ForkHooks};
use crate::runtime;
use crate::track::live_table::OverflowLock;
use std::cell::RefCell;

pub use crate::process::{cuda_lost, in_child};

/// Run by `process::init`'s handlers, inside its set-up lock.
static HOOKS: ForkHooks = ForkHooks {
    prepare,
    parent,
    child,
};

thread_local! {
    /// The locks `prepare` took, released by `parent` or `child` on the same thread.
    static HELD: RefCell<Vec<PoolLocks<'static>>> = const { RefCell::new(Vec::new()) };
    static HELD_TRACKER: RefCell<Option<OverflowLock<'static>>> = const { RefCell::new(None) };
}

/// Registers the fork handlers (idempotent); called when the first pool is created.
pub fn install() {
    set_fork_hooks(&HOOKS);
}

fn prepare() {
    let _ = std::panic::catch_unwind(|| {
        let mut held = Vec::new();
        // A fixed order: devices in ordinal order, then the pinned host pool.
        for (_, pool) in runtime::pools() {
            held.push(pool.lock_all());
        }
        if let Some(host) = runtime::host_pool_if_started() {
            held.push(host.lock_all());
        }
        let _ = HELD.try_with(|h| *h.borrow_mut() = held);
        let tracker = crate::track::lock_for_fork();
        let _ = HELD_TRACKER.try_with(|h| *h.borrow_mut() = tracker);
    });
}

fn parent() {
    release();
}

fn child() {
    let _ = std::panic::catch_unwind(|| {
        let _ = HELD.try_with(|h| {
            h.borrow_mut()
                .iter_mut()
                .for_each(PoolLocks::after_fork_child)
        });
    });
    release();
    crate::process::note_forked_child(runtime::active_if_decided() == Some(runtime::Active::Cuda));
    crate::pool::thread_cache::after_fork_child();
    crate::track::after_fork_child();
}

fn release() {
    let _ = std::panic::catch_unwind(|| {
        let _ = HELD_TRACKER.try_with(|h| h.borrow_mut().take());
        let _ = HELD.try_with(|h| h.borrow_mut().clear());
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// Forks 100 times while four threads allocate and free in a loop: every child allocates
    /// and frees on the simulated device, exits within the deadline, and prints nothing (not the
    /// parent's leak report, though the parent has a live `cudaMalloc` block).
    #[test]
    fn children_forked_while_threads_allocate_work_and_report_nothing() {
        if crate::test_child::is_child() {
            return child();
        }
        let text = crate::test_child::run(
            "runtime::fork::tests::children_forked_while_threads_allocate_work_and_report_nothing",
            Some("backend:sim,backtrace:off,leak_report:full"),
        );
        assert!(text.contains("child checks passed"), "{text}");
    }

    fn cycle(sizes: &[usize]) {
        let pool = crate::runtime::pool(0).unwrap();
        let blocks: Vec<_> = sizes
            .iter()
            .map(|&s| pool.alloc_unchecked(s).unwrap())
            .collect();
        for (p, b) in blocks {
            pool.free_unchecked(p, b);
        }
    }

    fn child() {
        let mut leaked = std::ptr::null_mut();
        // SAFETY: a local out-parameter; the block stays live on purpose.
        assert_eq!(
            unsafe { crate::ffi::cuda_api::cudaMalloc(&mut leaked, 4096) },
            0
        );
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let sizes = [512, 64 << 10, (1 << 20) + t * 4096, 40 << 20];
                    while !stop.load(Ordering::Relaxed) {
                        cycle(&sizes);
                        // Frees by another thread and exits of threads, as well.
                        let pool = crate::runtime::pool(0).unwrap();
                        let b = pool.alloc_unchecked(256 << 10).unwrap();
                        std::thread::spawn(move || pool.free_unchecked(b.0, b.1))
                            .join()
                            .unwrap();
                    }
                })
            })
            .collect();
        fork_children(100);
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        println!("child checks passed");
    }

    /// Forks while threads take chunks from the device and give them back (`trim`): the
    /// backend's own lock must not be held in a child either.
    #[test]
    fn children_forked_while_threads_grow_and_trim_work() {
        if crate::test_child::is_child() {
            return grow_and_trim_child();
        }
        let text = crate::test_child::run(
            "runtime::fork::tests::children_forked_while_threads_grow_and_trim_work",
            Some("backend:sim,backtrace:off,leak_report:full"),
        );
        assert!(text.contains("child checks passed"), "{text}");
    }

    fn grow_and_trim_child() {
        // The workers set up the runtime themselves: the first forks race that set-up too.
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..2)
            .map(|t| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let pool = crate::runtime::pool(0).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        cycle(&[(4 << 20) + t * 4096]);
                        pool.trim().unwrap();
                    }
                })
            })
            .collect();
        fork_children(200);
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        println!("child checks passed");
    }

    /// Forks while another thread holds the tracker's overflow map (the lock of records that do
    /// not fit its table: an address not 4-byte aligned, here): each child records and forgets
    /// such an address, allocates and frees, and exits.
    #[test]
    fn children_forked_while_the_trackers_overflow_map_is_held_work() {
        if crate::test_child::is_child() {
            return overflow_child();
        }
        let text = crate::test_child::run(
            "runtime::fork::tests::children_forked_while_the_trackers_overflow_map_is_held_work",
            Some("backend:sim,backtrace:off,leak_report:full"),
        );
        assert!(text.contains("child checks passed"), "{text}");
    }

    fn overflow_child() {
        use crate::track::{self, Origin};
        // The first pool installs the fork handlers, and the tracker is built before the
        // holder runs: it holds the tracker's lock, which needs the tracker.
        cycle(&[512]);
        track::global();
        let stop = Arc::new(AtomicBool::new(false));
        let holder = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let held = track::global().lock_for_fork();
                    std::thread::sleep(Duration::from_micros(200));
                    drop(held);
                    std::thread::yield_now();
                }
            })
        };
        fork_children_doing(50, || {
            let odd = 0x1001;
            track::on_alloc(odd, 64, 0, 0, Origin::HbmAlloc);
            assert!(track::on_free(odd), "the odd address was recorded");
            cycle(&[512, 1 << 20]);
        });
        stop.store(true, Ordering::Relaxed);
        holder.join().unwrap();
        println!("child checks passed");
    }

    /// Forks while another thread is held inside a first set-up (the configuration, the
    /// backend choice, the device's pool, the global tracker; a fresh process each): the child
    /// allocates, frees and exits. Were the fork not to wait for the set-up, the child would wait
    /// forever on the one the thread it lacks had begun.
    fn fork_during_first_set_up_of(name: &str) {
        let text = crate::test_child::run_with_env(
            "runtime::fork::tests::child_forked_during_a_first_set_up",
            Some("backend:sim,backtrace:off,leak_report:full"),
            &[("HBM_TEST_PAUSE_IN", name)],
            Duration::from_secs(60),
        );
        assert!(text.contains("child checks passed"), "{name}: {text}");
    }

    #[test]
    fn children_forked_during_the_configurations_set_up_work() {
        fork_during_first_set_up_of("config");
    }

    #[test]
    fn children_forked_during_the_backend_choice_work() {
        fork_during_first_set_up_of("runtime::active");
    }

    #[test]
    fn children_forked_during_a_pools_set_up_work() {
        fork_during_first_set_up_of("runtime::pool");
    }

    #[test]
    fn children_forked_during_the_trackers_set_up_work() {
        fork_during_first_set_up_of("track::global");
    }

    #[test]
    fn child_forked_during_a_first_set_up() {
        use crate::process::init::test_pause;
        if !crate::test_child::is_child() {
            return;
        }
        let name = std::env::var("HBM_TEST_PAUSE_IN").expect("a set-up to pause in");
        test_pause::pause_in(name.leak(), Duration::from_millis(300));
        let first = std::thread::spawn(|| {
            let mut p = std::ptr::null_mut();
            // SAFETY: a local out-parameter; the block is ours to free.
            unsafe {
                assert_eq!(crate::ffi::cuda_api::cudaMalloc(&mut p, 4096), 0);
                assert_eq!(crate::ffi::cuda_api::cudaFree(p), 0);
            }
        });
        while !test_pause::entered() {
            std::thread::yield_now();
        }
        fork_children_doing(1, || {
            if !test_pause::left() {
                // The fork did not wait for the set-up to finish.
                // SAFETY: ends the child at once, with a status the parent reports.
                unsafe { libc::_exit(3) };
            }
            let mut p = std::ptr::null_mut();
            // SAFETY: a local out-parameter; the block is ours to free.
            unsafe {
                assert_eq!(crate::ffi::cuda_api::cudaMalloc(&mut p, 4096), 0);
                assert_eq!(crate::ffi::cuda_api::cudaFree(p), 0);
            }
        });
        first.join().unwrap();
        println!("child checks passed");
    }

    /// Forks `rounds` children; each allocates and frees, exits within a deadline and prints
    /// nothing to stderr.
    fn fork_children(rounds: usize) {
        fork_children_doing(rounds, || cycle(&[512, 64 << 10, 1 << 20, 40 << 20]));
    }

    /// As `fork_children`, each child running `body` instead.
    fn fork_children_doing(rounds: usize, body: fn()) {
        for round in 0..rounds {
            let mut fds = [0; 2];
            // SAFETY: `fds` is a valid array of two ints.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: the child calls only the allocator, dup2 and exit before it ends.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: fds[1] is open; stderr now goes to the pipe.
                unsafe { libc::dup2(fds[1], 2) };
                body();
                // SAFETY: ends the child, running its exit handlers (the leak report's).
                unsafe { libc::exit(0) };
            }
            assert!(pid > 0, "fork failed");
            // SAFETY: the write end belongs to the child now.
            unsafe { libc::close(fds[1]) };
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut status = 0;
            loop {
                // SAFETY: `pid` is our child; `status` a valid out-parameter.
                let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                if done == pid {
                    break;
                }
                if Instant::now() > deadline {
                    // SAFETY: `pid` is our child, still running.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    panic!("child {round} hung");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "child {round}: status {status:#x}"
            );
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                // SAFETY: fds[0] is open; `buf` is writable for its length.
                let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n as usize]);
            }
            // SAFETY: fds[0] is open and ours.
            unsafe { libc::close(fds[0]) };
            assert!(
                out.is_empty(),
                "child {round} printed: {}",
                String::from_utf8_lossy(&out)
            );
        }
    }
}
