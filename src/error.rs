//! The crate's internal error type. `ffi::status` maps it to `HbmStatus` and to `cudaError_t`.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The device (or the simulated device) could not supply the memory.
    OutOfMemory { requested: usize },
    /// An argument is out of range or inconsistent; the text says which.
    InvalidValue(&'static str),
    /// A pointer that this allocator never handed out (or already took back).
    UnknownPointer(usize),
    /// The start of a block that was already freed.
    DoubleFree(usize),
    /// A pointer inside a block, not its start.
    InteriorPointer { ptr: usize, block: usize },
    /// The device lacks what the call needs (VMM, for instance).
    NotSupported(&'static str),
    /// No such device.
    InvalidDevice(i32),
    /// A driver call failed; `code` is its `CUresult`.
    Driver { call: &'static str, code: i32 },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::OutOfMemory { requested } => {
                write!(f, "out of memory allocating {requested} bytes")
            }
            Error::InvalidValue(why) => write!(f, "invalid value: {why}"),
            Error::UnknownPointer(p) => write!(
                f,
                "pointer {p:#x} was not allocated by hbmalloc or is already freed"
            ),
            Error::DoubleFree(p) => write!(f, "pointer {p:#x} was already freed"),
            Error::InteriorPointer { ptr, block } => {
                write!(
                    f,
                    "pointer {ptr:#x} points inside the block at {block:#x}, not to its start"
                )
            }
            Error::NotSupported(what) => write!(f, "not supported: {what}"),
            Error::InvalidDevice(d) => write!(f, "invalid device {d}"),
            Error::Driver { call, code } => write!(f, "{call} failed with CUresult {code}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
