//! One-time set-up that `fork` waits for.
//!
//! `fork()` copies only the calling thread. A once-cell that another thread was filling at the
//! fork stays "being filled" in the child for good, and the child's first look at it waits
//! forever. So the process-wide set-ups on the allocation paths (the configuration, the backend
//! choice, each device's backend and pool, the pinned pool, the tracker) are `InitCell`s, filled
//! under one lock, and the fork handlers take that lock before anything else: a fork waits for a
//! set-up in progress and never starts one, and the child finds each cell empty or filled.
//!
//! The lock is taken only while a cell is empty: once filled, a cell costs one acquire load, as
//! a `once_cell` does. It is reentrant on one thread (a pool's set-up reads the configuration),
//! and a fork from inside a set-up does not wait for itself.
//!
//! Lock order at fork: this lock, then what the layers above hand down (`set_fork_hooks`: the
//! pools' locks, then the tracker's overflow map). Nothing waits for this lock while holding one
//! of those: the cells that the pool, backend and tracker code reads are filled before the first
//! pool or tracker exists. A set-up runs with the lock held, so it must not wait for a fork in
//! progress: before glibc 2.36 `fork` holds glibc's own handler lock across the handlers, which
//! `pthread_atfork`, `dlclose` and a nested `fork` also take. So the CUDA driver's first probe
//! (`cuInit`, which may do all three) runs outside the lock (`CudaBackend::device_count`, and
//! its callers `runtime::active` and `ffi::runtime_state` probe before they take it); a device
//! backend's own set-up (retaining the primary context, after the probe) does run under it.

use once_cell::sync::OnceCell;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, Ordering};
use std::time::Duration;

/// A value set up once per process, under the set-up lock (see the module doc).
pub struct InitCell<T> {
    cell: OnceCell<T>,
    /// For the tests' pause (`test_pause`) and for a reader of the code.
    #[cfg_attr(not(test), allow(dead_code))]
    name: &'static str,
}

impl<T> InitCell<T> {
    pub const fn new(name: &'static str) -> InitCell<T> {
        InitCell {
            cell: OnceCell::new(),
            name,
        }
    }

    /// The value, if set up; never waits.
    #[inline]
    pub fn get(&self) -> Option<&T> {
        self.cell.get()
    }

    /// The value, set up by `f` on first use.
    #[inline]
    pub fn get_or_init(&self, f: impl FnOnce() -> T) -> &T {
        match self.cell.get() {
            Some(value) => value,
            None => self.init_slow(f),
        }
    }

    #[cold]
    #[inline(never)]
    fn init_slow(&self, f: impl FnOnce() -> T) -> &T {
        let _held = Held::take();
        self.cell.get_or_init(|| {
            #[cfg(test)]
            test_pause::here(self.name);
            f()
        })
    }

    /// As `get_or_init`, for a set-up that can fail (the cell stays empty then).
    #[inline]
    pub fn get_or_try_init<E>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
        match self.cell.get() {
            Some(value) => Ok(value),
            None => self.try_init_slow(f),
        }
    }

    #[cold]
    #[inline(never)]
    fn try_init_slow<E>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
        let _held = Held::take();
        self.cell.get_or_try_init(|| {
            #[cfg(test)]
            test_pause::here(self.name);
            f()
        })
    }

    /// Sets the value unless it is set (`Err` with `value` then).
    pub fn set(&self, value: T) -> Result<(), T> {
        if self.cell.get().is_some() {
            return Err(value);
        }
        let _held = Held::take();
        self.cell.set(value)
    }
}

/// The set-up lock. Not a `std::sync::Mutex`: the fork handlers take it in `prepare` and give it
/// back in `parent` and `child`, with no guard to carry between them. Waiters are only threads
/// racing a first set-up (which may be the driver's initialisation, hundreds of milliseconds),
/// so they sleep rather than spin.
static LOCKED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// How many set-ups this thread is inside (the lock is this thread's while above zero).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

fn lock() {
    let mut spins = 0u32;
    while LOCKED
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spins += 1;
        if spins < 100 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

fn unlock() {
    LOCKED.store(false, Ordering::Release);
}

/// This thread's hold on the lock for one set-up.
struct Held {
    outermost: bool,
}

impl Held {
    fn take() -> Held {
        register();
        let depth = DEPTH.with(|d| {
            let n = d.get();
            d.set(n + 1);
            n
        });
        if depth == 0 {
            lock();
        }
        Held {
            outermost: depth == 0,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get() - 1));
        if self.outermost {
            unlock();
        }
    }
}

/// What the layers above hold across `fork`, after the set-up lock (`runtime::fork`).
pub struct ForkHooks {
    pub prepare: fn(),
    pub parent: fn(),
    pub child: fn(),
}

static HOOKS: AtomicPtr<ForkHooks> = AtomicPtr::new(std::ptr::null_mut());
/// The hooks the `prepare` of the fork in progress ran, for its `parent` or `child`.
static PREPARED: AtomicPtr<ForkHooks> = AtomicPtr::new(std::ptr::null_mut());
/// Whether the `prepare` of the fork in progress took the lock (not when it forked from inside
/// a set-up).
static PREPARE_LOCKED: AtomicBool = AtomicBool::new(false);

/// Runs `hooks` in every later fork, after the set-up lock is taken (idempotent).
pub fn set_fork_hooks(hooks: &'static ForkHooks) {
    register();
    HOOKS.store(std::ptr::from_ref(hooks).cast_mut(), Ordering::Release);
}

