//! The one guard every exported body runs in: a panic becomes a return value, never an abort.

/// Runs `$body` (an expression) and returns its value; if it panics, returns `$on_panic` instead.
///
/// `panic = "unwind"` in Cargo.toml is what makes this work; with "abort" nothing is caught.
/// The default panic hook still prints the message once, which is the diagnostic we want.
#[allow(unused_macros)]
macro_rules! ffi_guard {
    ($on_panic:expr, $body:expr) => {{
        match ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| $body)) {
            Ok(value) => value,
            Err(_) => $on_panic,
        }
    }};
}

#[allow(unused_imports)]
pub(crate) use ffi_guard;
