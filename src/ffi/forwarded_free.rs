//! The one free path of memory the runtime handed out and hbmalloc only records (arrays,
//! registered host ranges): take the record, let the runtime free, put the record back if it
//! refuses. Shared by `cuda_array_api` and `cuda_register_api`.

use super::cuda_api::{fail, CudaError};
use super::status::{cuda_error, to_cuda_error};
use crate::tracked::{self, forwarded, FreeError, Want};

/// Frees `key` through `call` (`cudaFreeArray`, `cudaHostUnregister`), whose records `want`
/// names. `runtime(known)` frees it and returns the answer; `known` says whether we held a record
/// (the simulated device decides from that alone; the real runtime decides for itself, and may
/// own what was allocated before hbmalloc was loaded). A refusal leaves everything as it was.
pub(super) fn free_through_runtime(
    call: &str,
    key: usize,
    want: Want,
    runtime: impl FnOnce(bool) -> CudaError,
) -> CudaError {
    match forwarded::take_record(key, want, call) {
        Ok(live) => {
            let rc = runtime(true);
            if rc != cuda_error::SUCCESS {
                tracked::restore(key, live);
                eprintln!("hbmalloc: {call}({key:#x}): the CUDA runtime refused (error {rc})");
            }
            fail(rc)
        }
        Err(FreeError::Unknown(_)) => {
            let rc = runtime(false);
            if rc != cuda_error::SUCCESS {
                tracked::reject_unknown(key);
                eprintln!(
                    "hbmalloc: {call}({key:#x}): nothing hbmalloc recorded starts there, and the \
                     CUDA runtime refused it (error {rc}); nothing freed"
                );
            }
            fail(rc)
        }
        Err(FreeError::WrongKind(_)) => fail(cuda_error::INVALID_VALUE),
        Err(FreeError::Refused(e)) => fail(to_cuda_error(&e)),
    }
}
