//! Stream safety proven by an oracle: a backend over the simulated device stamps every free,
//! every synchronize's start and end, and every event's record and completion with one sequence
//! number, and every allocation the caching pool hands out is checked against them.
//!
//! The rule, as the CUDA runtime keeps it: memory freed with `cudaFree` may be handed out again
//! only after a device synchronize that began after the free has ended (work queued before the
//! free has then finished). Memory freed with `cudaFreeAsync(p, s)` may be handed out at once to
//! an allocation on `s`, and elsewhere once the event recorded at the free has completed, or
//! after such a synchronize. The oracle's events complete late (after a random number of
//! queries), so the pool's event paths run, and in stream order, as CUDA's do: once an event
//! completes, so has every event recorded before it on its stream (whether or not the pool still
//! holds them), since the stream has passed them.
//!
//! Seen to fail (2026-12-04) under each of these mutations of the epoch logic: `end_sync`
//! completing `started + 2`; `credit` completing `epoch + 2`; `credit` crediting a closed epoch
//! whose mark equals the pool's completed epoch (`>` for `>=`); the pool's synchronize completing
//! `started + 2`; and `cudaFreeAsync` stamping its block one epoch early. Seen to fail
//! (2026-12-04) when the arena's merge of a stream's freed neighbours kept the older event.

use hbmalloc::backend::sim::SimBackend;
use hbmalloc::backend::{Backend, DevicePtr, Event, Stream};
use hbmalloc::config::StreamSafety;
use hbmalloc::error::Result;
use hbmalloc::pool::{CachingPool, PoolSettings};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the oracle saw, in sequence numbers.
#[derive(Default)]
struct Log {
    /// (start, end) of every synchronize that returned.
    syncs: Vec<(u64, u64)>,
    /// Events still pending: queries left before they complete.
    pending: HashMap<Event, u32>,
    /// Completed events: the sequence number of their completion.
    done: HashMap<Event, u64>,
    /// Every event's stream (the default and per-thread handles with their thread: per-thread
    /// default streams are one stream per thread) and the sequence number of its record.
    recorded: HashMap<Event, ((Stream, Option<std::thread::ThreadId>), u64)>,
    /// The event the last `event_record` of each thread returned.
    last_event: HashMap<std::thread::ThreadId, Event>,
    rng: u64,
}

struct Oracle {
    sim: SimBackend,
    seq: AtomicU64,
    log: Mutex<Log>,
}

impl Oracle {
    fn new(seed: u64) -> Oracle {
        Oracle {
            sim: SimBackend::new(0, 1 << 34),
            seq: AtomicU64::new(1),
            log: Mutex::new(Log {
                rng: seed | 1,
                ..Log::default()
            }),
        }
    }

