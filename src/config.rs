//! `HBMALLOC_CONF`: `key:value` pairs separated by commas, read once per process.
//!
//! A malformed entry never aborts the host program: it prints one warning line naming the key and
//! the entry is ignored, leaving the default in force.

use crate::process::init::InitCell;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Which device-memory source the process uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// CUDA when a driver and at least one device are present, else the simulated device.
    Auto,
    Cuda,
    Sim,
}

/// How much the leak report at exit prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeakReport {
    Off,
    Summary,
    Full,
}

/// How a block freed by `cudaFree` is kept away from work queued before the free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamSafety {
    /// Freed blocks wait in a pending list; one device synchronize releases a whole batch of them,
    /// issued only when the pool needs the memory. As safe as the runtime's own `cudaFree`.
    Batched,
    /// Every `cudaFree` synchronizes the device before returning, as the runtime does.
    Eager,
    /// Freed blocks are reusable at once. Only for programs that synchronize before they free.
    Off,
}

/// How the tracker walks a stack when `backtrace:on`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackWalk {
    /// Frame pointers, validated frame by frame: ~30 ns, stops at code built without them.
    FramePointer,
    /// DWARF unwind tables: through any code, ~100x slower (microseconds per allocation).
    Dwarf,
}

/// When an allocation records its Python stack (`python_frames`, see `track::python_frames`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PythonFrames {
    Off,
    /// When the allocating thread holds the GIL; for `hbm_torch_malloc` also when the main
    /// thread released it (PyTorch releases it around every operator), by taking it back for
    /// the walk.
    On,
    /// As `On`, and taking the GIL back on every entry point and every Python thread
    /// (LD_PRELOAD under PyTorch, serving threads).
    Acquire,
}

/// The parsed configuration. Every field has a default that a user without `HBMALLOC_CONF` gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub backend: BackendKind,
    pub backtrace: bool,
    /// With `backtrace`, also record the Python stack of allocations (`track::python_frames`).
    pub python_frames: PythonFrames,
    /// `nvtx:on`: annotate pool chunks and blocks for a tool that loads through NVTX
    /// (compute-sanitizer). Off by default: on the first H200 run the tool refused a heap
    /// unregister and the annotated program crashed (issue 14), so it is opt-in until it passes.
    pub nvtx: bool,
    pub leak_report: LeakReport,
    /// Paths are kept as bytes: any Linux path is accepted, UTF-8 or not.
    pub report_path: Option<PathBuf>,
    pub report_json: Option<PathBuf>,
    pub report_svg: Option<PathBuf>,
    /// `trace:FILE`: one line per allocation and free (see `track::trace`).
    pub trace: Option<PathBuf>,
    pub max_frames: usize,
    pub unwinder: StackWalk,
    /// Capacity of the simulated device in bytes.
    pub sim_capacity: usize,
    pub stream_safety: StreamSafety,
    /// Bytes of freed-but-unsynchronized blocks a thread may hold before the pool synchronizes
    /// the device rather than grow. `None` (`auto`): 64 MiB, or up to 64 blocks of a large size,
    /// bounded by 1/128 of the device's memory (see `CachingPool`).
    pub pending_limit: Option<usize>,
    /// Ring size of the optional alloc/free timeline (0 = off).
    pub timeline: usize,
    /// Print one line per pool event worth knowing (out of memory, fallbacks).
    pub verbose: bool,
    /// `limit:`: the most device memory the process may hold on each device (`None`: no cap).
    pub limit: Option<MemLimit>,
    /// `fault:PLAN`: driver calls made to fail, for testing (`backend::fault`); empty: none.
    pub fault: crate::fault_plan::FaultPlan,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: BackendKind::Auto,
            backtrace: true,
            python_frames: PythonFrames::On,
            nvtx: false,
            leak_report: LeakReport::Full,
            report_path: None,
            report_json: None,
            report_svg: None,
            trace: None,
            max_frames: 32,
            unwinder: StackWalk::FramePointer,
            sim_capacity: 16 << 30,
            stream_safety: StreamSafety::Batched,
            pending_limit: None,
            timeline: 0,
            verbose: false,
            limit: None,
            fault: Default::default(),
        }
    }
}

