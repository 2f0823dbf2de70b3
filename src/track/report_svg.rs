//! The SVG leak report: a flame graph of leaked bytes by call stack, drawn by `inferno`.
//!
//! Each leaking call site becomes one folded stack (outermost frame first) weighted by its bytes;
//! a box's width is the bytes leaked under that frame. The SVG is interactive in a browser
//! (click to zoom, Ctrl-F to search), as inferno's are.

use super::registry::Tracker;
use super::report::{human_bytes, LeakReport};
use inferno::flamegraph::{self, Options};
use std::io::Write;

/// The folded-stack lines (`outer;...;inner bytes`) of `report`, one per call site.
pub fn folded_lines(report: &LeakReport) -> Vec<String> {
    report
        .sites
        .iter()
        .filter(|site| site.bytes > 0)
        .map(|site| {
            // Outermost first: the Python stack, then the native frames under its innermost line.
            let python = site
                .python
                .iter()
                .rev()
                .map(|f| format!("{} [{}:{}]", f.function, f.file, f.line));
            let native = site.frames.iter().rev().map(|f| f.label());
            let mut names: Vec<String> = python
                .chain(native)
                // ';' separates frames and the last space separates the count: keep both out.
                .map(|label| label.replace(';', ":").replace(char::is_whitespace, "_"))
                .collect();
            if names.is_empty() {
                names.push("(no stack)".to_string());
            }
            format!("{} {}", names.join(";"), site.bytes)
        })
        .collect()
}

/// Writes `report` as a flame graph; a small SVG saying so when nothing leaked.
pub fn write(report: &LeakReport, w: &mut dyn Write) -> std::io::Result<()> {
    let lines = folded_lines(report);
    let summary = format!(
        "{} bytes ({}) leaked in {} allocations",
        report.summary.bytes,
        human_bytes(report.summary.bytes),
        report.summary.count
    );
    if lines.is_empty() {
        return write!(
            w,
            "<?xml version=\"1.0\" standalone=\"no\"?>\n\
             <svg version=\"1.1\" xmlns=\"http://www.w3.org/2000/svg\" width=\"640\" height=\"60\" \
             viewBox=\"0 0 640 60\"><text x=\"12\" y=\"36\" font-family=\"Verdana\" font-size=\"16\">\
             hbmalloc: no leaks ({summary})</text></svg>\n"
        );
    }
    let mut options = Options::default();
    options.title = "hbmalloc: leaked bytes by call stack".to_string();
    options.subtitle = Some(summary);
    options.count_name = "bytes".to_string();
    options.name_type = "Frame:".to_string();
    options.deterministic = true;
    flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), w)
}

impl Tracker {
    /// Writes the flame graph of every live allocation.
    pub fn write_svg_report(&self, w: &mut dyn Write) -> std::io::Result<()> {
        write(&self.leak_report(), w)
    }
}
