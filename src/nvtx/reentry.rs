//! Re-entrancy guard for calls into the tool. A tool may allocate device memory while it
//! initializes or registers a heap; under `LD_PRELOAD` its `cudaMalloc` reaches our hooks, whose
//! pool would annotate again on the same thread: spinning on the look-up this thread is doing,
//! or locking the book it already holds. While a thread is inside the tool, its own nested
//! allocations and frees are simply not annotated.

use std::cell::Cell;

thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// This thread is inside a call to the tool until it is dropped.
pub struct Inside(());

impl Inside {
    /// `None` when this thread is already inside one (the call must not annotate).
    pub fn enter() -> Option<Inside> {
        // `then`, not `then_some`: a guard built and dropped on refusal would clear the flag.
        INSIDE
            .try_with(|inside| (!inside.replace(true)).then(|| Inside(())))
            .ok()
            .flatten()
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        let _ = INSIDE.try_with(|inside| inside.set(false));
    }
}

#[cfg(test)]
mod tests {
    use super::Inside;

    #[test]
    fn a_thread_inside_cannot_enter_again_until_it_leaves() {
        let outer = Inside::enter().expect("not inside yet");
        assert!(Inside::enter().is_none(), "nested entry refused");
        assert!(
            Inside::enter().is_none(),
            "and a refusal leaves this thread inside"
        );
        // Another thread is not inside.
        std::thread::spawn(|| assert!(Inside::enter().is_some()))
            .join()
            .unwrap();
        drop(outer);
        assert!(Inside::enter().is_some(), "free again once left");
    }
}