impl Config {
    /// Parses a `HBMALLOC_CONF` string. Returns the configuration and one warning per bad entry.
    pub fn parse(text: &str) -> (Config, Vec<String>) {
        Config::parse_bytes(text.as_bytes())
    }

    /// Parses `HBMALLOC_CONF` as the bytes the environment holds. An entry that is not UTF-8 where
    /// it must be (a key, a non-path value) is warned about and skipped alone; path values may hold
    /// any bytes, as Linux paths do.
    pub fn parse_bytes(text: &[u8]) -> (Config, Vec<String>) {
        let mut cfg = Config::default();
        let mut warnings = Vec::new();
        for entry in text.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            if entry.is_empty() {
                continue;
            }
            let shown = printable(entry);
            let Some(colon) = entry.iter().position(|b| *b == b':') else {
                warnings.push(format!(
                    "hbmalloc: HBMALLOC_CONF entry '{shown}' has no ':value'; ignored"
                ));
                continue;
            };
            let (key, value) = (entry[..colon].trim_ascii(), entry[colon + 1..].trim_ascii());
            let Ok(key) = std::str::from_utf8(key) else {
                warnings.push(format!(
                    "hbmalloc: HBMALLOC_CONF entry '{shown}': key is not UTF-8; ignored"
                ));
                continue;
            };
            if let Err(why) = cfg.set(key, value) {
                // `why` may quote the value again (a value parser's own message): escaped too.
                warnings.push(format!(
                    "hbmalloc: HBMALLOC_CONF key '{}': {}; ignored",
                    printable(key.as_bytes()),
                    printable(why.as_bytes())
                ));
            }
        }
        (cfg, warnings)
    }

    fn set(&mut self, key: &str, raw: &[u8]) -> Result<(), String> {
        let path = || (!raw.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(raw)));
        let shown = printable(raw);
        let bad = |expected: &str| format!("bad value '{shown}' (expected {expected})");
        let value = match key {
            "report_path" | "report_json" | "report_svg" | "trace" => "",
            _ => std::str::from_utf8(raw).map_err(|_| bad("UTF-8 text"))?,
        };
        match key {
            "backend" => {
                self.backend = match value {
                    "auto" => BackendKind::Auto,
                    "cuda" => BackendKind::Cuda,
                    "sim" => BackendKind::Sim,
                    _ => return Err(bad("auto, cuda or sim")),
                }
            }
            "backtrace" => self.backtrace = parse_switch(value).ok_or_else(|| bad("on or off"))?,
            "verbose" => self.verbose = parse_switch(value).ok_or_else(|| bad("on or off"))?,
            "nvtx" => self.nvtx = parse_switch(value).ok_or_else(|| bad("on or off"))?,
            "python_frames" => {
                self.python_frames = match (value, parse_switch(value)) {
                    ("acquire", _) => PythonFrames::Acquire,
                    (_, Some(true)) => PythonFrames::On,
                    (_, Some(false)) => PythonFrames::Off,
                    _ => return Err(bad("on, off or acquire")),
                }
            }
            "leak_report" => {
                self.leak_report = match value {
                    "off" => LeakReport::Off,
                    "summary" => LeakReport::Summary,
                    "full" => LeakReport::Full,
                    _ => return Err(bad("off, summary or full")),
                }
            }
            "unwinder" => {
                self.unwinder = match value {
                    "fp" | "frame_pointer" => StackWalk::FramePointer,
                    "dwarf" => StackWalk::Dwarf,
                    _ => return Err(bad("fp or dwarf")),
                }
            }
            "stream_safety" => {
                self.stream_safety = match value {
                    "batched" => StreamSafety::Batched,
                    "eager" => StreamSafety::Eager,
                    "off" => StreamSafety::Off,
                    _ => return Err(bad("batched, eager or off")),
                }
            }
            "report_path" => self.report_path = Some(path().ok_or_else(|| bad("a file path"))?),
            "report_json" => self.report_json = Some(path().ok_or_else(|| bad("a file path"))?),
            "report_svg" => self.report_svg = Some(path().ok_or_else(|| bad("a file path"))?),
            "trace" => self.trace = Some(path().ok_or_else(|| bad("a file path"))?),
            "max_frames" => {
                self.max_frames = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=256).contains(n))
                    .ok_or_else(|| bad("a count from 1 to 256"))?
            }
            "timeline" => {
                self.timeline = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n <= 1 << 26)
                    .ok_or_else(|| bad("an event count up to 67108864"))?
            }
            "sim_capacity" => {
                self.sim_capacity = parse_size(value)
                    .filter(|n| *n >= 1 << 20 && *n <= 1 << 46)
                    .ok_or_else(|| bad("a size from 1MiB to 64TiB, e.g. 16GiB"))?
            }
            "pending_limit" => {
                self.pending_limit = match value {
                    "auto" => None,
                    _ => Some(parse_size(value).ok_or_else(|| bad("auto or a size, e.g. 256MiB"))?),
                }
            }
            "limit" => self.limit = Some(MemLimit::parse(value).map_err(bad)?),
            "fault" => {
                self.fault = crate::fault_plan::FaultPlan::parse(value)
                    .map_err(|why| bad(&format!("OP[@N[..[M]]] joined by '+': {why}")))?
            }
            _ => return Err("unknown key".to_string()),
        }
        Ok(())
    }
}

