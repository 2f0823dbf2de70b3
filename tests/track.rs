//! Allocation tracking as a user sees it: counts under many threads, checkpoints, call sites in
//! the text/JSON/SVG reports, bad-free diagnostics, and the report a process prints at exit.
//!
//! Each test builds its own `Tracker` from explicit `Settings`; only the exit test uses the
//! process-wide one, in a child process.

use hbmalloc::config::LeakReport;
use hbmalloc::track::{self, Origin, Settings, Tracker, Unwinder};
use std::process::Command;

fn settings() -> Settings {
    Settings {
        leak_report: LeakReport::Full,
        ..Settings::default()
    }
}

const MIB: usize = 1 << 20;

/// Ends a leaking function: without it, its last tracker call can compile to a tail call, which
/// replaces the function's frame (no unwinder can show it then), as it would in any program.
#[inline(always)]
fn keep_frame() {
    std::hint::black_box(());
}

#[inline(never)]
fn leak_a(t: &Tracker, base: usize) {
    for i in 0..3 {
        t.on_alloc(base + i * MIB, MIB, 0, 0, Origin::CudaMalloc);
    }
    keep_frame();
}

#[inline(never)]
fn leak_b(t: &Tracker, base: usize) {
    for i in 0..2 {
        t.on_alloc(base + i * 4096, 4096, 1, 0x77, Origin::Pool);
    }
    keep_frame();
}

fn two_sites(unwinder: Unwinder) -> Tracker {
    let t = Tracker::new(Settings {
        unwinder,
        ..settings()
    });
    leak_a(&t, 0x7000_0000_0000);
    leak_b(&t, 0x7100_0000_0000);
    // Allocated and freed: must not appear.
    leak_b(&t, 0x7200_0000_0000);
    assert!(t.on_free(0x7200_0000_0000).is_ok());
    assert!(t.on_free(0x7200_0000_1000).is_ok());
    t
}

fn first_function(frames: &[hbmalloc::track::symbolize::SymFrame]) -> String {
    frames
        .first()
        .and_then(|f| f.function.clone())
        .unwrap_or_default()
}

#[test]
fn registry_counts_are_exact_under_16_threads() {
    for backtrace in [false, true] {
        let t = Tracker::new(Settings {
            backtrace,
            ..settings()
        });
        std::thread::scope(|s| {
            for thread in 0..16usize {
                let t = &t;
                s.spawn(move || {
                    let base = (thread + 1) << 32;
                    for i in 0..5_000usize {
                        t.on_alloc(base + i * 256, i + 1, 0, 0, Origin::HbmAlloc);
                    }
                    // Free the even ones.
                    for i in (0..5_000usize).step_by(2) {
                        assert!(t.on_free(base + i * 256).is_ok());
                    }
                });
            }
        });
        let per_thread_bytes: u64 = (0..5_000u64).filter(|i| i % 2 == 1).map(|i| i + 1).sum();
        let leaks = t.leaks_since(0);
        assert_eq!(leaks.count, 16 * 2_500, "backtrace {backtrace}");
        assert_eq!(leaks.bytes, 16 * per_thread_bytes, "backtrace {backtrace}");
        // Every allocation happened before this checkpoint: none is "since" it.
        let mark = t.checkpoint();
        assert_eq!(t.leaks_since(mark), track::LeakSummary::default());
        assert_eq!(t.bad_free_count(), 0);
    }
}

#[test]
fn checkpoint_marks_a_region() {
    let t = Tracker::new(settings());
    t.on_alloc(0x1000, 100, 0, 0, Origin::HbmAlloc);
    let mark = t.checkpoint();
    assert_eq!(t.leaks_since(mark), track::LeakSummary::default());
    t.on_alloc(0x2000, 200, 0, 0, Origin::HbmAlloc);
    t.on_alloc(0x3000, 300, 0, 0, Origin::HbmAlloc);
    assert_eq!(t.leaks_since(mark).bytes, 500);
    t.on_free(0x2000).unwrap();
    // Freeing what was allocated before the mark does not change the region's count.
    t.on_free(0x1000).unwrap();
    let since = t.leaks_since(mark);
    assert_eq!((since.bytes, since.count), (300, 1));
    t.on_free(0x3000).unwrap();
    assert_eq!(t.leaks_since(mark).count, 0);
    assert_eq!(t.leak_report_since(mark).sites.len(), 0);
}

