//! `hbmalloc replay FILE` on the simulated device: a recorded trace's figures, and a malformed
//! trace's error.

use std::process::Command;

fn replay(trace: &str) -> std::process::Output {
    replay_with(trace, &[])
}

fn replay_with(trace: &str, extra: &[&std::ffi::OsStr]) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("hbm-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{:x}.trace", trace.len()));
    std::fs::write(&path, trace).unwrap();
    Command::new(env!("CARGO_BIN_EXE_hbmalloc"))
        .arg("replay")
        .arg(&path)
        .args(extra)
        .env("HBMALLOC_CONF", "backend:sim,backtrace:off,leak_report:off")
        .output()
        .unwrap()
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("{key} missing from {line}"))
}

#[test]
fn a_trace_replays_on_its_threads_with_its_peak() {
    // Two threads: 3 MiB live at most (1 + 2 while the first is live), then 1.5 MiB.
    let trace = "# hbmalloc trace v1: time_ns thread op ptr size stream device\n\
                 0 10 a 1000 1048576 0 0\n\
                 1 11 a 2000 2097152 0 0\n\
                 2 10 f 1000 1048576 0 0\n\
                 3 11 f 2000 2097152 0 0\n\
                 4 10 a 3000 1572864 0 0\n\
                 5 10 f 9999 512 0 0\n\
                 6 11 f 3000 1572864 0 0\n\
                 7 11 a 4000 4096 0 -1\n";
    let out = replay(trace);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(field(&stdout, "events"), "7");
    assert_eq!(field(&stdout, "threads"), "2");
    assert_eq!(field(&stdout, "host_events_skipped"), "1");
    assert_eq!(field(&stdout, "peak_requested_mib"), "3.0");
    let reserved: f64 = field(&stdout, "peak_reserved_mib").parse().unwrap();
    assert!((3.0..=64.0).contains(&reserved), "{stdout}");
}

#[test]
fn a_malformed_trace_names_its_line() {
    let out = replay("# header\n0 10 a 1000 4096 0 0\n1 10 x 1000 4096 0 0\n");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 3: op is not a or f"), "{stderr}");
}

#[test]
fn a_series_keeps_every_peak_in_at_most_1000_points() {
    // 3001 events: 512 bytes kept throughout, 1499 allocations of growing sizes each freed at
    // once, then 7 MiB kept to the end. More events than points: each point is a stretch of 4
    // events that ends on a free, so only the stretch's highest figure keeps the peaks.
    let mut trace = String::from(
        "# hbmalloc trace v1: time_ns thread op ptr size stream device\n0 7 a 800000 512 0 0\n",
    );
    for i in 0..1499u64 {
        let (size, ptr) = (4096 * (i % 64 + 1), 0x1000 + i);
        trace += &format!(
            "{} 7 a {ptr:x} {size} 0 0\n{} 7 f {ptr:x} {size} 0 0\n",
            2 * i + 1,
            2 * i + 2
        );
    }
    trace += "3000 7 a 9000000 7340032 0 0\n3001 7 a 9800000 4096 0 0\n";
    let series = std::env::temp_dir().join(format!("hbm-series-{}.txt", std::process::id()));
    let out = replay_with(&trace, &["--series".as_ref(), series.as_os_str()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&series).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("# hbmalloc series v1: op in_use_bytes reserved_bytes")
    );
    let points: Vec<[u64; 3]> = lines
        .map(|l| {
            let f: Vec<u64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
            [f[0], f[1], f[2]]
        })
        .collect();
    assert!(
        (100..=1000).contains(&points.len()),
        "{} points",
        points.len()
    );
    assert!(
        points.windows(2).all(|w| w[0][0] < w[1][0]),
        "events out of order"
    );
    assert_eq!(points.last().unwrap()[0], 3001, "the last event");
    let peak_in_use = points.iter().map(|p| p[1]).max().unwrap();
    assert_eq!(
        peak_in_use,
        512 + 7340032 + 4096,
        "the trace's peak, exactly"
    );
    // The loop's 23 largest allocations (i % 64 == 63), each a point of its own.
    let loop_peaks = points.iter().filter(|p| p[1] == 512 + 64 * 4096).count();
    assert_eq!(loop_peaks, 23, "{points:?}");
    let peak_reserved = points.iter().map(|p| p[2]).max().unwrap() as f64 / (1u64 << 20) as f64;
    let reported: f64 = field(&stdout, "peak_reserved_mib").parse().unwrap();
    assert_eq!(
        format!("{peak_reserved:.1}"),
        format!("{reported:.1}"),
        "{stdout}"
    );
    assert!(points.iter().all(|p| p[2] >= p[1]), "reserved below in use");
}

#[test]
fn a_torch_replay_reuses_a_streams_freed_memory_while_its_events_wait() {
    // Five 4 MiB blocks fill one 20 MiB chunk; two neighbours are freed on the stream, then
    // 8 MiB is asked for on it. The events never complete (no synchronize on this path, a lag
    // longer than the trace): only the stream's own reuse of its merged frees avoids a chunk.
    let mut trace = String::from("# hbmalloc trace v1: time_ns thread op ptr size stream device\n");
    for i in 1..=5 {
        trace += &format!("{i} 10 a {i}000 4194304 0 0\n");
    }
    trace += "6 10 f 2000 4194304 0 0\n7 10 f 3000 4194304 0 0\n8 10 a 9000 8388608 0 0\n";
    let lag: &[&std::ffi::OsStr] = &["--torch".as_ref(), "--event-lag".as_ref(), "1000".as_ref()];
    let out = replay_with(&trace, lag);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(field(&stdout, "entry").trim(), "torch-lag1000");
    assert_eq!(field(&stdout, "peak_reserved_mib"), "20.0", "{stdout}");
    assert_eq!(field(&stdout, "syncs"), "0", "{stdout}");
}

#[test]
fn an_event_lag_needs_the_torch_entry_points() {
    let out = replay_with("# header\n", &["--event-lag".as_ref(), "5".as_ref()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--torch"), "{stderr}");
}
