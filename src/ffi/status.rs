//! `HbmStatus`, the one status type of the C API, and the mappings into it and out of it.

use crate::error::Error;

/// Result of an `hbm_*` call (`HBM_STATUS_*` in C). Values are fixed forever: new ones are added, none is reused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HbmStatus {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullParameter = 1,
    /// An argument was out of range or inconsistent.
    InvalidValue = 2,
    /// The device could not supply the memory, even after cached memory was released.
    OutOfMemory = 3,
    /// The pointer was not allocated here, was already freed, or points inside a block.
    InvalidPointer = 4,
    /// The device lacks a feature the call needs.
    NotSupported = 5,
    /// No such device.
    InvalidDevice = 6,
    /// A CUDA driver call failed.
    DriverError = 7,
    /// An internal error was caught at the C boundary; the library stays usable.
    Panic = 8,
    /// Writing a report or file failed.
    IoError = 9,
}

impl HbmStatus {
    /// The status with number `value`, if there is one.
    pub fn from_c(value: i32) -> Option<HbmStatus> {
        use HbmStatus::*;
        [
            Ok,
            NullParameter,
            InvalidValue,
            OutOfMemory,
            InvalidPointer,
            NotSupported,
            InvalidDevice,
            DriverError,
            Panic,
            IoError,
        ]
        .into_iter()
        .find(|s| *s as i32 == value)
    }
}

impl From<&Error> for HbmStatus {
    fn from(e: &Error) -> HbmStatus {
        match e {
            Error::OutOfMemory { .. } => HbmStatus::OutOfMemory,
            Error::InvalidValue(_) => HbmStatus::InvalidValue,
            Error::DoubleFree(_) | Error::UnknownPointer(_) | Error::InteriorPointer { .. } => {
                HbmStatus::InvalidPointer
            }
            Error::NotSupported(_) => HbmStatus::NotSupported,
            Error::InvalidDevice(_) => HbmStatus::InvalidDevice,
            Error::Driver { .. } => HbmStatus::DriverError,
        }
    }
}

impl<T> From<Result<T, Error>> for HbmStatus {
    fn from(r: Result<T, Error>) -> HbmStatus {
        match r {
            Ok(_) => HbmStatus::Ok,
            Err(e) => HbmStatus::from(&e),
        }
    }
}

/// `cudaError_t` values the interposed entry points return.
pub mod cuda_error {
    pub const SUCCESS: i32 = 0;
    pub const INVALID_VALUE: i32 = 1;
    pub const MEMORY_ALLOCATION: i32 = 2;
    /// The runtime could not be initialised: here, its own function to forward to is missing.
    pub const INITIALIZATION_ERROR: i32 = 3;
    /// No CUDA driver is installed (the runtime's answer to every call then).
    pub const INSUFFICIENT_DRIVER: i32 = 35;
    /// A driver, but no usable device.
    pub const NO_DEVICE: i32 = 100;
    pub const INVALID_DEVICE: i32 = 101;
    pub const NOT_SUPPORTED: i32 = 801;
    pub const UNKNOWN: i32 = 999;
}

/// The `cudaError_t` the CUDA runtime would return for the same failure.
pub fn to_cuda_error(e: &Error) -> i32 {
    match e {
        Error::OutOfMemory { .. } => cuda_error::MEMORY_ALLOCATION,
        Error::InvalidValue(_)
        | Error::UnknownPointer(_)
        | Error::DoubleFree(_)
        | Error::InteriorPointer { .. } => cuda_error::INVALID_VALUE,
        Error::InvalidDevice(_) => cuda_error::INVALID_DEVICE,
        Error::NotSupported(_) => cuda_error::NOT_SUPPORTED,
        // The runtime reports a driver failure under the driver's own number: every CUresult
        // has the cudaError_t of the same value (1 invalid value, 2 out of memory, 100 no device,
        // 201 invalid context/device uninitialised, 700 illegal address, ...).
        Error::Driver { code, .. } if (1..=999).contains(code) => *code,
        Error::Driver { .. } => cuda_error::UNKNOWN,
    }
}

/// Static text for a status; never NULL, valid for the life of the process.
pub fn status_text(status: HbmStatus) -> &'static std::ffi::CStr {
    match status {
        HbmStatus::Ok => c"success",
        HbmStatus::NullParameter => c"a required pointer argument was NULL",
        HbmStatus::InvalidValue => c"an argument was out of range or inconsistent",
        HbmStatus::OutOfMemory => c"out of device memory",
        HbmStatus::InvalidPointer => {
            c"pointer not allocated by hbmalloc, already freed, or interior"
        }
        HbmStatus::NotSupported => c"not supported by this device",
        HbmStatus::InvalidDevice => c"no such device",
        HbmStatus::DriverError => c"a CUDA driver call failed",
        HbmStatus::Panic => c"internal error caught at the C boundary",
        HbmStatus::IoError => c"could not write the file",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_numbers_pass_through() {
        let driver = |code| {
            to_cuda_error(&Error::Driver {
                call: "cuTest",
                code,
            })
        };
        for code in [1, 2, 3, 4, 100, 101, 201, 400, 700, 719, 801, 999] {
            assert_eq!(driver(code), code);
        }
        assert_eq!(driver(0), cuda_error::UNKNOWN, "success is no failure");
        assert_eq!(driver(-5), cuda_error::UNKNOWN);
        assert_eq!(driver(100_000), cuda_error::UNKNOWN);
    }
}