/// `limit:`, a cap on the device memory this process holds on each device
/// (`backend::limit::Limited`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MemLimit {
    /// At most this many bytes (at least 1 MiB).
    Bytes(usize),
    /// At most this share of each device's total memory, in (0, 1].
    Fraction(f64),
}

// The fraction is never NaN (`parse` accepts only (0, 1]), so equality is an equivalence.
impl Eq for MemLimit {}

impl MemLimit {
    /// `8GiB` (any size `parse_size` takes, at least 1 MiB) or `0.5` (a value with a decimal
    /// point is a fraction of the device's memory). The error is what was expected instead.
    fn parse(value: &str) -> Result<MemLimit, &'static str> {
        const SIZE: &str =
            "a size of at least 1MiB, e.g. 8GiB, or a fraction of the device's memory, e.g. 0.5";
        const FRACTION: &str = "a fraction of the device's memory above 0 and at most 1, e.g. 0.5";
        if value.contains('.') {
            // Digits and one point only: no sign, exponent, `inf` or `nan`.
            let plain = value.bytes().all(|b| b.is_ascii_digit() || b == b'.');
            return match value.parse::<f64>() {
                Ok(f) if plain && f > 0.0 && f <= 1.0 => Ok(MemLimit::Fraction(f)),
                _ => Err(FRACTION),
            };
        }
        match parse_size(value) {
            Some(n) if n >= 1 << 20 => Ok(MemLimit::Bytes(n)),
            _ => Err(SIZE),
        }
    }

    /// The cap in bytes on a device of `total` bytes.
    pub fn bytes(self, total: usize) -> usize {
        match self {
            MemLimit::Bytes(n) => n,
            MemLimit::Fraction(f) => (total as f64 * f) as usize,
        }
    }
}

/// `bytes` as text for a warning: not UTF-8 shown as U+FFFD, control characters (a newline, a
/// terminal escape) escaped, so that a warning is always one line.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .flat_map(|c| match c.is_control() {
            true => c.escape_default().collect::<Vec<_>>(),
            false => vec![c],
        })
        .collect()
}

fn parse_switch(value: &str) -> Option<bool> {
    match value {
        "on" | "true" | "1" => Some(true),
        "off" | "false" | "0" => Some(false),
        _ => None,
    }
}

/// Parses `4096`, `64KiB`, `16GiB`, `2GB`, `512MB`, `1TiB` (SI and binary suffixes both mean powers
/// of two here, as allocator settings conventionally do). `None` on anything else or on overflow.
pub fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits_end);
    let number: usize = number.parse().ok()?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    number.checked_mul(1usize << shift)
}

