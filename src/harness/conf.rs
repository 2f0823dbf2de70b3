//! `HBMALLOC_CONF` from raw bytes: any value parses to a configuration and one warning line per
//! bad entry, with every setting inside its documented range. The fuzz target `conf` and its
//! corpus replay.

use crate::backend::fault::FaultPlan;
use crate::config::{parse_size, Config};

/// Parses `data` as the environment would hand it over; panics if a documented property fails.
pub fn run(data: &[u8]) {
    let (cfg, warnings) = Config::parse_bytes(data);
    let entries = data
        .split(|b| *b == b',')
        .filter(|e| !e.trim_ascii().is_empty())
        .count();
    assert!(warnings.len() <= entries, "at most one warning per entry");
    for w in &warnings {
        assert!(w.starts_with("hbmalloc: HBMALLOC_CONF "), "{w}");
        assert!(!w.contains('\n'), "one line: {w:?}");
    }
    assert!((1 << 20..=1 << 46).contains(&cfg.sim_capacity));
    assert!((1..=256).contains(&cfg.max_frames));
    assert!(cfg.timeline <= 1 << 26);
    for rule in &cfg.fault.rules {
        assert!(rule.first >= 1 && rule.first <= rule.last, "{rule:?}");
    }
    // Parsing is a function of the bytes.
    assert_eq!(Config::parse_bytes(data), (cfg, warnings));
    // The value parsers alone, on the whole text.
    let text = String::from_utf8_lossy(data);
    let _ = parse_size(&text);
    let _ = FaultPlan::parse(&text);
}