#[test]
fn checkpoints_nest() {
    let t = Tracker::new(settings());
    t.on_alloc(0x1000, 1, 0, 0, Origin::HbmAlloc);
    let outer = t.checkpoint();
    t.on_alloc(0x2000, 20, 0, 0, Origin::HbmAlloc);
    let inner = t.checkpoint();
    assert!(inner > outer && outer > 0);
    t.on_alloc(0x3000, 300, 0, 0, Origin::HbmAlloc);
    assert_eq!(t.leaks_since(0).bytes, 321, "0 is everything live");
    assert_eq!(t.leaks_since(outer).bytes, 320);
    assert_eq!(t.leaks_since(inner).bytes, 300);
    let report = t.leak_report_since(inner);
    assert_eq!((report.summary.bytes, report.summary.count), (300, 1));
    assert_eq!(t.get(0x2000).unwrap().epoch, outer);
}

#[test]
fn two_leaking_functions_are_two_call_sites() {
    for unwinder in [Unwinder::FramePointer, Unwinder::Dwarf] {
        let t = two_sites(unwinder);
        let report = t.leak_report();
        assert_eq!(report.summary.bytes, (3 * MIB + 2 * 4096) as u64);
        assert_eq!(report.summary.count, 5);
        assert_eq!(report.sites.len(), 2, "{unwinder:?}: {:#?}", report.sites);
        let (a, b) = (&report.sites[0], &report.sites[1]);
        assert_eq!((a.bytes, a.count), ((3 * MIB) as u64, 3));
        assert_eq!((b.bytes, b.count), (8192, 2));
        assert!(
            first_function(&a.frames).ends_with("leak_a"),
            "{unwinder:?}: {a:#?}"
        );
        assert!(
            first_function(&b.frames).ends_with("leak_b"),
            "{unwinder:?}: {b:#?}"
        );
        assert!(
            a.frames.iter().any(|f| f.line.is_some()),
            "debug info gives lines"
        );
        assert!(
            a.frames
                .iter()
                .all(|f| !f.function.as_deref().unwrap_or("").contains("hbmalloc::")),
            "hbmalloc's own frames are left out: {a:#?}"
        );
        assert_eq!(a.origins, vec![Origin::CudaMalloc]);
        assert_eq!(b.devices, vec![1]);
    }
}

#[test]
fn text_report_lists_sites_largest_first() {
    let t = two_sites(Unwinder::FramePointer);
    let text = t.render_text_report(LeakReport::Full);
    println!("{text}");
    let first_line = text.lines().next().unwrap();
    assert_eq!(
        first_line,
        "hbmalloc: LEAK SUMMARY: 3153920 bytes leaked in 5 allocations (3.0 MiB)"
    );
    let a =
        text.find("hbmalloc: 3145728 bytes (3.0 MiB) in 3 allocations from cudaMalloc on device 0");
    let b = text
        .find("hbmalloc: 8192 bytes (8.0 KiB) in 2 allocations from hbm_pool_alloc on device 1");
    let (a, b) = (a.expect(&text), b.expect(&text));
    assert!(a < b, "largest first");
    assert!(text[a..b].contains("leak_a at tests/track.rs:"), "{text}");
    assert!(text[b..].contains("leak_b at tests/track.rs:"), "{text}");
    assert!(
        !text.contains("leak_b at tests/track.rs:28"),
        "freed blocks do not count"
    );

    let summary = t.render_text_report(LeakReport::Summary);
    assert_eq!(summary.lines().count(), 1, "{summary}");
    assert_eq!(t.render_text_report(LeakReport::Off), "");
}

