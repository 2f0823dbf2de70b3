//! Checked runs over arbitrary bytes, shared by the fuzz targets (`fuzz/`, cargo-fuzz) and by
//! the ordinary tests that replay their seed corpus on stable Rust (`tests/fuzz_corpus.rs`).
//!
//! Each `run` takes any bytes and either returns or panics; a panic is a bug found. `ops` drives
//! every consumer of device memory on the simulated device (with injected faults) and checks
//! every invariant after each step; `conf` parses `HBMALLOC_CONF` from raw bytes; `model_files`
//! feeds the GGUF and safetensors readers and the estimator.

pub mod conf;
pub mod model_files;
pub mod ops;
pub mod world;

/// Reads a fuzz input front to back; past the end every read is 0, so any input is complete.
pub struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Bytes<'a> {
        Bytes { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
}
