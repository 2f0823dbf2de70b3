//! CUDA driver backend (placeholder until the driver implementation lands).