#[test]
fn pinned_host_memory_is_reported_on_the_host() {
    let t = Tracker::new(Settings {
        backtrace: false,
        ..settings()
    });
    t.on_alloc(0x7000_0000, 4096, -1, 0, Origin::CudaMallocHost);
    t.on_alloc(0x7100_0000, 8192, 0, 0, Origin::CudaMallocManaged);
    let text = t.render_text_report(LeakReport::Full);
    assert!(
        text.contains(
            "in 2 allocations from cudaMallocHost, cudaMallocManaged on device 0 and the host"
        ),
        "{text}"
    );
    let t = Tracker::new(settings());
    t.on_alloc(0x7200_0000, 4096, -1, 0, Origin::CudaHostAlloc);
    let text = t.render_text_report(LeakReport::Full);
    assert!(
        text.contains("in 1 allocation from cudaHostAlloc on the host\n"),
        "{text}"
    );
}

#[test]
fn nothing_leaked_prints_zeros() {
    let t = Tracker::new(settings());
    t.on_alloc(0x1000, 10, 0, 0, Origin::CudaMalloc);
    t.on_free(0x1000).unwrap();
    assert_eq!(
        t.render_text_report(LeakReport::Full),
        "hbmalloc: LEAK SUMMARY: 0 bytes leaked in 0 allocations\n"
    );
}

#[test]
fn json_report_has_the_same_sites() {
    let t = two_sites(Unwinder::FramePointer);
    let mut out = Vec::new();
    t.write_json_report(&mut out).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(doc["summary"]["bytes"], 3 * MIB + 2 * 4096);
    assert_eq!(doc["summary"]["count"], 5);
    let sites = doc["sites"].as_array().unwrap();
    assert_eq!(sites.len(), 2);
    assert_eq!(sites[0]["bytes"], 3 * MIB);
    assert_eq!(sites[0]["count"], 3);
    assert_eq!(sites[1]["count"], 2);
    let function = |s: &serde_json::Value| s["frames"][0]["function"].as_str().unwrap().to_string();
    assert!(function(&sites[0]).ends_with("leak_a"));
    assert!(function(&sites[1]).ends_with("leak_b"));
    assert_eq!(sites[0]["frames"][0]["file"], "tests/track.rs");
    let allocs = sites[1]["allocations"].as_array().unwrap();
    assert_eq!(allocs.len(), 2);
    assert_eq!(allocs[0]["size"], 4096);
    assert_eq!(allocs[0]["stream"], "0x77");
    assert_eq!(allocs[0]["origin"], "hbm_pool_alloc");
    assert!(allocs[0]["ptr"].as_str().unwrap().starts_with("0x71"));
}

