//! `HBMALLOC_CONF` as raw bytes (`hbmalloc::harness::conf`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hbmalloc::harness::conf::run(data);
});
