//! Operation sequences on the caching pool, the scratch pools, a KV cache and the tracker over
//! the simulated device, with injected driver faults; every invariant checked after each step
//! (`hbmalloc::harness::ops`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hbmalloc::harness::ops::run(data);
});