/// Parses `svg` to the end with quick-xml; panics on malformed XML. Returns the text content.
fn parse_xml(svg: &[u8]) -> String {
    let mut reader = quick_xml::Reader::from_reader(svg);
    let mut buf = Vec::new();
    let (mut text, mut depth, mut elements) = (String::new(), 0i32, 0);
    loop {
        match reader.read_event_into(&mut buf).expect("well-formed SVG") {
            quick_xml::events::Event::Start(_) => {
                depth += 1;
                elements += 1;
            }
            quick_xml::events::Event::End(_) => depth -= 1,
            quick_xml::events::Event::Empty(_) => elements += 1,
            quick_xml::events::Event::Text(t) => {
                text.push_str(&String::from_utf8_lossy(&t));
                text.push(' ');
            }
            quick_xml::events::Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    assert_eq!(depth, 0, "every element closed");
    assert!(elements > 0);
    text
}

#[test]
fn svg_flame_graph_is_well_formed() {
    let t = two_sites(Unwinder::FramePointer);
    let mut out = Vec::new();
    t.write_svg_report(&mut out).unwrap();
    assert!(out.starts_with(b"<?xml") || out.starts_with(b"<svg"));
    let text = parse_xml(&out);
    assert!(text.contains("leak_a"), "{text}");
    assert!(text.contains("leak_b"), "{text}");

    let empty = Tracker::new(settings());
    let mut out = Vec::new();
    empty.write_svg_report(&mut out).unwrap();
    assert!(parse_xml(&out).contains("no leaks"));
}

#[inline(never)]
fn allocate_for_double_free(t: &Tracker) {
    t.on_alloc(0xdead_0000, 4096, 0, 0, Origin::CudaMalloc);
    keep_frame();
}

#[inline(never)]
fn first_free(t: &Tracker) {
    t.on_free(0xdead_0000).unwrap();
}

#[inline(never)]
fn second_free(t: &Tracker) -> Box<track::BadFree> {
    t.on_free(0xdead_0000).unwrap_err()
}

#[test]
fn double_free_names_the_allocation_and_the_first_free() {
    let t = Tracker::new(settings());
    allocate_for_double_free(&t);
    first_free(&t);
    let bad = second_free(&t);
    assert!(bad.is_double_free());
    let text = bad.render(&t);
    println!("{text}");
    assert!(
        text.starts_with("hbmalloc: double free of 0xdead0000 (4096 bytes"),
        "{text}"
    );
    let this = text.find("this free").unwrap();
    let alloc = text.find("allocated by thread").unwrap();
    let first = text.find("first freed by thread").unwrap();
    assert!(text[this..alloc].contains("second_free"), "{text}");
    assert!(
        text[alloc..first].contains("allocate_for_double_free"),
        "{text}"
    );
    assert!(text[first..].contains("first_free"), "{text}");
    assert_eq!(t.bad_free_count(), 1);
}

#[test]
fn unknown_and_interior_pointers() {
    let t = Tracker::new(settings());
    let bad = t.on_free(0x1234_5000).unwrap_err();
    assert!(!bad.is_double_free());
    assert!(bad
        .render(&t)
        .starts_with("hbmalloc: free of unknown pointer 0x12345000"));

    t.on_alloc(0x10_0000, 4096, 0, 0, Origin::HbmAlloc);
    let bad = t.on_free(0x10_0100).unwrap_err();
    let text = bad.render(&t);
    assert!(
        text.contains("points 256 bytes into the live block 0x100000"),
        "{text}"
    );
    assert!(
        text.contains("interior_pointers"),
        "allocation site shown: {text}"
    );
    assert!(
        t.get(0x10_0000).is_some(),
        "a bad free leaves the block live"
    );
}

#[test]
fn backtrace_off_still_counts() {
    let t = Tracker::new(Settings {
        backtrace: false,
        ..settings()
    });
    leak_a(&t, 0x7000_0000_0000);
    leak_b(&t, 0x7100_0000_0000);
    let report = t.leak_report();
    assert_eq!(report.summary.count, 5);
    assert_eq!(report.sites.len(), 1, "every entry is site-less");
    assert!(report.sites[0].frames.is_empty());
    assert!(t.stacks().is_empty());
    let text = t.render_text_report(LeakReport::Full);
    assert!(text.contains("backtrace:off"), "{text}");
    let bad = t.on_free(0xbad_0000).unwrap_err();
    let text = bad.render(&t);
    assert!(
        text.starts_with("hbmalloc: free of unknown pointer 0xbad0000"),
        "{text}"
    );
    assert!(text.contains("(no stack: backtrace:off"), "{text}");
}

#[test]
fn timeline_records_events_in_order() {
    let t = Tracker::new(Settings {
        timeline: 3,
        ..settings()
    });
    leak_b(&t, 0x100_0000);
    t.on_free(0x100_0000).unwrap();
    t.on_free(0x100_1000).unwrap();
    let mut out = Vec::new();
    t.write_timeline_json(&mut out).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(doc["dropped"], 1);
    let ops: Vec<&str> = doc["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["alloc", "free", "free"]);
    let site = doc["events"][0]["site"].as_u64().unwrap().to_string();
    assert!(doc["sites"][&site][0]["function"]
        .as_str()
        .unwrap()
        .ends_with("leak_b"));
}

// A model of an inference server's allocations, for the timeline chart: weights loaded once, a
// KV cache that grows, activations per step, a slow leak, and ten small sites.
#[inline(never)]
fn load_weights(t: &Tracker, layer: usize) {
    t.on_alloc(
        0x1000_0000_0000 + layer * 64 * MIB,
        48 * MIB,
        0,
        0,
        Origin::CudaMalloc,
    );
    keep_frame();
}

#[inline(never)]
fn grow_kv_cache(t: &Tracker, block: usize) {
    t.on_alloc(
        0x2000_0000_0000 + block * 8 * MIB,
        8 * MIB,
        0,
        0,
        Origin::KvCache,
    );
    keep_frame();
}

#[inline(never)]
fn forward_activations(t: &Tracker, step: usize, alloc: bool) {
    for i in 0..4 {
        let ptr = 0x3000_0000_0000 + (step % 2) * 256 * MIB + i * 32 * MIB;
        if alloc {
            t.on_alloc(ptr, (20 + 6 * i) * MIB, 0, 0, Origin::Pool);
        } else {
            t.on_free(ptr).unwrap();
        }
    }
    keep_frame();
}

#[inline(never)]
fn leak_scratch(t: &Tracker, step: usize) {
    t.on_alloc(
        0x4000_0000_0000 + step * MIB,
        3 * MIB,
        0,
        0,
        Origin::HbmAlloc,
    );
    keep_frame();
}

macro_rules! small_sites {
    ($($name:ident = $n:expr),*) => {
        $(#[inline(never)]
        fn $name(t: &Tracker, step: usize) {
            t.on_alloc(0x5000_0000_0000 + $n * (1 << 36) + step * MIB, ($n + 1) * 256 * 1024, 0, 0, Origin::Pool);
            keep_frame();
        })*
        const SMALL_SITES: &[fn(&Tracker, usize)] = &[$($name),*];
    };
}
small_sites!(
    tokenizer_buffers = 0,
    sampler_logits = 1,
    rope_tables = 2,
    lora_adapter = 3,
    graph_workspace = 4,
    cublas_workspace = 5,
    prefix_cache = 6,
    speculative_draft = 7,
    embedding_cache = 8,
    stats_buffers = 9
);

/// Allocations of `inference_model` up to `steps` steps; sleeps `pause` between steps.
fn inference_model(t: &Tracker, steps: usize, pause: std::time::Duration) {
    for layer in 0..8 {
        load_weights(t, layer);
        std::thread::sleep(pause);
    }
    for (i, site) in SMALL_SITES.iter().enumerate() {
        site(t, i);
    }
    for step in 0..steps {
        if step % 6 == 0 {
            grow_kv_cache(t, step / 6);
        }
        if step % 3 == 0 {
            leak_scratch(t, step);
        }
        forward_activations(t, step, true);
        std::thread::sleep(pause);
        forward_activations(t, step, false);
        if step % 10 == 5 {
            SMALL_SITES[step / 10 % SMALL_SITES.len()](t, 1000 + step);
        }
    }
}

/// Band outlines' y coordinates: the `M` point's and every `V`'s.
fn band_ys(d: &str) -> Vec<f64> {
    let mut ys = Vec::new();
    let mut rest = d;
    while let Some(at) = rest.find(['M', 'V']) {
        let cmd = rest.as_bytes()[at];
        rest = &rest[at + 1..];
        let end = rest
            .find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let arg = &rest[..end];
        let y = if cmd == b'M' {
            arg.split(',').nth(1).unwrap()
        } else {
            arg
        };
        ys.push(y.parse().unwrap());
    }
    ys
}

/// The `(name, attributes)` of every element of `svg`.
fn elements(svg: &[u8]) -> Vec<(String, std::collections::HashMap<String, String>)> {
    let mut reader = quick_xml::Reader::from_reader(svg);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    loop {
        match reader.read_event_into(&mut buf).expect("well-formed SVG") {
            quick_xml::events::Event::Start(e) | quick_xml::events::Event::Empty(e) => {
                let attrs = e
                    .attributes()
                    .map(|a| {
                        let a = a.unwrap();
                        let value = a
                            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                            .unwrap()
                            .to_string();
                        (String::from_utf8_lossy(a.key.as_ref()).to_string(), value)
                    })
                    .collect();
                out.push((
                    String::from_utf8_lossy(e.name().as_ref()).to_string(),
                    attrs,
                ));
            }
            quick_xml::events::Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    out
}

#[test]
fn timeline_chart_has_a_band_per_site_up_to_the_peak() {
    let t = Tracker::new(Settings {
        timeline: 1 << 16,
        ..settings()
    });
    // HBM_TIMELINE_SVG=path writes the chart there, with pauses that spread it over time.
    let out_path = std::env::var("HBM_TIMELINE_SVG").ok();
    let pause = std::time::Duration::from_millis(if out_path.is_some() { 4 } else { 0 });
    inference_model(&t, 60, pause);
    let live: u64 = t.leaks_since(0).bytes;
    let mut out = Vec::new();
    t.write_timeline_svg(&mut out).unwrap();
    if let Some(path) = out_path {
        std::fs::write(path, &out).unwrap();
    }
    let text = parse_xml(&out);
    let elements = elements(&out);
    let bands: Vec<_> = elements
        .iter()
        .filter(|(name, a)| name == "path" && a.get("class").map(String::as_str) == Some("band"))
        .map(|(_, a)| a)
        .collect();
    // 4 large sites and 10 small ones: 8 bands of their own and "other".
    assert_eq!(bands.len(), 9, "{text}");
    let sites: Vec<&str> = bands.iter().map(|a| a["data-site"].as_str()).collect();
    assert!(
        // "track::load_weights" in a debug build, "load_weights" with line tables only.
        sites[0].contains("load_weights tests/track.rs:"),
        "{sites:?}"
    );
    for name in ["forward_activations", "grow_kv_cache", "leak_scratch"] {
        assert!(sites.iter().any(|s| s.contains(name)), "{name}: {sites:?}");
    }
    assert_eq!(sites[8], "other (6 call sites)");
    assert!(
        text.contains("bytes in use over time by call site"),
        "{text}"
    );
    assert!(
        text.contains("grow_kv_cache tests/track.rs:"),
        "legend: {text}"
    );

    // The peak: weights + the KV cache and leak at the last step + one step's activations.
    let activations = (20 + 26 + 32 + 38) * MIB as u64;
    let peak: u64 = elements
        .iter()
        .find(|(_, a)| a.get("class").map(String::as_str) == Some("peak"))
        .map(|(_, a)| a["data-bytes"].parse().unwrap())
        .unwrap();
    assert_eq!(peak, live + activations, "{text}");
    // The top of the stack is the peak line: the chart's y-extent is the peak in use.
    let peak_y: f64 = elements
        .iter()
        .find(|(_, a)| a.get("class").map(String::as_str) == Some("peak"))
        .map(|(_, a)| a["y1"].parse().unwrap())
        .unwrap();
    let top = bands
        .iter()
        .flat_map(|a| band_ys(&a["d"]))
        .fold(f64::INFINITY, f64::min);
    assert!(
        (top - peak_y).abs() < 0.11,
        "top of the bands {top}, peak line {peak_y}"
    );
    // Each band's own peak, as the legend states it.
    let band_peak = |name: &str| -> u64 {
        bands
            .iter()
            .find(|a| a["data-site"].contains(name))
            .unwrap()["data-peak"]
            .parse()
            .unwrap()
    };
    assert_eq!(band_peak("load_weights"), 8 * 48 * MIB as u64);
    assert_eq!(band_peak("forward_activations"), activations);
}

#[test]
fn timeline_chart_of_a_window_and_of_nothing() {
    // Only the frees are kept: every band counts from its lowest point, never below zero.
    let t = Tracker::new(Settings {
        timeline: 2,
        ..settings()
    });
    leak_b(&t, 0x100_0000);
    t.on_free(0x100_0000).unwrap();
    t.on_free(0x100_1000).unwrap();
    let mut out = Vec::new();
    t.write_timeline_svg(&mut out).unwrap();
    let text = parse_xml(&out);
    assert!(text.contains("2 older events dropped"), "{text}");
    let elements = elements(&out);
    let band = &elements
        .iter()
        .find(|(_, a)| a.get("class").map(String::as_str) == Some("band"))
        .unwrap()
        .1;
    assert_eq!(band["data-peak"], "8192");

    let empty = Tracker::new(Settings {
        timeline: 4,
        ..settings()
    });
    let mut out = Vec::new();
    empty.write_timeline_svg(&mut out).unwrap();
    assert!(parse_xml(&out).contains("no events recorded"));
    let off = Tracker::new(settings());
    assert!(off.write_timeline_svg(&mut Vec::new()).is_err());
}

/// Runs in a child process (see `exit_report_is_printed_at_exit`): leaks through the global
/// tracker with another thread still allocating, then returns and lets the process exit.
#[test]
fn child_leaks_then_exits() {
    if std::env::var_os("HBM_TRACK_CHILD").is_none() {
        return;
    }
    leak_through_global();
    std::thread::spawn(|| {
        for i in 0.. {
            track::on_alloc(0x9000_0000 + (i % 64) * 256, 256, 0, 0, Origin::HbmAlloc);
            track::on_free(0x9000_0000 + (i % 64) * 256);
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(20));
}

#[inline(never)]
fn leak_through_global() {
    track::on_alloc(0x6000_0000, 3 * MIB, 0, 0, Origin::CudaMalloc);
    keep_frame();
}

#[test]
fn exit_report_says_which_files_could_not_be_written() {
    let json = "/nonexistent-hbm-dir/leaks.json";
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_leaks_then_exits", "--test-threads=1"])
        .env("HBM_TRACK_CHILD", "1")
        .env(
            "HBMALLOC_CONF",
            format!("leak_report:summary,report_json:{json},timeline:64"),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Said whatever the detail, with the reason.
    let want = format!("hbmalloc: could not write JSON report {json}: ");
    assert!(stderr.contains(&want), "{stderr}");
    let want = "hbmalloc: could not write timeline /nonexistent-hbm-dir/leaks.timeline.json: ";
    assert!(stderr.contains(want), "{stderr}");
}

#[test]
fn exit_report_is_printed_at_exit() {
    let dir = std::env::temp_dir().join(format!("hbm-exit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("leaks.json");
    let svg = dir.join("leaks.svg");
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_leaks_then_exits",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HBM_TRACK_CHILD", "1")
        .env(
            "HBMALLOC_CONF",
            format!(
                "report_json:{},report_svg:{},timeline:4096",
                json.display(),
                svg.display()
            ),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    println!("{stderr}");
    // The other thread's 256-byte blocks may be on record at the moment of exit (the report
    // reads the table while it runs: one, and now and then two, were seen).
    let leaked: u64 = stderr
        .split("hbmalloc: LEAK SUMMARY: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no leak summary: {stderr}"));
    assert!(
        (3 * MIB as u64..=3 * MIB as u64 + 64 * 256).contains(&leaked),
        "{stderr}"
    );
    let site = "hbmalloc: 3145728 bytes (3.0 MiB) in 1 allocation from cudaMalloc on device 0\n";
    assert!(stderr.contains(site), "{stderr}");
    assert!(
        stderr.contains("leak_through_global at tests/track.rs:"),
        "{stderr}"
    );
    assert!(stderr.contains("JSON report written to"), "{stderr}");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(doc["sites"][0]["bytes"], 3 * MIB);
    parse_xml(&std::fs::read(&svg).unwrap());
    // The timeline and its chart, beside the JSON report.
    let chart = dir.join("leaks.timeline.svg");
    // One line names both files.
    let line = format!(
        "hbmalloc: timeline written to {} (chart: {})\n",
        dir.join("leaks.timeline.json").display(),
        chart.display()
    );
    assert!(stderr.contains(&line), "{stderr}");
    // (The other thread's churn fills the ring: the leak itself has left the window by exit.)
    let text = parse_xml(&std::fs::read(&chart).unwrap());
    assert!(
        text.contains("bytes in use over time by call site"),
        "{text}"
    );
    assert!(dir.join("leaks.timeline.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
