//! `hbmalloc replay FILE`: a recorded allocation sequence (`HBMALLOC_CONF=trace:FILE`) run again
//! through hbmalloc's drop-in path, on whatever backend `HBMALLOC_CONF` selects (the simulated
//! device on a machine without a GPU), reporting memory held against memory in use.
//!
//! Each recorded thread is replayed on a thread of its own, in the recorded global order (a
//! thread waits for its turn), because the caching pool's behaviour depends on which thread
//! frees what. Every event uses the default stream: a recorded stream is a handle from another
//! process, so `cudaMallocAsync` events are counted and replayed as plain allocations.
//!
//! `--torch` replays every event through PyTorch's pluggable entry points instead, stream-ordered
//! on one stream, as `hbmalloc.torch.enable()` serves a program on its current stream;
//! `--event-lag N` (simulated device only) then keeps each free's event incomplete until N more
//! have been recorded, as a GPU that runs behind its host does.
//!
//! `--series FILE` also writes memory over the replay, in the format `bench/peer_bench.cpp`
//! writes for the other allocators (`# hbmalloc series v1`): at most 1000 lines
//! `<events done> <requested bytes live> <reserved bytes>`, each the highest figures of its
//! stretch of events, so the plots of `scripts/bench-table.py` keep every peak.

use clap::Args;
use hbmalloc::backend::DevicePtr;
use hbmalloc::pool::size_class::block_size;
use hbmalloc::runtime;
use hbmalloc::tracked::device::{self as alloc, Api};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Args)]
pub struct ReplayArgs {
    /// A trace written with HBMALLOC_CONF=trace:FILE.
    file: PathBuf,
    /// Replay on device N (default: each event's recorded device).
    #[arg(long)]
    device: Option<i32>,
    /// Also write memory in use and reserved over the replay to this file.
    #[arg(long, value_name = "FILE")]
    series: Option<PathBuf>,
    /// Replay through the pluggable allocator's entry points, on one stream.
    #[arg(long)]
    torch: bool,
    /// With --torch on the simulated device: a free's event completes N events later.
    #[arg(long, value_name = "N", requires = "torch")]
    event_lag: Option<usize>,
}

/// The stream of a `--torch` replay: a non-default stream, the same for every thread (a
/// program's current stream after `torch.cuda.set_stream`).
const TORCH_STREAM: usize = 0x7000;

/// The most points a series file holds.
const SERIES_POINTS: usize = 1000;

/// One point of `--series`: after event `event`, what the trace has live and the pool reserved.
#[derive(Clone, Copy)]
struct Sample {
    event: usize,
    requested: usize,
    reserved: u64,
}

#[derive(Clone, Copy)]
struct Event {
    alloc: bool,
    ptr: usize,
    size: usize,
    device: i32,
    /// Bytes the trace has live once this event is done (its requested sizes).
    requested_after: usize,
}

/// What the trace itself says: its events per thread and the exact peak of requested bytes.
struct Trace {
    threads: Vec<Vec<(usize, Event)>>,
    events: usize,
    on_streams: usize,
    /// Events on pinned host memory (device -1), which are not replayed.
    host: usize,
    peak_requested: usize,
    /// The same peak counted in the pool's block sizes (what rounding adds).
    peak_blocks: usize,
}

