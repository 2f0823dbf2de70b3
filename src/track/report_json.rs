//! The JSON leak report: the same content as the text report, every call site and allocation.
//!
//! ```json
//! { "version": 2, "summary": { "bytes": 3145728, "count": 3 }, "backtraces": true,
//!   "bad_frees": 0, "sites": [ { "bytes": 2097152, "count": 2, "origins": ["cudaMalloc"],
//!   "devices": [0], "frames": [ { "ip": "0x55d0c3a1b2c3", "function": "app::load_weights",
//!   "file": "src/model.rs", "line": 41, "library": "app", "offset": "0x1b2c3", "inlined": false } ],
//!   "python_frames": [ { "file": "/srv/serve.py", "function": "load", "line": 41 } ],
//!   "allocations": [ { "ptr": "0x7f3a00000000", "size": 1048576, "device": 0, "stream": "0x0",
//!   "thread": 4242, "time_ns": 14000000, "epoch": 0, "origin": "cudaMalloc" } ] } ] }
//! ```
//! Addresses are hex strings (JSON numbers lose precision past 2^53). Version 2 replaced each
//! allocation's global `seq` number with its checkpoint `epoch` (see `Tracker::checkpoint`).
//! `python_frames` (innermost first, empty when no Python was running) was added within version 2:
//! readers of the other fields are unaffected.

use super::python_frames::PyFrame;
use super::registry::Tracker;
use super::report::{LeakReport, Site};
use super::symbolize::SymFrame;
use serde::Serialize;
use std::io::Write;

#[derive(Serialize)]
pub(super) struct JsonFrame {
    ip: String,
    function: Option<String>,
    file: Option<String>,
    line: Option<u32>,
    library: Option<String>,
    offset: String,
    inlined: bool,
}

impl From<&SymFrame> for JsonFrame {
    fn from(f: &SymFrame) -> JsonFrame {
        JsonFrame {
            ip: format!("{:#x}", f.ip),
            function: f.function.clone(),
            file: f.file.clone(),
            line: f.line,
            library: f.library.clone(),
            offset: format!("{:#x}", f.offset),
            inlined: f.inlined,
        }
    }
}

/// A Python frame (`python_frames::PyFrame`).
#[derive(Serialize)]
pub(super) struct JsonPyFrame {
    file: String,
    function: String,
    line: u32,
}

impl From<&PyFrame> for JsonPyFrame {
    fn from(f: &PyFrame) -> JsonPyFrame {
        JsonPyFrame {
            file: f.file.to_string(),
            function: f.function.to_string(),
            line: f.line,
        }
    }
}

#[derive(Serialize)]
struct JsonAllocation {
    ptr: String,
    size: u64,
    device: i32,
    stream: String,
    thread: u32,
    time_ns: u64,
    epoch: u64,
    origin: &'static str,
}

#[derive(Serialize)]
struct JsonSite {
    bytes: u64,
    count: u64,
    origins: Vec<&'static str>,
    devices: Vec<i32>,
    frames: Vec<JsonFrame>,
    python_frames: Vec<JsonPyFrame>,
    allocations: Vec<JsonAllocation>,
}

#[derive(Serialize)]
struct JsonSummary {
    bytes: u64,
    count: u64,
}

#[derive(Serialize)]
struct JsonReport {
    version: u32,
    summary: JsonSummary,
    backtraces: bool,
    bad_frees: u64,
    stacks_overflowed: u64,
    sites: Vec<JsonSite>,
}

fn site(s: &Site) -> JsonSite {
    JsonSite {
        bytes: s.bytes,
        count: s.count,
        origins: s.origins.iter().map(|o| o.name()).collect(),
        devices: s.devices.clone(),
        frames: s.frames.iter().map(JsonFrame::from).collect(),
        python_frames: s.python.iter().map(JsonPyFrame::from).collect(),
        allocations: s
            .allocations
            .iter()
            .map(|(ptr, live)| JsonAllocation {
                ptr: format!("{ptr:#x}"),
                size: live.size,
                device: live.device,
                stream: format!("{:#x}", live.stream),
                thread: live.thread,
                time_ns: live.time_ns,
                epoch: live.epoch,
                origin: live.origin.name(),
            })
            .collect(),
    }
}

/// Writes `report` as pretty-printed JSON.
pub fn write(report: &LeakReport, w: &mut dyn Write) -> std::io::Result<()> {
    let doc = JsonReport {
        version: 2,
        summary: JsonSummary {
            bytes: report.summary.bytes,
            count: report.summary.count,
        },
        backtraces: report.backtraces,
        bad_frees: report.bad_frees,
        stacks_overflowed: report.stacks_overflowed,
        sites: report.sites.iter().map(site).collect(),
    };
    serde_json::to_writer_pretty(&mut *w, &doc).map_err(std::io::Error::other)?;
    w.write_all(b"\n")
}

impl Tracker {
    /// Writes the JSON report of every live allocation.
    pub fn write_json_report(&self, w: &mut dyn Write) -> std::io::Result<()> {
        write(&self.leak_report(), w)
    }
}
