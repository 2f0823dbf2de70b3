//! Every adaptor over a backend passes the calls it does not change to its upstream, those with
//! a default body too (a default would otherwise run in place of the upstream's own).

use super::fault::{FaultPlan, Faulty};
use super::limit::Limited;
use super::reclaim::{Caches, Reclaiming};
use super::sim::SimBackend;
use super::*;
use std::sync::Mutex;

/// The simulated device, noting which of the defaulted calls reached it.
struct Recorder {
    sim: SimBackend,
    seen: Mutex<Vec<&'static str>>,
}

impl Recorder {
    fn saw(&self, call: &'static str) -> Result<()> {
        self.seen.lock().unwrap().push(call);
        Ok(())
    }
}

impl Backend for Recorder {
    forward_backend!(sim; name, device, alloc, free, mem_info, synchronize, event_record,
        event_done, event_release, vmm_granularity, vmm_reserve, vmm_release, vmm_map,
        vmm_unmap, copy_d2d, copy_to_host, copy_from_host, kv_append, kv_dequantize);
    fn copy_from_host_on(&self, _: DevicePtr, _: &[u8], _: Stream) -> Result<()> {
        self.saw("copy_from_host_on")
    }
    fn kv_append_jobs(
        &self,
        _: &[AppendJob],
        _: DevicePtr,
        _: HbmType,
        _: HbmType,
        _: Stream,
    ) -> Result<()> {
        self.saw("kv_append_jobs")
    }
    fn kv_dequantize_jobs(
        &self,
        _: &[GatherJob],
        _: DevicePtr,
        _: HbmType,
        _: HbmType,
        _: Stream,
    ) -> Result<()> {
        self.saw("kv_dequantize_jobs")
    }
    fn paged_decode_attention(&self, _: &DecodeAttention, _: Stream) -> Result<()> {
        self.saw("paged_decode_attention")
    }
    fn report_out_of_memory(&self, _: usize) {
        let _ = self.saw("report_out_of_memory");
    }
    fn stream_capture(&self, _: Stream) -> Result<Capture> {
        self.saw("stream_capture").map(|_| Capture::Active)
    }
    fn exchange_capture_mode(&self, _: CaptureMode) -> Result<CaptureMode> {
        self.saw("exchange_capture_mode")
            .map(|_| CaptureMode::ThreadLocal)
    }
}

struct NoCaches;
impl Caches for NoCaches {
    fn ticket(&self, _: i32) -> u64 {
        0
    }
    fn release_then(&self, _: i32, _: u64, _: usize, _: &mut dyn FnMut()) -> bool {
        false
    }
}

#[test]
fn adaptors_pass_defaulted_calls_to_their_upstream() {
    let attention = DecodeAttention {
        q: 0,
        out: 0,
        k: 0,
        v: 0,
        kv_type: HbmType::F16,
        k_row: 0,
        v_row: 0,
        block_table: 0,
        table_stride: 0,
        table_rows: 0,
        lens: 0,
        max_len: 0,
        n_seqs: 0,
        block_tokens: 16,
        n_heads: 1,
        n_kv_heads: 1,
        head_dim_k: 1,
        head_dim_v: 1,
        scale: 1.0,
    };
    type Wrap = fn(SharedBackend) -> SharedBackend;
    let wraps: [(&str, Wrap); 3] = [
        ("Limited", |u| Arc::new(Limited::new(u, 1 << 30))),
        ("Reclaiming", |u| {
            Arc::new(Reclaiming::new(u, Box::new(NoCaches)))
        }),
        ("Faulty", |u| Arc::new(Faulty::new(u, FaultPlan::default()))),
    ];
    for (adaptor, wrap) in wraps {
        let rec = Arc::new(Recorder {
            sim: SimBackend::new(0, 64 << 20),
            seen: Mutex::new(Vec::new()),
        });
        let b = wrap(rec.clone());
        b.copy_from_host_on(0, &[], 0).unwrap();
        b.kv_append_jobs(&[], 0, HbmType::F16, HbmType::F16, 0)
            .unwrap();
        b.kv_dequantize_jobs(&[], 0, HbmType::F16, HbmType::F16, 0)
            .unwrap();
        b.paged_decode_attention(&attention, 0).unwrap();
        b.report_out_of_memory(1);
        assert_eq!(
            b.stream_capture(0x10).unwrap(),
            Capture::Active,
            "{adaptor}"
        );
        assert_eq!(
            b.exchange_capture_mode(CaptureMode::Relaxed).unwrap(),
            CaptureMode::ThreadLocal,
            "{adaptor}"
        );
        let seen = rec.seen.lock().unwrap().clone();
        for call in [
            "copy_from_host_on",
            "kv_append_jobs",
            "kv_dequantize_jobs",
            "paged_decode_attention",
            "stream_capture",
            "exchange_capture_mode",
        ] {
            assert!(
                seen.contains(&call),
                "{adaptor} did not pass {call} on: {seen:?}"
            );
        }
        // Limited answers an out of memory itself (its limit line); the others pass it on.
        if adaptor != "Limited" {
            assert!(
                seen.contains(&"report_out_of_memory"),
                "{adaptor}: {seen:?}"
            );
        }
    }
}