pub fn run(args: ReplayArgs) -> ExitCode {
    let trace = match read(&args.file, args.device) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("hbmalloc replay: {}: {e}", args.file.display());
            return ExitCode::FAILURE;
        }
    };
    if let Some(lag) = args.event_lag {
        hbmalloc::backend::sim::set_event_lag(lag);
    }
    let api = if args.torch {
        (Api::Torch, Some(TORCH_STREAM))
    } else {
        (Api::Runtime, None)
    };
    let turn = AtomicUsize::new(0);
    let live: Mutex<HashMap<usize, DevicePtr>> = Mutex::new(HashMap::new());
    let failed: Mutex<Option<String>> = Mutex::new(None);
    let samples: Option<Mutex<Vec<Sample>>> = args.series.as_ref().map(|_| Mutex::new(Vec::new()));
    let started = Instant::now();
    std::thread::scope(|s| {
        for events in &trace.threads {
            let (turn, live, failed, samples) = (&turn, &live, &failed, samples.as_ref());
            s.spawn(move || replay_thread(events, api, turn, live, failed, samples));
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        eprintln!("hbmalloc replay: {e}");
        return ExitCode::FAILURE;
    }
    if let (Some(path), Some(samples)) = (&args.series, samples) {
        let samples = samples.into_inner().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = std::fs::write(path, series_text(samples, trace.events)) {
            eprintln!("hbmalloc replay: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let devices: Vec<i32> = {
        let mut d: Vec<i32> = trace
            .threads
            .iter()
            .flatten()
            .map(|(_, e)| e.device)
            .collect();
        d.sort_unstable();
        d.dedup();
        d
    };
    let (mut peak_reserved, mut driver_calls, mut syncs) = (0u64, 0u64, 0u64);
    for d in devices {
        if let Ok(pool) = runtime::pool(d) {
            let s = pool.stats();
            peak_reserved += s.peak_reserved;
            driver_calls += s.driver_allocs + s.driver_frees;
            syncs += s.syncs;
        }
    }
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "replay {} events={} threads={} stream_events_on_default={} host_events_skipped={} \
         seconds={:.3} peak_requested_mib={:.1} peak_blocks_mib={:.1} peak_reserved_mib={:.1} \
         reserved_over_requested={:.3} driver_calls={driver_calls} syncs={syncs} entry={}",
        args.file.display(),
        trace.events,
        trace.threads.len(),
        trace.on_streams,
        trace.host,
        seconds,
        mib(trace.peak_requested as u64),
        mib(trace.peak_blocks as u64),
        mib(peak_reserved),
        peak_reserved as f64 / trace.peak_requested.max(1) as f64,
        match (args.torch, args.event_lag) {
            (false, _) => "cuda".to_string(),
            (true, None) => "torch".to_string(),
            (true, Some(lag)) => format!("torch-lag{lag}"),
        }
    );
    ExitCode::SUCCESS
}

fn replay_thread(
    events: &[(usize, Event)],
    (api, stream): (Api, Option<usize>),
    turn: &AtomicUsize,
    live: &Mutex<HashMap<usize, DevicePtr>>,
    failed: &Mutex<Option<String>>,
    samples: Option<&Mutex<Vec<Sample>>>,
) {
    for &(index, e) in events {
        while turn.load(Ordering::Acquire) != index {
            if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                return;
            }
            std::thread::yield_now();
        }
        let result = if e.alloc {
            alloc::alloc(e.device, e.size, stream, api)
                .map(|p| {
                    live.lock().expect("replay map").insert(e.ptr, p);
                })
                .map_err(|err| format!("event {index}: allocation of {} failed: {err}", e.size))
        } else {
            match live.lock().expect("replay map").remove(&e.ptr) {
                Some(p) => alloc::free(p, stream, api)
                    .map(|_| ())
                    .map_err(|err| format!("event {index}: free failed: {err:?}")),
                // A free of memory allocated before the trace began: nothing to replay.
                None => Ok(()),
            }
        };
        if let Err(msg) = result {
            *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
            turn.store(usize::MAX, Ordering::Release);
            return;
        }
        // Taken before the next event's turn, so the samples come in the trace's order. The
        // device's memory in use, as peer_bench reads it for the other allocators: not the
        // pool's statistics, whose reading samples the peak in use that the pool's reclaim
        // bound depends on (reading them every event changed the replay's own figures).
        if let Some(samples) = samples {
            let reserved = device_used(e.device) as u64;
            samples.lock().expect("replay samples").push(Sample {
                event: index + 1,
                requested: e.requested_after,
                reserved,
            });
        }
        turn.store(index + 1, Ordering::Release);
    }
}

/// Memory in use on `device` by what its backend says (free against total): what the pool holds
/// from the driver, as a read-only atomic load on the simulated device.
fn device_used(device: i32) -> usize {
    runtime::pool(device)
        .and_then(|p| p.backend().mem_info())
        .map_or(0, |(free, total)| total - free)
}

/// The series file: the samples in stretches of events, each stretch's highest figures.
fn series_text(samples: Vec<Sample>, events: usize) -> String {
    let stretch = events / SERIES_POINTS + 1;
    let mut text = String::from("# hbmalloc series v1: op in_use_bytes reserved_bytes\n");
    let mut i = 0;
    while i < samples.len() {
        let end = (samples[i].event / stretch + 1) * stretch;
        let (mut requested, mut reserved, mut last) = (0, 0, 0);
        while i < samples.len() && samples[i].event < end {
            requested = requested.max(samples[i].requested);
            reserved = reserved.max(samples[i].reserved);
            last = samples[i].event;
            i += 1;
        }
        text.push_str(&format!("{last} {requested} {reserved}\n"));
    }
    text
}

/// Parses a version-1 trace (`track::trace`): `time_ns thread a|f ptr size stream device`.
fn read(path: &std::path::Path, device: Option<i32>) -> Result<Trace, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut by_thread: HashMap<u32, usize> = HashMap::new();
    let mut threads: Vec<Vec<(usize, Event)>> = Vec::new();
    let (mut events, mut on_streams) = (0usize, 0usize);
    let (mut requested, mut peak_requested) = (0usize, 0usize);
    let (mut blocks, mut peak_blocks) = (0usize, 0usize);
    let mut host = 0usize;
    let mut sizes: HashMap<usize, usize> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() != 7 {
            return Err(bad("expected 7 fields"));
        }
        let thread: u32 = f[1].parse().map_err(|_| bad("thread"))?;
        let alloc = match f[2] {
            "a" => true,
            "f" => false,
            _ => return Err(bad("op is not a or f")),
        };
        let ptr = usize::from_str_radix(f[3], 16).map_err(|_| bad("ptr"))?;
        let size: usize = f[4].parse().map_err(|_| bad("size"))?;
        let stream = usize::from_str_radix(f[5], 16).map_err(|_| bad("stream"))?;
        let recorded_device: i32 = f[6].parse().map_err(|_| bad("device"))?;
        if size == 0 {
            return Err(bad("size 0"));
        }
        if recorded_device < 0 {
            host += 1;
            continue;
        }
        let block = block_size(size).ok_or_else(|| bad("size beyond any block"))?;
        if alloc {
            if sizes.insert(ptr, size).is_some() {
                return Err(bad("allocation of a pointer that is live"));
            }
            requested += size;
            blocks += block;
            peak_requested = peak_requested.max(requested);
            peak_blocks = peak_blocks.max(blocks);
        } else if let Some(s) = sizes.remove(&ptr) {
            requested -= s;
            blocks -= block_size(s).expect("checked at its allocation");
        }
        on_streams += usize::from(stream != 0);
        let slot = *by_thread.entry(thread).or_insert_with(|| {
            threads.push(Vec::new());
            threads.len() - 1
        });
        let e = Event {
            alloc,
            ptr,
            size,
            device: device.unwrap_or(recorded_device),
            requested_after: requested,
        };
        threads[slot].push((events, e));
        events += 1;
    }
    Ok(Trace {
        threads,
        events,
        on_streams,
        host,
        peak_requested,
        peak_blocks,
    })
}