/// An `InitCell`: a fork waits for the configuration's set-up (`process::init`).
static CONFIG: InitCell<Config> = InitCell::new("config");

/// The process's configuration, read from `HBMALLOC_CONF` on first use; warnings go to stderr once.
pub fn get() -> &'static Config {
    CONFIG.get_or_init(|| {
        let text = std::env::var_os("HBMALLOC_CONF").unwrap_or_default();
        let (cfg, warnings) = Config::parse_bytes(text.as_bytes());
        for w in warnings {
            eprintln!("{w}");
        }
        cfg
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_empty() {
        let (cfg, warnings) = Config::parse("");
        assert_eq!(cfg, Config::default());
        assert!(warnings.is_empty());
    }

    #[test]
    fn parses_every_documented_key() {
        let (cfg, warnings) = Config::parse(
            "backend:sim, backtrace:off,leak_report:summary,report_path:/tmp/a.txt,\
             report_json:/tmp/a.json,report_svg:/tmp/a.svg,trace:/tmp/a.trace,sim_capacity:2GiB,max_frames:8,\
             stream_safety:eager,timeline:1000,pending_limit:64MiB,verbose:on,unwinder:dwarf,\
             python_frames:off",
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(cfg.backend, BackendKind::Sim);
        assert!(!cfg.backtrace);
        assert_eq!(cfg.leak_report, LeakReport::Summary);
        assert_eq!(cfg.report_path, Some("/tmp/a.txt".into()));
        assert_eq!(cfg.report_json, Some("/tmp/a.json".into()));
        assert_eq!(cfg.trace, Some("/tmp/a.trace".into()));
        assert_eq!(cfg.report_svg, Some("/tmp/a.svg".into()));
        assert_eq!(cfg.sim_capacity, 2 << 30);
        assert_eq!(cfg.max_frames, 8);
        assert_eq!(cfg.stream_safety, StreamSafety::Eager);
        assert_eq!(cfg.timeline, 1000);
        assert_eq!(cfg.pending_limit, Some(64 << 20));
        assert!(cfg.verbose);
        assert_eq!(cfg.unwinder, StackWalk::Dwarf);
        assert_eq!(cfg.python_frames, PythonFrames::Off);
        assert_eq!(Config::default().python_frames, PythonFrames::On);
        let (cfg, warnings) = Config::parse("python_frames:acquire");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(cfg.python_frames, PythonFrames::Acquire);
        let (cfg, warnings) = Config::parse("python_frames:always");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(cfg.python_frames, PythonFrames::On);
    }

    #[test]
    fn bad_entries_warn_once_each_and_keep_defaults() {
        let (cfg, warnings) =
            Config::parse("backend:gpu,nonsense,colour:blue,sim_capacity:lots,backtrace:off");
        assert_eq!(warnings.len(), 4, "{warnings:?}");
        assert!(warnings[0].contains("'backend'"));
        assert!(warnings[1].contains("'nonsense'"));
        assert!(warnings[2].contains("'colour'") && warnings[2].contains("unknown key"));
        assert!(warnings[3].contains("'sim_capacity'"));
        assert_eq!(cfg.backend, BackendKind::Auto);
        assert_eq!(cfg.sim_capacity, Config::default().sim_capacity);
        assert!(!cfg.backtrace, "good entries beside bad ones still apply");
    }

    #[test]
    fn non_utf8_bytes_cost_only_their_entry() {
        // A Latin-1 path is a legal Linux path: kept byte for byte.
        let (cfg, warnings) = Config::parse_bytes(b"backend:sim,report_path:/tmp/r\xe9sum\xe9.txt");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(cfg.backend, BackendKind::Sim);
        let path = cfg.report_path.expect("path kept");
        assert_eq!(path.as_os_str().as_bytes(), b"/tmp/r\xe9sum\xe9.txt");
        // A bad byte in a key or a non-path value: one warning, the other entries apply.
        let (cfg, warnings) =
            Config::parse_bytes(b"backtrace:off,ba\xffckend:sim,leak_report:s\xffmmary,verbose:on");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("not UTF-8"), "{warnings:?}");
        assert!(warnings[1].contains("'leak_report'"), "{warnings:?}");
        assert!(!cfg.backtrace && cfg.verbose);
        assert_eq!(cfg.backend, BackendKind::Auto);
        assert_eq!(cfg.leak_report, LeakReport::Full);
    }

    #[test]
    fn a_warning_is_one_line_whatever_the_entry_holds() {
        let (_, warnings) = Config::parse_bytes(b"evil\nhbmalloc: fake line,verbose:o\x1b[2Jn");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("key 'evil\\nhbmalloc'"),
            "{warnings:?}"
        );
        assert!(warnings[1].contains("'o\\u{1b}[2Jn'"), "{warnings:?}");
        assert!(warnings.iter().all(|w| !w.chars().any(char::is_control)));
    }

    #[test]
    fn fault_plans_are_read_and_bad_ones_warned_about() {
        let (cfg, warnings) = Config::parse("fault:alloc@2+sync");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(cfg.fault.rules.len(), 2);
        let (cfg, warnings) = Config::parse("fault:malloc@2");
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("unknown operation 'malloc'"),
            "{warnings:?}"
        );
        assert!(cfg.fault.rules.is_empty());
    }

    #[test]
    fn pending_limit_is_auto_by_default_and_on_request() {
        assert_eq!(Config::default().pending_limit, None);
        let (cfg, warnings) = Config::parse("pending_limit:256MiB,pending_limit:auto");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(cfg.pending_limit, None);
        let (cfg, warnings) = Config::parse("pending_limit:lots");
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("auto or a size"), "{warnings:?}");
        assert_eq!(cfg.pending_limit, None);
    }

    #[test]
    fn limit_takes_a_size_or_a_fraction() {
        let (cfg, warnings) = Config::parse("limit:8GiB");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(cfg.limit, Some(MemLimit::Bytes(8 << 30)));
        let (cfg, warnings) = Config::parse("limit:0.25");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(cfg.limit, Some(MemLimit::Fraction(0.25)));
        assert_eq!(cfg.limit.unwrap().bytes(16 << 30), 4 << 30);
        assert_eq!(
            Config::parse("limit:1.0").0.limit,
            Some(MemLimit::Fraction(1.0))
        );
        assert_eq!(Config::default().limit, None);
    }

    #[test]
    fn bad_limits_warn_and_keep_the_rest() {
        for (value, expected) in [
            ("0", "at least 1MiB"),
            ("1", "at least 1MiB"),
            ("lots", "at least 1MiB"),
            ("8XB", "at least 1MiB"),
            ("0.0", "above 0 and at most 1"),
            ("1.5", "above 0 and at most 1"),
            ("-0.5", "above 0 and at most 1"),
            ("1e-1.", "above 0 and at most 1"),
            ("0.5.5", "above 0 and at most 1"),
        ] {
            let (cfg, warnings) = Config::parse(&format!("limit:4GiB,limit:{value},verbose:on"));
            assert_eq!(warnings.len(), 1, "{value}: {warnings:?}");
            assert!(
                warnings[0].contains("key 'limit'") && warnings[0].contains(expected),
                "{value}: {warnings:?}"
            );
            assert_eq!(
                cfg.limit,
                Some(MemLimit::Bytes(4 << 30)),
                "{value}: earlier value kept"
            );
            assert!(cfg.verbose, "{value}: the other entries still apply");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64KiB"), Some(64 << 10));
        assert_eq!(parse_size("16gib"), Some(16 << 30));
        assert_eq!(parse_size("2GB"), Some(2 << 30));
        assert_eq!(parse_size("GiB"), None);
        assert_eq!(parse_size("12XB"), None);
        assert_eq!(parse_size("99999999999999999999TiB"), None);
    }
}
