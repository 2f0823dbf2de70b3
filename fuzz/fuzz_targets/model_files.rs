//! GGUF and safetensors files through the readers, the estimate and the planner
//! (`hbmalloc::harness::model_files`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hbmalloc::harness::model_files::run(data);
});