/// 0: not registered; `DONE`; otherwise the pid of the process one of whose threads is
/// registering.
static REGISTERED: AtomicI32 = AtomicI32::new(0);
const DONE: i32 = -1;

/// Registers the fork handlers, before the lock is first taken. Not a `std::sync::Once`: a child
/// forked while a thread registered would find it "running" for good. A child finds either the
/// handlers registered (their `child` marks it) or the registering process's pid, and registers
/// them itself.
fn register() {
    if REGISTERED.load(Ordering::Acquire) == DONE {
        return;
    }
    register_slow();
}

#[cold]
fn register_slow() {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    loop {
        match REGISTERED.load(Ordering::Acquire) {
            DONE => return,
            pid if pid == me => std::thread::yield_now(),
            other => {
                let won = REGISTERED
                    .compare_exchange(other, me, Ordering::Acquire, Ordering::Acquire)
                    .is_ok();
                if won {
                    // SAFETY: the handlers are `extern "C" fn()` that never unwind.
                    let rc =
                        unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
                    if rc != 0 {
                        eprintln!("hbmalloc: could not register the fork handlers ({rc})");
                    }
                    REGISTERED.store(DONE, Ordering::Release);
                    return;
                }
            }
        }
    }
}

extern "C" fn prepare() {
    // Forked from inside a set-up (the driver's initialisation may fork a helper): the lock is
    // this thread's already, and the child goes on with the set-up.
    let inside = DEPTH.with(Cell::get) > 0;
    if !inside {
        lock();
    }
    PREPARE_LOCKED.store(!inside, Ordering::Relaxed);
    let hooks = HOOKS.load(Ordering::Acquire);
    PREPARED.store(hooks, Ordering::Relaxed);
    // SAFETY: `HOOKS` holds null or a `&'static ForkHooks`.
    if let Some(hooks) = unsafe { hooks.as_ref() } {
        let _ = std::panic::catch_unwind(hooks.prepare);
    }
}

extern "C" fn parent() {
    after(|hooks| hooks.parent);
}

extern "C" fn child() {
    REGISTERED.store(DONE, Ordering::Release);
    after(|hooks| hooks.child);
}

fn after(which: fn(&ForkHooks) -> fn()) {
    let hooks = PREPARED.swap(std::ptr::null_mut(), Ordering::Relaxed);
    // SAFETY: `PREPARED` holds null or a `&'static ForkHooks`.
    if let Some(hooks) = unsafe { hooks.as_ref() } {
        let _ = std::panic::catch_unwind(which(hooks));
    }
    if PREPARE_LOCKED.swap(false, Ordering::Relaxed) {
        unlock();
    }
}

/// For tests: holds the first thread that runs the set-up named by `pause_in` inside it.
#[cfg(test)]
pub mod test_pause {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    static WHERE: Mutex<Option<(&'static str, Duration)>> = Mutex::new(None);
    static ENTERED: AtomicBool = AtomicBool::new(false);
    static LEFT: AtomicBool = AtomicBool::new(false);

    /// The next thread to run the set-up `name` sleeps `hold` inside it.
    pub fn pause_in(name: &'static str, hold: Duration) {
        *WHERE.lock().unwrap() = Some((name, hold));
    }

    /// Whether a thread has entered the paused set-up.
    pub fn entered() -> bool {
        ENTERED.load(Ordering::Acquire)
    }

    /// Called inside each set-up.
    pub(super) fn here(name: &'static str) {
        let hold = {
            let mut w = WHERE.lock().unwrap_or_else(|e| e.into_inner());
            match *w {
                Some((n, hold)) if n == name => {
                    *w = None;
                    hold
                }
                _ => return,
            }
        };
        ENTERED.store(true, Ordering::Release);
        std::thread::sleep(hold);
        LEFT.store(true, Ordering::Release);
    }

    /// Whether the paused thread has come out of its pause (still inside the set-up).
    pub fn left() -> bool {
        LEFT.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::InitCell;

    static OUTER: InitCell<i32> = InitCell::new("test::outer");
    static INNER: InitCell<i32> = InitCell::new("test::inner");
    static AFTER: InitCell<i32> = InitCell::new("test::after");

    /// A fork from inside a set-up (the driver's initialisation may fork a helper) does not wait
    /// for the set-up lock its own thread holds, and the child goes on with set-ups nested in
    /// it; in the parent the lock is free again afterwards. In a child process of the test
    /// binary: the lock is process-wide.
    #[test]
    fn a_fork_inside_a_set_up_does_not_wait_for_itself() {
        if !crate::test_child::is_child() {
            let text = crate::test_child::run_with_env(
                "process::init::tests::a_fork_inside_a_set_up_does_not_wait_for_itself",
                None,
                &[],
                std::time::Duration::from_secs(60),
            );
            assert!(text.contains("child checks passed"), "{text}");
            return;
        }
        let outer = *OUTER.get_or_init(|| {
            // SAFETY: the child only fills a cell and ends with `_exit`.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let code = if *INNER.get_or_init(|| 7) == 7 { 0 } else { 1 };
                // SAFETY: ends the child without running the parent's exit handlers.
                unsafe { libc::_exit(code) };
            }
            assert!(pid > 0, "fork failed");
            let mut status = 0;
            // SAFETY: `pid` is our child; `status` a valid out-parameter.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
            1
        });
        assert_eq!(outer, 1);
        // The lock is free: another thread sets up a cell of its own.
        let other = std::thread::spawn(|| *AFTER.get_or_init(|| 2))
            .join()
            .unwrap();
        assert_eq!(other, 2);
        println!("child checks passed");
    }
}
