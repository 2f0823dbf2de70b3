//! A simulated device in host memory, so every path but the CUDA calls runs without a GPU.
//!
//! Memory comes from anonymous `mmap` (`MAP_NORESERVE`: a 16 GiB simulated card costs only the pages
//! touched), VMM reservations are `PROT_NONE` mappings whose pages `mprotect` commits, and the device
//! capacity is an accounting limit (`sim_capacity`), so out-of-memory paths are testable. Work is
//! synchronous here: events are complete when recorded (unless a test holds them, see
//! `hold_events`) and `synchronize` only counts. Stream capture is simulated as the driver
//! enforces it (`begin_capture`): while a stream captures, a call that would query or wait for
//! work, or allocate or free, from a thread whose capture mode is not relaxed, invalidates the
//! capture and fails.

use super::{check_kv_io, Backend, Capture, CaptureMode, DevicePtr, Event, KvRows, Stream};
use crate::dtype::quant::{dequantize_row, quantize_row};
use crate::dtype::HbmType;
use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// VMM granularity of the simulated device, the same as a real H100's.
pub const SIM_GRANULARITY: usize = 2 << 20;

/// Event handles, unique across simulated devices so that held ones can be told apart.
static NEXT_EVENT: AtomicUsize = AtomicUsize::new(0);
static HOLD_EVENTS: AtomicBool = AtomicBool::new(false);
static HELD_EVENTS: Mutex<Option<HashSet<Event>>> = Mutex::new(None);

/// For tests of stream-ordered reuse: from now on, events recorded on any simulated device stay
/// incomplete, as if their streams were busy, until `complete_held_events` (or a `synchronize`).
/// Process-wide: run such a test alone in its process.
pub fn hold_events() {
    HOLD_EVENTS.store(true, Ordering::SeqCst);
}

/// Completes every held event and stops holding new ones.
pub fn complete_held_events() {
    HOLD_EVENTS.store(false, Ordering::SeqCst);
    held_events().take();
}

/// Events recorded this many after an event complete it (0: every event is complete at once).
static EVENT_LAG: AtomicUsize = AtomicUsize::new(0);
/// Every event up to this one is complete: a synchronize ran after it was recorded.
static SYNCED_UPTO: AtomicUsize = AtomicUsize::new(0);

/// For replays of a device that runs behind its host: from now on an event completes once `lag`
/// more events have been recorded after it (on any simulated device), or a synchronize ran.
/// Process-wide, as events.
pub fn set_event_lag(lag: usize) {
    EVENT_LAG.store(lag, Ordering::SeqCst);
}

/// Whether the event lag still keeps `event` incomplete.
fn lagging(event: Event) -> bool {
    let lag = EVENT_LAG.load(Ordering::Relaxed);
    lag > 0
        && event > SYNCED_UPTO.load(Ordering::Acquire)
        && NEXT_EVENT.load(Ordering::Relaxed) < event.saturating_add(lag)
}

fn held_events() -> std::sync::MutexGuard<'static, Option<HashSet<Event>>> {
    HELD_EVENTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Streams being captured, with whether the capture was invalidated; events recorded into a
/// capture (they belong to the graph, and querying one is an error). Process-wide, as events.
struct Captures {
    streams: Vec<(Stream, bool)>,
    captured_events: Vec<Event>,
}

/// Streams in `CAPTURES` plus captured events: the calls skip the lock while it is 0.
static CAPTURE_ITEMS: AtomicUsize = AtomicUsize::new(0);

static CAPTURES: Mutex<Captures> = Mutex::new(Captures {
    streams: Vec::new(),
    captured_events: Vec::new(),
});

std::thread_local! {
    /// This thread's capture mode (`CaptureMode` as a number); no destructor.
    static MODE: std::cell::Cell<u32> = const { std::cell::Cell::new(CaptureMode::Global as u32) };
}

fn captures() -> std::sync::MutexGuard<'static, Captures> {
    CAPTURES.lock().unwrap_or_else(|e| e.into_inner())
}

/// For tests: `stream` begins a capture in the global mode (`cuStreamBeginCapture`).
pub fn begin_capture(stream: Stream) {
    captures().streams.push((stream, false));
    CAPTURE_ITEMS.fetch_add(1, Ordering::SeqCst);
}

/// Ends `stream`'s capture (`cuStreamEndCapture`): `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED`
/// (901) if a forbidden call broke it, as the driver's end of capture fails then.
pub fn end_capture(stream: Stream) -> Result<()> {
    let mut c = captures();
    let Some(i) = c.streams.iter().position(|&(s, _)| s == stream) else {
        return Err(Error::InvalidValue("stream is not capturing"));
    };
    let (_, invalidated) = c.streams.remove(i);
    CAPTURE_ITEMS.fetch_sub(1, Ordering::SeqCst);
    if invalidated {
        return Err(Error::Driver {
            call: "cuStreamEndCapture",
            code: 901,
        });
    }
    Ok(())
}