    fn tick(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    /// True if a synchronize that began after `after` ended before `before`.
    fn synced_between(&self, after: u64, before: u64) -> bool {
        let log = self.log.lock().unwrap();
        log.syncs.iter().any(|&(s, e)| s > after && e < before)
    }

    fn completed_before(&self, event: Event, before: u64) -> bool {
        let log = self.log.lock().unwrap();
        log.done.get(&event).is_some_and(|&d| d < before)
    }

    fn take_last_event(&self) -> Option<Event> {
        let me = std::thread::current().id();
        self.log.lock().unwrap().last_event.remove(&me)
    }
}

impl Backend for Oracle {
    hbmalloc::forward_backend!(sim; alloc, free, mem_info, vmm_reserve, vmm_release, vmm_map, vmm_unmap, copy_d2d, copy_to_host, copy_from_host, kv_append, kv_dequantize);
    fn name(&self) -> &'static str {
        "oracle"
    }
    fn device(&self) -> i32 {
        0
    }
    fn synchronize(&self) -> Result<()> {
        let start = self.tick();
        self.sim.synchronize()?;
        let mut log = self.log.lock().unwrap();
        // A device synchronize completes every event recorded before it began.
        let covered: Vec<Event> = log
            .recorded
            .iter()
            .filter(|(e, &(_, at))| at < start && !log.done.contains_key(e))
            .map(|(&e, _)| e)
            .collect();
        let end = self.tick();
        for e in covered {
            log.pending.remove(&e);
            log.done.insert(e, end);
        }
        log.syncs.push((start, end));
        Ok(())
    }
    fn event_record(&self, stream: Stream) -> Result<Event> {
        let e = self.sim.event_record(stream)?;
        let at = self.tick();
        let mut log = self.log.lock().unwrap();
        let thread = matches!(stream, 0 | 2).then(|| std::thread::current().id());
        log.recorded.insert(e, ((stream, thread), at));
        log.rng ^= log.rng << 13;
        log.rng ^= log.rng >> 7;
        log.rng ^= log.rng << 17;
        let late = (log.rng % 4) as u32;
        log.pending.insert(e, late);
        log.done.remove(&e);
        log.last_event.insert(std::thread::current().id(), e);
        Ok(e)
    }
    fn event_done(&self, event: Event) -> Result<bool> {
        let mut log = self.log.lock().unwrap();
        if log.done.contains_key(&event) {
            return Ok(true);
        }
        match log.pending.get_mut(&event) {
            Some(0) => {
                let at = self.tick();
                // The stream has passed this event, and so every one recorded before it there.
                let (stream, recorded_at) = log.recorded[&event];
                let passed: Vec<Event> = log
                    .recorded
                    .iter()
                    .filter(|(e, &(s, r))| {
                        s == stream && r <= recorded_at && !log.done.contains_key(e)
                    })
                    .map(|(&e, _)| e)
                    .collect();
                for e in passed {
                    log.pending.remove(&e);
                    log.done.insert(e, at);
                }
                Ok(true)
            }
            Some(n) => {
                *n -= 1;
                Ok(false)
            }
            None => Ok(true),
        }
    }
    fn event_release(&self, event: Event) {
        // Nothing queries a released event again, but its stream still passes it: it stays in
        // the log, to complete with a later event of its stream or a synchronize.
        self.sim.event_release(event)
    }
    fn vmm_granularity(&self) -> Option<usize> {
        None
    }
}

/// How a freed range may be reused: after a synchronize begun after `at`, or (async) at once
/// on `stream`, or elsewhere after `event` completed.
#[derive(Clone, Copy)]
struct Freed {
    end: DevicePtr,
    at: u64,
    asynch: Option<(Stream, Option<Event>)>,
}

/// Freed ranges by start address, shared by the threads of one run.
#[derive(Default)]
struct Ledger {
    freed: BTreeMap<DevicePtr, Freed>,
}

impl Ledger {
    fn note_free(&mut self, ptr: DevicePtr, size: usize, f: Freed) {
        let overlapping: Vec<DevicePtr> = self.overlapping(ptr, ptr + size);
        for start in overlapping {
            self.freed.remove(&start);
        }
        self.freed.insert(
            ptr,
            Freed {
                end: ptr + size,
                ..f
            },
        );
    }

    fn overlapping(&self, lo: DevicePtr, hi: DevicePtr) -> Vec<DevicePtr> {
        self.freed
            .range(..hi)
            .rev()
            // Freed ranges never overlap one another, so their ends rise with their starts.
            .take_while(|(_, f)| f.end > lo)
            .map(|(&s, _)| s)
            .collect()
    }
}

