//! Byte strings as operation sequences on a `World`: the fuzz target `pool_ops` and its corpus
//! replay. The first bytes choose the setup (device size, stream safety, KV growth, scratch
//! limits, up to two injected faults); every later byte starts one operation, its arguments in
//! the bytes after it. Every invariant is checked after every operation, and at the end
//! everything is freed and trimmed and the device must have all its memory back.

use super::world::{Setup, World, KV_CTX, KV_SEQS};
use super::Bytes;
use crate::backend::fault::{FaultOp, FaultPlan, FaultRule};
use crate::config::StreamSafety;
use crate::kv::layout::Growth;

/// What one run did, for the figures the fuzzer's caller prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub operations: u64,
    pub failures: u64,
    pub faults_injected: u64,
}

const FAULT_OPS: [FaultOp; 6] = [
    FaultOp::Alloc,
    FaultOp::Reserve,
    FaultOp::Map,
    FaultOp::Access,
    FaultOp::Event,
    FaultOp::Sync,
];

/// A fault rule from two bytes: which call, and whether every later call fails too.
fn fault_rule(op: u8, when: u8) -> FaultRule {
    let first = 1 + (when & 0x3f) as u64;
    FaultRule {
        op: FAULT_OPS[op as usize % FAULT_OPS.len()],
        first,
        last: if when & 0x40 != 0 { u64::MAX } else { first },
    }
}

fn setup(input: &mut Bytes) -> Setup {
    let shape = input.u8();
    let mut faults = FaultPlan::default();
    for _ in 0..(shape >> 6).min(2) {
        let (op, when) = (input.u8(), input.u8());
        faults.rules.push(fault_rule(op, when));
    }
    Setup {
        capacity: [64 << 20, 256 << 20][(shape & 1) as usize],
        stream_safety: [
            StreamSafety::Batched,
            StreamSafety::Eager,
            StreamSafety::Off,
            StreamSafety::Batched,
        ][((shape >> 1) & 3) as usize],
        pending_limit: [Some(8 << 20), None][((shape >> 3) & 1) as usize],
        growth: [Growth::Vmm, Growth::Realloc][((shape >> 4) & 1) as usize],
        max_cached: 4,
        release_threshold: [usize::MAX, 16 << 20][((shape >> 5) & 1) as usize],
        faults,
    }
}

/// A size from the mix an inference step makes: small, medium or large (past a thread cache's
/// classes), occasionally an odd one.
fn size(input: &mut Bytes) -> usize {
    let kind = input.u8();
    let n = input.u16() as usize;
    match kind & 3 {
        0 => 1 + n,                            // up to 64 KiB
        1 => (n + 1) << 8,                     // up to 16 MiB
        2 => (32 << 20) + (n << 9),            // 32 to 64 MiB
        _ => 1 + (n % 4096) * (kind as usize), // odd sizes up to 1 MiB
    }
}

const STREAMS: [usize; 4] = [0, 2, 0x1000, 0x2000];

/// The `n`th element of a map's keys (wrapping), if any.
fn nth<V>(map: &std::collections::BTreeMap<usize, V>, n: usize) -> Option<usize> {
    (!map.is_empty()).then(|| *map.keys().nth(n % map.len()).expect("in range"))
}

/// Runs the operations `data` encodes; panics where an invariant breaks.
pub fn run(data: &[u8]) -> Summary {
    let mut input = Bytes::new(data);
    let setup = setup(&mut input);
    let mut world = World::new(&setup);
    world.faults.set_quiet(true);
    world.check();
    let mut operations = 0;
    // Bounded, so that a fuzzer's longest inputs still run in milliseconds.
    while !input.is_empty() && operations < 512 {
        operations += 1;
        let op = input.u8();
        let arg = input.u8() as usize;
        match op % 14 {
            0 => {
                let size = size(&mut input);
                world.pool_alloc(size, None)
            }
            1 => {
                let size = size(&mut input);
                world.pool_alloc(size, Some(STREAMS[arg % 4]))
            }
            2 | 3 => {
                if let Some(ptr) = nth(&world.live, arg) {
                    let stream = (op % 14 == 3).then_some(STREAMS[(arg >> 4) % 4]);
                    world.pool_free(ptr, stream);
                }
            }
            4 => world.pool_trim(),
            5 => {
                // A pointer inside a live block, a freed one or a stray one.
                let ptr = match nth(&world.live, arg) {
                    Some(p) if arg & 1 == 0 => p + 256 * (1 + arg),
                    Some(p) => p ^ 0x40_0000,
                    None => 0x7000_0000 + arg * 512,
                };
                world.pool_bad_free(ptr);
            }
            6 => {
                let size = size(&mut input);
                world.scratch_alloc(arg & 1, size)
            }
            7 => {
                if let Some(ptr) = nth(&world.scratch_live[arg & 1], arg >> 1) {
                    world.scratch_free(arg & 1, ptr);
                }
            }
            8 => world.scratch_trim(arg & 1),
            9 | 10 => {
                let tokens = input.u16() as u32 % (KV_CTX + 64);
                world.kv_reserve(arg as u32 % (KV_SEQS + 1), tokens)
            }
            11 => world.kv_release(arg as u32 % (KV_SEQS + 1)),
            12 => world.kv_trim(),
            _ => world.faults.set_armed(arg & 1 == 0),
        }
        if operations % 64 == 0 {
            world.check_full();
        } else {
            world.check();
        }
    }
    let summary = Summary {
        operations,
        failures: world.failures,
        faults_injected: world.faults.injected(),
    };
    world.drain();
    summary
}