/// A call the driver forbids while a global-mode capture is under way, unless the calling
/// thread's mode is relaxed: it invalidates every capture and fails with
/// `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED` (900).
fn unsafe_during_capture(call: &'static str) -> Result<()> {
    if CAPTURE_ITEMS.load(Ordering::SeqCst) == 0
        || MODE.with(|m| m.get()) == CaptureMode::Relaxed as u32
    {
        return Ok(());
    }
    let mut c = captures();
    if c.streams.is_empty() {
        return Ok(());
    }
    for s in c.streams.iter_mut() {
        s.1 = true;
    }
    Err(Error::Driver { call, code: 900 })
}

pub struct SimBackend {
    device: i32,
    capacity: usize,
    /// Bytes allocated plus bytes committed inside reservations.
    used: AtomicUsize,
    /// Live `alloc` mappings and reservations, address -> length; lets `free` reject foreign pointers.
    mappings: Mutex<HashMap<DevicePtr, usize>>,
    syncs: AtomicUsize,
    /// How long `synchronize` takes, in microseconds (0: returns at once), as a device busy
    /// with queued work would.
    sync_latency_us: AtomicUsize,
}

impl SimBackend {
    pub fn new(device: i32, capacity: usize) -> SimBackend {
        SimBackend {
            device,
            capacity,
            used: AtomicUsize::new(0),
            mappings: Mutex::new(HashMap::new()),
            syncs: AtomicUsize::new(0),
            sync_latency_us: AtomicUsize::new(0),
        }
    }

    /// Makes every later `synchronize` take `latency`, as if work were queued on the device.
    pub fn set_sync_latency(&self, latency: std::time::Duration) {
        self.sync_latency_us
            .store(latency.as_micros() as usize, Ordering::Relaxed);
    }

    /// How many times `synchronize` ran: lets tests see when a pool waited for the device.
    pub fn sync_count(&self) -> usize {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Bytes the simulated device has handed out (allocations and committed VMM pages).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn charge(&self, size: usize) -> Result<()> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(size).filter(|n| *n <= self.capacity)
            })
            .map(|_| ())
            .map_err(|_| Error::OutOfMemory { requested: size })
    }

    fn refund(&self, size: usize) {
        self.used.fetch_sub(size, Ordering::AcqRel);
    }

    fn map_anonymous(&self, size: usize, prot: libc::c_int) -> Result<DevicePtr> {
        // SAFETY: a fresh private anonymous mapping aliases nothing; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::OutOfMemory { requested: size });
        }
        Ok(ptr as DevicePtr)
    }

    fn unmap_known(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        let known = self
            .mappings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ptr);
        match known {
            Some(len) if len == size => {
                // SAFETY: [ptr, ptr+len) is a mapping this backend made and nobody else unmaps.
                unsafe { libc::munmap(ptr as *mut libc::c_void, len) };
                Ok(())
            }
            Some(len) => {
                self.mappings
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(ptr, len);
                Err(Error::InvalidValue("size does not match the mapping"))
            }
            None => Err(Error::UnknownPointer(ptr)),
        }
    }

    /// Checks that [ptr, ptr+size) lies inside one reservation.
    fn check_reserved(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        let mappings = self.mappings.lock().unwrap_or_else(|e| e.into_inner());
        let inside = mappings
            .iter()
            .any(|(&base, &len)| ptr >= base && ptr.saturating_add(size) <= base + len);
        if inside && ptr % SIM_GRANULARITY == 0 && size % SIM_GRANULARITY == 0 {
            Ok(())
        } else {
            Err(Error::InvalidValue(
                "range is not granularity-aligned inside a reservation",
            ))
        }
    }
}

impl Backend for SimBackend {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn device(&self) -> i32 {
        self.device
    }

