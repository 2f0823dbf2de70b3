//! One-time initialisation that `fork` waits for.

/// For tests: holds the first thread that runs the initialisation named by `pause_in` inside it.
#[cfg(test)]
pub mod test_pause {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    static WHERE: Mutex<Option<(&'static str, Duration)>> = Mutex::new(None);
    static ENTERED: AtomicBool = AtomicBool::new(false);

    /// The next thread to run the initialisation `name` sleeps `hold` inside it.
    pub fn pause_in(name: &'static str, hold: Duration) {
        *WHERE.lock().unwrap() = Some((name, hold));
    }

    /// Whether a thread has entered the paused initialisation.
    pub fn entered() -> bool {
        ENTERED.load(Ordering::Acquire)
    }

    /// Called inside each named initialisation.
    pub fn here(name: &'static str) {
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
    }
}
