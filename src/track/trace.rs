//! `trace:FILE`: one text line per allocation and free, for replaying a real program's allocation
//! sequence against other allocators (`bench/peer_bench.cpp`, case `replay:FILE`).
//!
//! Format (version 1), after a `#` header line, one event per line, fields separated by a space:
//! `<time_ns> <thread> <a|f> <ptr> <size> <stream> <device>`, with `ptr` and `stream` in hex.
//! `time_ns` counts from the tracker's start, `thread` is the kernel thread id, `ptr` names the
//! allocation (a later allocation may reuse it once it is freed), and a free repeats the size,
//! stream and device of its allocation.
//!
//! Cost: one uncontended mutex and a formatted line into a 1 MiB buffer per event (~0.1 us), cheap
//! enough for a real run but not free, so it is off unless asked for. The buffer is written when it
//! fills and at exit; events after the exit flush (static destructors freeing memory) are written
//! one line at a time. A write error stops the trace with one line on stderr, never the program.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const BUFFER: usize = 1 << 20;

pub struct Trace {
    path: PathBuf,
    out: Mutex<Sink>,
}

struct Sink {
    writer: Option<BufWriter<File>>,
    /// After the exit flush: write through, so nothing waits in a buffer nobody flushes.
    unbuffered: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Alloc,
    Free,
}

/// One traced event, as `record` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    pub time_ns: u64,
    pub thread: u32,
    pub op: Op,
    pub ptr: usize,
    pub size: u64,
    pub stream: usize,
    pub device: i32,
}

impl Trace {
    /// Creates (truncates) `path` and writes the header line.
    pub fn create(path: &Path) -> std::io::Result<Trace> {
        let mut writer = BufWriter::with_capacity(BUFFER, File::create(path)?);
        writeln!(
            writer,
            "# hbmalloc trace v1: time_ns thread op ptr size stream device"
        )?;
        Ok(Trace {
            path: path.to_path_buf(),
            out: Mutex::new(Sink {
                writer: Some(writer),
                unbuffered: false,
            }),
        })
    }

    pub fn record(&self, e: &TraceEvent) {
        // A panic elsewhere while the lock was held poisons it; the trace is still well-formed.
        let mut sink = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let unbuffered = sink.unbuffered;
        let Some(w) = sink.writer.as_mut() else {
            return;
        };
        let op = match e.op {
            Op::Alloc => 'a',
            Op::Free => 'f',
        };
        let written = writeln!(
            w,
            "{} {} {op} {:x} {} {:x} {}",
            e.time_ns, e.thread, e.ptr, e.size, e.stream, e.device
        )
        .and_then(|()| if unbuffered { w.flush() } else { Ok(()) });
        if let Err(err) = written {
            self.fail(&mut sink, &err);
        }
    }

    /// Writes what is buffered; from then on every event is written as it comes (the process is
    /// exiting and nobody flushes later).
    pub fn flush_at_exit(&self) {
        let mut sink = self.out.lock().unwrap_or_else(|p| p.into_inner());
        sink.unbuffered = true;
        if let Some(Err(err)) = sink.writer.as_mut().map(|w| w.flush()) {
            self.fail(&mut sink, &err);
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fail(&self, sink: &mut Sink, err: &std::io::Error) {
        sink.writer = None;
        eprintln!(
            "hbmalloc: trace file {}: {err}; the trace stops here",
            self.path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(op: Op, ptr: usize) -> TraceEvent {
        TraceEvent {
            time_ns: 1500,
            thread: 42,
            op,
            ptr,
            size: 4096,
            stream: 0x7f00,
            device: 0,
        }
    }

    #[test]
    fn writes_a_header_and_one_line_per_event() {
        let dir = std::env::temp_dir().join(format!("hbm-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.trace");
        let trace = Trace::create(&path).unwrap();
        trace.record(&event(Op::Alloc, 0xabc000));
        trace.record(&event(Op::Free, 0xabc000));
        trace.flush_at_exit();
        // Written through after the exit flush, without another flush.
        trace.record(&event(Op::Alloc, 0xdef000));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("# hbmalloc trace v1"));
        assert_eq!(lines[1], "1500 42 a abc000 4096 7f00 0");
        assert_eq!(lines[2], "1500 42 f abc000 4096 7f00 0");
        assert_eq!(lines[3], "1500 42 a def000 4096 7f00 0");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_tracker_traces_each_allocation_and_free_with_its_stream() {
        use crate::track::{Origin, Settings, Tracker};
        let path = std::env::temp_dir().join(format!("hbm-tracker-{}.trace", std::process::id()));
        let t = Tracker::new(Settings {
            trace: Some(path.clone()),
            backtrace: false,
            ..Settings::default()
        });
        t.on_alloc(0x10000, 512, 0, 0x77, Origin::CudaMallocAsync);
        t.on_alloc(0x20000, 1024, 1, 0, Origin::CudaMalloc);
        t.on_free(0x10000).unwrap();
        t.trace().unwrap().flush_at_exit();
        let text = std::fs::read_to_string(&path).unwrap();
        let events: Vec<Vec<&str>> = text
            .lines()
            .skip(1)
            .map(|l| l.split(' ').skip(2).collect())
            .collect();
        assert_eq!(
            events,
            [
                ["a", "10000", "512", "77", "0"],
                ["a", "20000", "1024", "0", "1"],
                ["f", "10000", "512", "77", "0"],
            ]
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_file_that_cannot_be_created_is_an_error_not_a_panic() {
        assert!(Trace::create(Path::new("/nonexistent-dir/x/t.trace")).is_err());
    }

    #[test]
    fn a_failing_write_stops_the_trace_quietly() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        let trace = Trace::create(Path::new("/dev/full")).expect("/dev/full opens");
        trace.flush_at_exit();
        trace.record(&event(Op::Alloc, 1));
        assert!(trace.out.lock().unwrap().writer.is_none());
    }
}