    fn lock_for_fork(&self) -> Option<Box<dyn super::Held + '_>> {
        let mappings = self.mappings.lock().unwrap_or_else(|e| e.into_inner());
        Some(Box::new((mappings, captures())))
    }

    fn alloc(&self, size: usize) -> Result<DevicePtr> {
        if size == 0 {
            return Err(Error::InvalidValue("zero-byte backend allocation"));
        }
        unsafe_during_capture("cuMemAlloc_v2")?;
        self.charge(size)?;
        match self.map_anonymous(size, libc::PROT_READ | libc::PROT_WRITE) {
            Ok(ptr) => {
                self.mappings
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(ptr, size);
                Ok(ptr)
            }
            Err(e) => {
                self.refund(size);
                Err(e)
            }
        }
    }

    fn free(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        unsafe_during_capture("cuMemFree_v2")?;
        self.unmap_known(ptr, size)?;
        self.refund(size);
        Ok(())
    }

    fn mem_info(&self) -> Result<(usize, usize)> {
        let used = self.used.load(Ordering::Acquire);
        Ok((self.capacity.saturating_sub(used), self.capacity))
    }

    fn synchronize(&self) -> Result<()> {
        unsafe_during_capture("cuCtxSynchronize")?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        SYNCED_UPTO.fetch_max(NEXT_EVENT.load(Ordering::Relaxed), Ordering::AcqRel);
        if HOLD_EVENTS.load(Ordering::Relaxed) {
            held_events().take();
        }
        let us = self.sync_latency_us.load(Ordering::Relaxed);
        if us > 0 {
            std::thread::sleep(std::time::Duration::from_micros(us as u64));
        }
        Ok(())
    }

    fn event_record(&self, stream: Stream) -> Result<Event> {
        let event = NEXT_EVENT.fetch_add(1, Ordering::Relaxed) + 1;
        if CAPTURE_ITEMS.load(Ordering::SeqCst) > 0 {
            // Recorded into the graph: legal, but the event then says nothing about the stream.
            let mut c = captures();
            if c.streams.iter().any(|&(s, _)| s == stream) {
                c.captured_events.push(event);
                CAPTURE_ITEMS.fetch_add(1, Ordering::SeqCst);
            }
        }
        if HOLD_EVENTS.load(Ordering::Relaxed) {
            held_events().get_or_insert_with(HashSet::new).insert(event);
        }
        Ok(event)
    }

    fn event_done(&self, event: Event) -> Result<bool> {
        unsafe_during_capture("cuEventQuery")?;
        if CAPTURE_ITEMS.load(Ordering::SeqCst) > 0 && captures().captured_events.contains(&event) {
            return Err(Error::Driver {
                call: "cuEventQuery",
                code: 900,
            });
        }
        if lagging(event) {
            return Ok(false);
        }
        Ok(held_events()
            .as_ref()
            .map_or(true, |held| !held.contains(&event)))
    }

    fn event_release(&self, event: Event) {
        if CAPTURE_ITEMS.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut c = captures();
        if let Some(i) = c.captured_events.iter().position(|&e| e == event) {
            c.captured_events.swap_remove(i);
            CAPTURE_ITEMS.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn stream_capture(&self, stream: Stream) -> Result<Capture> {
        if CAPTURE_ITEMS.load(Ordering::SeqCst) == 0 {
            return Ok(Capture::None);
        }
        Ok(
            match captures().streams.iter().find(|&&(s, _)| s == stream) {
                None => Capture::None,
                Some((_, false)) => Capture::Active,
                Some((_, true)) => Capture::Invalidated,
            },
        )
    }

    fn exchange_capture_mode(&self, mode: CaptureMode) -> Result<CaptureMode> {
        let old = MODE.with(|m| m.replace(mode as u32));
        Ok(match old {
            0 => CaptureMode::Global,
            1 => CaptureMode::ThreadLocal,
            _ => CaptureMode::Relaxed,
        })
    }

    fn vmm_granularity(&self) -> Option<usize> {
        Some(SIM_GRANULARITY)
    }

    fn vmm_reserve(&self, size: usize) -> Result<DevicePtr> {
        if size == 0 || size % SIM_GRANULARITY != 0 {
            return Err(Error::InvalidValue(
                "reservation size must be a multiple of the granularity",
            ));
        }
        // Over-map by one granule so the reservation can start on a granule boundary, as the
        // driver's do; the slack is trimmed at once.
        let raw = self.map_anonymous(size + SIM_GRANULARITY, libc::PROT_NONE)?;
        let base = raw.next_multiple_of(SIM_GRANULARITY);
        // SAFETY: both trimmed ranges lie inside the mapping just made and are not in use.
        unsafe {
            if base > raw {
                libc::munmap(raw as *mut libc::c_void, base - raw);
            }
            let tail = raw + size + SIM_GRANULARITY - (base + size);
            if tail > 0 {
                libc::munmap((base + size) as *mut libc::c_void, tail);
            }
        }
        self.mappings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(base, size);
        Ok(base)
    }

    fn vmm_release(&self, base: DevicePtr, size: usize) -> Result<()> {
        self.unmap_known(base, size)
    }

    fn vmm_map(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        self.check_reserved(ptr, size)?;
        self.charge(size)?;
        // SAFETY: the range lies inside one of this backend's reservations (checked above).
        let rc = unsafe {
            libc::mprotect(
                ptr as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if rc != 0 {
            self.refund(size);
            return Err(Error::OutOfMemory { requested: size });
        }
        Ok(())
    }

    fn vmm_unmap(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        self.check_reserved(ptr, size)?;
        // SAFETY: the range lies inside one of this backend's reservations; dropping its pages and
        // its access is what unmapping physical memory means here.
        unsafe {
            libc::madvise(ptr as *mut libc::c_void, size, libc::MADV_DONTNEED);
            libc::mprotect(ptr as *mut libc::c_void, size, libc::PROT_NONE);
        }
        self.refund(size);
        Ok(())
    }

    fn copy_d2d(&self, dst: DevicePtr, src: DevicePtr, size: usize, _stream: Stream) -> Result<()> {
        // SAFETY: callers pass ranges inside live allocations of this backend (host memory here);
        // `copy` allows overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, size) };
        Ok(())
    }

    fn copy_to_host(&self, dst: &mut [u8], src: DevicePtr) -> Result<()> {
        // SAFETY: as in copy_d2d; `dst` is a distinct host buffer.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy_from_host(&self, dst: DevicePtr, src: &[u8]) -> Result<()> {
        // SAFETY: as in copy_d2d; `src` is a distinct host buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn kv_append(
        &self,
        src: DevicePtr,
        src_type: HbmType,
        dst: &KvRows,
        _stream: Stream,
    ) -> Result<()> {
        let plain = KvRows::contiguous(src, src_type, dst.row_elems, dst.n_rows)?;
        check_kv_io(&plain, dst)?;
        convert_rows(&plain, dst)
    }

    fn kv_dequantize(
        &self,
        src: &KvRows,
        dst: DevicePtr,
        dst_type: HbmType,
        _stream: Stream,
    ) -> Result<()> {
        let plain = KvRows::contiguous(dst, dst_type, src.row_elems, src.n_rows)?;
        check_kv_io(&plain, src)?;
        convert_rows(src, &plain)
    }
}

/// The simulated device's KV kernels: each row goes through f32 with the CPU reference, which is
/// what `kernels/kv_quant.cu` computes on a GPU (decode exactly, then encode as `quantize_row`).
/// The rows were checked (`check_kv_io`); the work is synchronous, like every sim operation.
fn convert_rows(src: &KvRows, dst: &KvRows) -> Result<()> {
    let n = src.row_elems as usize;
    let (src_bytes, dst_bytes) = (
        src.ty.row_bytes(n).ok_or(Error::InvalidValue("bad row"))?,
        dst.ty.row_bytes(n).ok_or(Error::InvalidValue("bad row"))?,
    );
    let mut row = vec![0.0f32; n];
    for r in 0..src.n_rows as usize {
        // SAFETY: the caller of `kv_append`/`kv_dequantize` promises both row sets lie in live
        // memory of this device, which is host memory; the range cannot wrap (checked). The
        // shared borrow ends before the mutable one below begins, so overlap cannot alias.
        let s = unsafe {
            std::slice::from_raw_parts((src.ptr + r * src.stride) as *const u8, src_bytes)
        };
        dequantize_row(src.ty, s, &mut row)?;
        // SAFETY: as above, for the destination row.
        let d = unsafe {
            std::slice::from_raw_parts_mut((dst.ptr + r * dst.stride) as *mut u8, dst_bytes)
        };
        quantize_row(dst.ty, &row, d)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_enforced_and_refunded() {
        let sim = SimBackend::new(0, 8 << 20);
        let a = sim.alloc(6 << 20).unwrap();
        assert_eq!(a % 256, 0);
        assert_eq!(
            sim.alloc(4 << 20),
            Err(Error::OutOfMemory { requested: 4 << 20 })
        );
        assert_eq!(sim.mem_info().unwrap(), (2 << 20, 8 << 20));
        sim.free(a, 6 << 20).unwrap();
        assert_eq!(sim.used(), 0);
        assert!(
            sim.free(a, 6 << 20).is_err(),
            "double free of a mapping is refused"
        );
    }

    #[test]
    fn vmm_commit_makes_pages_usable_and_accounted() {
        let sim = SimBackend::new(0, 64 << 20);
        let base = sim.vmm_reserve(32 << 20).unwrap();
        assert_eq!(base % SIM_GRANULARITY, 0);
        assert_eq!(sim.used(), 0, "a reservation costs no memory");
        sim.vmm_map(base + SIM_GRANULARITY, SIM_GRANULARITY)
            .unwrap();
        assert_eq!(sim.used(), SIM_GRANULARITY);
        sim.copy_from_host(base + SIM_GRANULARITY, &[7u8; 64])
            .unwrap();
        let mut back = [0u8; 64];
        sim.copy_to_host(&mut back, base + SIM_GRANULARITY).unwrap();
        assert_eq!(back, [7u8; 64]);
        assert!(
            sim.vmm_map(base + 1, SIM_GRANULARITY).is_err(),
            "unaligned commit refused"
        );
        sim.vmm_unmap(base + SIM_GRANULARITY, SIM_GRANULARITY)
            .unwrap();
        assert_eq!(sim.used(), 0);
        sim.vmm_release(base, 32 << 20).unwrap();
    }
}
