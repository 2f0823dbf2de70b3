//! The optional timeline: a bounded ring of the most recent alloc/free events (`timeline:N`),
//! written as JSON and as a chart (timeline_svg.rs) at exit.
//!
//! Cost: one mutex per event, shared by all threads. It is off by default and meant for a run
//! being studied, not for production; the ring keeps events in the order they were recorded.

use super::python_frames;
use super::registry::Tracker;
use super::stacks::StackId;
use super::symbolize::Symbolizer;
use super::timeline_svg;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Alloc,
    Free,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub time_ns: u64,
    pub kind: EventKind,
    pub ptr: usize,
    pub size: u64,
    pub device: i32,
    /// The allocation's stack, for a free too.
    pub stack: StackId,
}

struct Ring {
    events: VecDeque<Event>,
    dropped: u64,
}

pub struct Timeline {
    capacity: usize,
    ring: Mutex<Ring>,
}

impl Timeline {
    pub fn new(capacity: usize) -> Timeline {
        Timeline {
            capacity,
            ring: Mutex::new(Ring {
                events: VecDeque::with_capacity(capacity.min(1 << 16)),
                dropped: 0,
            }),
        }
    }

    pub fn push(
        &self,
        time_ns: u64,
        kind: EventKind,
        ptr: usize,
        size: u64,
        device: i32,
        stack: StackId,
    ) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.events.len() == self.capacity {
            ring.events.pop_front();
            ring.dropped += 1;
        }
        ring.events.push_back(Event {
            time_ns,
            kind,
            ptr,
            size,
            device,
            stack,
        });
    }

    /// The events kept, oldest first, and how many older ones were dropped.
    pub fn events(&self) -> (Vec<Event>, u64) {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        (ring.events.iter().copied().collect(), ring.dropped)
    }
}

#[derive(Serialize)]
struct JsonEvent {
    t_ns: u64,
    op: EventKind,
    ptr: String,
    size: u64,
    device: i32,
    /// Key into `sites`; absent without a stack.
    #[serde(skip_serializing_if = "Option::is_none")]
    site: Option<u32>,
    /// Change in bytes in use since the first event kept, after this event: negative when the
    /// window frees blocks allocated before it began (older events were dropped).
    in_use_change: i64,
}

#[derive(Serialize)]
struct JsonTimeline {
    version: u32,
    capacity: usize,
    dropped: u64,
    events: Vec<JsonEvent>,
    /// Site id → frames, as in the leak report's JSON.
    sites: BTreeMap<u32, Vec<super::report_json::JsonFrame>>,
    /// Site id → its Python frames, innermost first, for sites that have them.
    python_sites: BTreeMap<u32, Vec<super::report_json::JsonPyFrame>>,
}

impl Tracker {
    /// Writes the timeline as JSON; an error if this tracker keeps none (`timeline:0`).
    pub fn write_timeline_json(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let Some(timeline) = self.timeline() else {
            return Err(std::io::Error::other("timeline is off (timeline:0)"));
        };
        let (events, dropped) = timeline.events();
        let mut sym = Symbolizer::new();
        let mut sites = BTreeMap::new();
        let mut python_sites = BTreeMap::new();
        let mut in_use: i64 = 0;
        let mut json_events = Vec::with_capacity(events.len());
        for e in &events {
            in_use += match e.kind {
                EventKind::Alloc => e.size as i64,
                EventKind::Free => -(e.size as i64),
            };
            if let (false, Some(raw)) = (e.stack.is_none(), self.stacks().frames(e.stack)) {
                sites.entry(e.stack.0).or_insert_with(|| {
                    let python = python_frames::python_part(&raw);
                    if !python.is_empty() {
                        let json = python.iter().map(super::report_json::JsonPyFrame::from);
                        python_sites.insert(e.stack.0, json.collect());
                    }
                    sym.stack(&raw, self.settings().max_frames)
                        .iter()
                        .map(super::report_json::JsonFrame::from)
                        .collect()
                });
            }
            json_events.push(JsonEvent {
                t_ns: e.time_ns,
                op: e.kind,
                ptr: format!("{:#x}", e.ptr),
                size: e.size,
                device: e.device,
                site: (!e.stack.is_none()).then_some(e.stack.0),
                in_use_change: in_use,
            });
        }
        let doc = JsonTimeline {
            version: 1,
            capacity: timeline.capacity,
            dropped,
            events: json_events,
            sites,
            python_sites,
        };
        serde_json::to_writer_pretty(&mut *w, &doc).map_err(std::io::Error::other)?;
        w.write_all(b"\n")
    }

    /// Writes the timeline as a stacked area chart of bytes in use by call site (timeline_svg.rs),
    /// each site named by its first frame outside hbmalloc; an error if this tracker keeps no timeline.
    pub fn write_timeline_svg(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let Some(timeline) = self.timeline() else {
            return Err(std::io::Error::other("timeline is off (timeline:0)"));
        };
        let (events, dropped) = timeline.events();
        let mut sym = Symbolizer::new();
        let backtrace = self.settings().backtrace;
        let mut label_of = |stack: StackId| {
            let raw = self.stacks().frames(stack);
            // A Python line names a site better than the interpreter's native frames under it.
            if let Some(py) = raw
                .as_deref()
                .and_then(|r| python_frames::python_part(r).first().cloned())
            {
                return format!("{} {}:{}", py.function, py.file, py.line);
            }
            match raw.and_then(|raw| sym.stack(&raw, 1).into_iter().next()) {
                Some(f) => f
                    .location()
                    .map_or(f.label(), |at| format!("{} {at}", f.label())),
                None if backtrace => "(no stack)".to_string(),
                None => "(no stack: backtrace:off)".to_string(),
            }
        };
        let chart = timeline_svg::chart(&events, dropped, timeline_svg::COLUMNS, &mut label_of);
        timeline_svg::render(&chart, w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest() {
        let t = Timeline::new(3);
        for i in 0..5 {
            t.push(i, EventKind::Alloc, i as usize, 1, 0, StackId::NONE);
        }
        let (events, dropped) = t.events();
        assert_eq!(dropped, 2);
        let times: Vec<u64> = events.iter().map(|e| e.time_ns).collect();
        assert_eq!(times, vec![2, 3, 4]);
    }
}
