//! `hbmalloc replay FILE` on the simulated device: a recorded trace's figures, and a malformed
//! trace's error.

use std::process::Command;

fn replay(trace: &str) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("hbm-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{:x}.trace", trace.len()));
    std::fs::write(&path, trace).unwrap();
    Command::new(env!("CARGO_BIN_EXE_hbmalloc"))
        .arg("replay")
        .arg(&path)
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