/// Checks one allocation handed out at `now` for `stream` (None: `cudaMalloc`).
fn check_reuse(
    oracle: &Oracle,
    ledger: &Mutex<Ledger>,
    ptr: DevicePtr,
    size: usize,
    stream: Option<Stream>,
    now: u64,
) {
    let mut l = ledger.lock().unwrap();
    for start in l.overlapping(ptr, ptr + size) {
        let f = l.freed[&start];
        let synced = oracle.synced_between(f.at, now);
        let ok = synced
            || match f.asynch {
                Some((s, _)) if stream == Some(s) => true,
                Some((_, Some(e))) => oracle.completed_before(e, now),
                _ => false,
            };
        assert!(
            ok,
            "block {ptr:#x}+{size} handed out at {now} (stream {stream:?}) overlaps \
             {start:#x}..{:#x} freed at {} ({}) with no synchronize begun after the free \
             and ended before the reuse",
            f.end,
            f.at,
            match f.asynch {
                Some((s, e)) => format!("cudaFreeAsync on {s:#x}, event {e:?}"),
                None => "cudaFree".into(),
            }
        );
        if start >= ptr && f.end <= ptr + size {
            l.freed.remove(&start);
        }
    }
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn size(rng: &mut Rng) -> usize {
    match rng.below(8) {
        0..=4 => 512 + rng.below(128 << 10) as usize,
        5 | 6 => (1 << 20) + rng.below(12 << 20) as usize,
        _ => (33 << 20) + rng.below(24 << 20) as usize,
    }
}

const STREAMS: [Stream; 3] = [0x1000, 0x2000, 0x3000];

/// One thread's random operations: `cudaMalloc`/`cudaFree` and their async siblings mixed.
fn churn(pool: &CachingPool, oracle: &Oracle, ledger: &Mutex<Ledger>, seed: u64, ops: usize) {
    let mut rng = Rng(seed | 1);
    let mut live: Vec<(DevicePtr, usize, Option<Stream>)> = Vec::new();
    for _ in 0..ops {
        if live.len() < 48 && (live.is_empty() || rng.below(100) < 55) {
            let n = size(&mut rng);
            let stream = (rng.below(3) == 0).then(|| STREAMS[rng.below(3) as usize]);
            let (ptr, block) = match stream {
                Some(s) => pool.alloc_async_unchecked(n, s).unwrap(),
                None => pool.alloc_unchecked(n).unwrap(),
            };
            let now = oracle.tick();
            check_reuse(oracle, ledger, ptr, block, stream, now);
            live.push((ptr, block, stream));
        } else {
            let i = rng.below(live.len() as u64) as usize;
            let (ptr, block, _) = live.swap_remove(i);
            let asynch = rng.below(3) == 0;
            let at = oracle.tick();
            if asynch {
                let s = STREAMS[rng.below(3) as usize];
                // The ledger is held across the free: the event is known only once the pool has
                // the block, and a thread that gets the block at once (on `s`) must find the free
                // noted when it checks, else a late note outlives its reuse.
                let mut l = ledger.lock().unwrap();
                pool.free_async_unchecked(ptr, block, s);
                let event = oracle.take_last_event();
                l.note_free(
                    ptr,
                    block,
                    Freed {
                        end: 0,
                        at,
                        asynch: Some((s, event)),
                    },
                );
            } else {
                // The record first, as the tracker takes it before the pool has the block.
                ledger.lock().unwrap().note_free(
                    ptr,
                    block,
                    Freed {
                        end: 0,
                        at,
                        asynch: None,
                    },
                );
                pool.free_unchecked(ptr, block);
            }
        }
        if rng.below(500) == 0 {
            pool.trim().unwrap();
        }
    }
    for (ptr, block, _) in live {
        pool.free_unchecked(ptr, block);
    }
}

fn run(threads: u64, ops: usize, seed: u64) -> (u64, usize) {
    let oracle = Arc::new(Oracle::new(seed));
    let pool = CachingPool::new(
        oracle.clone(),
        PoolSettings {
            stream_safety: StreamSafety::Batched,
            pending_limit: Some(8 << 20),
        },
    );
    let ledger = Mutex::new(Ledger::default());
    std::thread::scope(|s| {
        for t in 0..threads {
            let (pool, oracle, ledger) = (&pool, &*oracle, &ledger);
            s.spawn(move || churn(pool, oracle, ledger, seed ^ ((t + 1) * 0x9e37_79b9), ops));
        }
    });
    pool.check();
    let syncs = oracle.log.lock().unwrap().syncs.len();
    (pool.stats().pool_hits, syncs)
}

#[test]
fn one_thread_reuses_nothing_before_its_synchronize_or_event() {
    for seed in 1..=4 {
        let (hits, syncs) = run(1, 20_000, seed);
        // The oracle proves something only if reuse and synchronizes both happened.
        assert!(hits > 5_000 && syncs > 10, "hits {hits}, syncs {syncs}");
    }
}

#[test]
fn threads_reuse_nothing_before_a_synchronize_or_event() {
    let (hits, syncs) = run(6, 8_000, 77);
    assert!(hits > 10_000 && syncs > 10, "hits {hits}, syncs {syncs}");
}
