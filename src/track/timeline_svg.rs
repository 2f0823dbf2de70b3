//! The timeline as a picture, for "where did my memory go": a stacked area chart of bytes in use
//! over time, one band per call site, written next to the timeline's JSON at exit.
//!
//! A call site here is the first user frame of the allocation's stack (`function file:line`), the
//! name the legend shows; the leak report's finer grouping by whole stack is in the JSON. The
//! `BANDS` sites with the highest peak get a band each, largest at the bottom; the rest share one
//! grey "other" band on top. The legend gives each band's own peak.
//!
//! The time axis is cut into one column per pixel. A column shows the moment of its highest total
//! within it, so no spike is lost however many events fall in a pixel. When older events were
//! dropped from the ring, bytes allocated before the window are unknown: each site is counted from
//! its lowest point in the window, so its band is a lower bound, and the subtitle says so.
//!
//! The model (`chart`) and the drawing (`render`) take plain events; `Tracker::write_timeline_svg`
//! (timeline.rs) feeds them. Hand-written SVG: no charting crate draws a stacked step area well, and this is ~30 elements.

use super::report::human_bytes;
use super::stacks::StackId;
use super::timeline::{Event, EventKind};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write;

/// Sites drawn with a band of their own; the rest are "other".
pub const BANDS: usize = 8;
/// Tableau 10, which stays distinguishable for the common colour-vision deficiencies.
const PALETTE: [&str; BANDS] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
];
const OTHER_COLOUR: &str = "#bab0ac";
const WIDTH: f64 = 960.0;
/// Columns of the time axis: one per pixel of the plot.
pub const COLUMNS: usize = (PLOT_RIGHT - PLOT_LEFT) as usize;
const PLOT_LEFT: f64 = 92.0;
const PLOT_RIGHT: f64 = 936.0;
const PLOT_TOP: f64 = 72.0;
const PLOT_BOTTOM: f64 = 432.0;
const LEGEND_TOP: f64 = 496.0;
const LEGEND_ROW: f64 = 21.0;
const FONT: &str = "DejaVu Sans, Verdana, Helvetica, Arial, sans-serif";
/// Legend names longer than this are cut.
const MAX_LABEL: usize = 110;
const BOLD_18: &str = "font-size=\"18\" font-weight=\"bold\"";
const GREY: &str = "fill=\"#555\"";
const END: &str = "text-anchor=\"end\"";
const MIDDLE: &str = "text-anchor=\"middle\"";

/// One band of the chart: a site, or several as "other".
#[derive(Clone, Debug)]
pub struct Band {
    pub label: String,
    /// Palette colours in order; grey for the sites beyond the `BANDS` largest, together.
    pub colour: &'static str,
    /// The highest bytes in use of this band alone.
    pub peak: u64,
    /// Bytes in use per column.
    pub values: Vec<u64>,
}

/// What the picture shows, before any drawing: bands bottom first.
#[derive(Clone, Debug)]
pub struct Chart {
    pub t0_ns: u64,
    pub t1_ns: u64,
    pub bands: Vec<Band>,
    /// The highest total of all bands, and when.
    pub peak: u64,
    pub peak_ns: u64,
    pub events: usize,
    pub dropped: u64,
}

/// Builds the chart of `events` (oldest first) over `columns` columns; `label_of` names the call
/// site of a stack, and stacks with the same name are one site.
pub fn chart(
    events: &[Event],
    dropped: u64,
    columns: usize,
    label_of: &mut dyn FnMut(StackId) -> String,
) -> Chart {
    let columns = columns.max(1);
    // Sites by name, numbered in order of appearance; each event's site.
    let (mut by_label, mut by_stack) = (HashMap::new(), HashMap::new());
    let site_of: Vec<usize> = (events.iter())
        .map(|e| {
            let n = by_label.len();
            *by_stack
                .entry(e.stack)
                .or_insert_with(|| *by_label.entry(label_of(e.stack)).or_insert(n))
        })
        .collect();
    let mut labels = vec![String::new(); by_label.len()];
    for (label, site) in by_label {
        labels[site] = label;
    }
    let delta = |e: &Event| match e.kind {
        EventKind::Alloc => e.size as i64,
        EventKind::Free => -(e.size as i64),
    };

    // First pass: each site's lowest and highest running total, so that a window that starts
    // after older events were dropped never shows a negative band.
    let mut running = vec![0i64; labels.len()];
    let (mut low, mut high) = (vec![0i64; labels.len()], vec![0i64; labels.len()]);
    for (e, &s) in events.iter().zip(&site_of) {
        running[s] += delta(e);
        low[s] = low[s].min(running[s]);
        high[s] = high[s].max(running[s]);
    }
    let site_peak: Vec<i64> = (0..labels.len()).map(|s| high[s] - low[s]).collect();

    // Bands: the largest sites, then the rest together. Nine sites get nine bands, not eight and
    // an "other" of one.
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.sort_by(|&a, &b| site_peak[b].cmp(&site_peak[a]).then(a.cmp(&b)));
    let own = match order.len() {
        n if n <= BANDS + 1 => n,
        _ => BANDS,
    };
    let band = |label, colour| Band {
        label,
        colour,
        peak: 0,
        values: vec![0; columns],
    };
    let mut band_of = vec![own; labels.len()];
    let mut bands = Vec::new();
    for (b, &s) in order[..own].iter().enumerate() {
        band_of[s] = b;
        bands.push(band(labels[s].clone(), PALETTE[b % PALETTE.len()]));
    }
    if order.len() > own {
        bands.push(band(
            format!("other ({} call sites)", order.len() - own),
            OTHER_COLOUR,
        ));
    }

    // Second pass: the state of every band at each column's highest total, and each band's own
    // peak (which may fall at another moment than its column's).
    let mut state = vec![0i64; bands.len()];
    for s in 0..labels.len() {
        state[band_of[s]] -= low[s];
    }
    for (band, &v) in bands.iter_mut().zip(&state) {
        band.peak = v as u64;
    }
    let t0 = events.first().map_or(0, |e| e.time_ns);
    let t1 = events.last().map_or(0, |e| e.time_ns.max(t0));
    let span = (t1 - t0).max(1) as u128;
    let column_of =
        |t: u64| (((t - t0) as u128 * columns as u128 / span) as usize).min(columns - 1);
    let total = |v: &[i64]| v.iter().sum::<i64>();
    let (mut best, mut column) = (state.clone(), 0);
    let (mut peak, mut peak_ns) = (total(&state), t0);
    let finish = |column: usize, best: &[i64], bands: &mut [Band]| {
        for (band, &v) in bands.iter_mut().zip(best) {
            band.values[column] = v.max(0) as u64;
        }
    };
    for (e, &s) in events.iter().zip(&site_of) {
        let c = column_of(e.time_ns);
        while column < c {
            finish(column, &best, &mut bands);
            column += 1;
            best.clone_from(&state);
        }
        let b = band_of[s];
        state[b] += delta(e);
        bands[b].peak = bands[b].peak.max(state[b].max(0) as u64);
        if total(&state) > total(&best) {
            best.clone_from(&state);
        }
        if total(&state) > peak {
            (peak, peak_ns) = (total(&state), e.time_ns);
        }
    }
    finish(column, &best, &mut bands);
    for c in column + 1..columns {
        finish(c, &state, &mut bands);
    }
    Chart {
        t0_ns: t0,
        t1_ns: t1,
        bands,
        peak: peak.max(0) as u64,
        peak_ns,
        events: events.len(),
        dropped,
    }
}

/// A 1-2-5 step of at least `raw`, in units of `unit`, as a multiple of `unit`.
fn nice_step(raw: f64, unit: f64) -> f64 {
    let x = (raw / unit).max(1e-9);
    let decade = 10f64.powf(x.log10().floor());
    let m = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .find(|m| m * decade >= x)
        .unwrap_or(10.0);
    m * decade * unit
}

/// `1.5 s`, `250 ms`: time `ns` in the unit that suits `scale`, with the decimals `step` needs.
fn human_time(ns: u64, scale: u64, step: f64) -> String {
    let (unit, name) = [(1e9, "s"), (1e6, "ms"), (1e3, "µs"), (1.0, "ns")]
        .into_iter()
        .find(|(u, _)| scale as f64 >= *u)
        .unwrap_or((1.0, "ns"));
    let decimals = (-(step / unit).log10()).ceil().clamp(0.0, 9.0) as usize;
    format!("{:.*} {name}", decimals, ns as f64 / unit)
}

/// Escapes text for an SVG element or attribute.
fn esc(s: &str) -> String {
    let s = s.replace('&', "&amp;").replace('<', "&lt;");
    s.replace('>', "&gt;").replace('"', "&quot;")
}

/// Cuts `s` to `MAX_LABEL` characters, keeping its end (the file and line).
fn shorten(s: &str) -> String {
    let n = s.chars().count();
    match n <= MAX_LABEL {
        true => s.to_string(),
        false => format!("…{}", s.chars().skip(n + 1 - MAX_LABEL).collect::<String>()),
    }
}

/// The document being written.
struct Svg(String);

impl Svg {
    /// Appends a `<text>` element; `attrs` are extra attributes, `body` is escaped here.
    fn text(&mut self, x: f64, y: f64, attrs: &str, body: &str) {
        let _ = writeln!(
            self.0,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" {attrs}>{}</text>",
            esc(body)
        );
    }
}

/// Writes `chart` as an SVG document.
pub fn render(chart: &Chart, w: &mut dyn Write) -> std::io::Result<()> {
    let height = LEGEND_TOP + chart.bands.len().max(1) as f64 * LEGEND_ROW + 16.0;
    let mut s = Svg(format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"{FONT}\" font-size=\"12\" fill=\"#222\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n"
    ));
    let title = "hbmalloc: bytes in use over time by call site";
    s.text(PLOT_LEFT, 28.0, BOLD_18, title);
    let scale = chart.t1_ns.max(1);
    let mut subtitle = format!(
        "{} events; peak {} at {}",
        chart.events,
        human_bytes(chart.peak),
        human_time(chart.peak_ns, scale, scale as f64 / 1000.0),
    );
    if chart.dropped > 0 {
        let _ = write!(
            subtitle,
            "; {} older events dropped, so each band counts from its lowest point (a lower bound)",
            chart.dropped
        );
    }
    s.text(PLOT_LEFT, 48.0, GREY, &subtitle);
    if chart.events == 0 {
        s.text(PLOT_LEFT, PLOT_TOP + 40.0, GREY, "no events recorded");
        s.0.push_str("</svg>\n");
        return w.write_all(s.0.as_bytes());
    }

    // y from 0 to a 1-2-5 step above the peak, labelled in the binary unit of the step.
    let raw = chart.peak.max(1) as f64 / 5.0;
    let (unit, unit_name) = [(1u64 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB")]
        .into_iter()
        .chain([(1 << 10, "KiB"), (1, "bytes")])
        .find(|&(u, _)| raw >= u as f64)
        .map_or((1.0, "bytes"), |(u, name)| (u as f64, name));
    let y_step = nice_step(raw, unit).max(1.0);
    let y_max = (chart.peak.max(1) as f64 / y_step).ceil() * y_step;
    let y_of = |bytes: f64| PLOT_BOTTOM - bytes / y_max * (PLOT_BOTTOM - PLOT_TOP);
    let mut v = 0.0;
    while v <= y_max + y_step / 2.0 {
        let y = y_of(v);
        let _ = writeln!(
            s.0,
            "<line x1=\"{PLOT_LEFT}\" x2=\"{PLOT_RIGHT}\" y1=\"{y:.1}\" y2=\"{y:.1}\" \
             stroke=\"#e4e4e4\"/>"
        );
        let label = match v == 0.0 {
            true => "0".to_string(),
            false => format!("{} {unit_name}", trim_number(v / unit)),
        };
        s.text(PLOT_LEFT - 8.0, y + 4.0, END, &label);
        v += y_step;
    }
    let mid = (PLOT_TOP + PLOT_BOTTOM) / 2.0;
    let rotated = format!("transform=\"rotate(-90 20 {mid:.1})\" {MIDDLE}");
    s.text(20.0, mid, &rotated, "bytes in use");

    // x over the window, ticks at 1-2-5 steps of the time unit that suits the span.
    let plot_w = PLOT_RIGHT - PLOT_LEFT;
    let span = (chart.t1_ns - chart.t0_ns).max(1) as f64;
    let x_of = |t: f64| PLOT_LEFT + (t - chart.t0_ns as f64) / span * plot_w;
    let t_unit = [1e9, 1e6, 1e3].into_iter().find(|&u| span / 6.0 >= u);
    let x_step = nice_step(span / 6.0, t_unit.unwrap_or(1.0)).max(1.0);
    let mut t = (chart.t0_ns as f64 / x_step).ceil() * x_step;
    while t <= chart.t1_ns as f64 + 0.5 {
        let x = x_of(t);
        let _ = writeln!(
            s.0,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{PLOT_BOTTOM}\" y2=\"{:.1}\" stroke=\"#333\"/>",
            PLOT_BOTTOM + 5.0
        );
        let label = human_time(t as u64, scale, x_step);
        s.text(x, PLOT_BOTTOM + 19.0, MIDDLE, &label);
        t += x_step;
    }
    let x_title = "time since the tracker started";
    s.text(
        (PLOT_LEFT + PLOT_RIGHT) / 2.0,
        PLOT_BOTTOM + 40.0,
        MIDDLE,
        x_title,
    );

    // Bands, bottom first, as step outlines: along the top edge left to right, back along the
    // bottom edge (the top of the band below).
    let columns = chart.bands[0].values.len();
    let col_w = plot_w / columns as f64;
    let mut lower = vec![0u64; columns];
    for band in &chart.bands {
        let upper: Vec<u64> = lower.iter().zip(&band.values).map(|(a, b)| a + b).collect();
        let y = |b: u64| y_of(b as f64);
        let mut d = format!("M{PLOT_LEFT:.1},{:.1}", y(upper[0]));
        for c in 0..columns {
            let _ = write!(d, "H{:.1}", PLOT_LEFT + (c + 1) as f64 * col_w);
            if c + 1 < columns && upper[c + 1] != upper[c] {
                let _ = write!(d, "V{:.1}", y(upper[c + 1]));
            }
        }
        let _ = write!(d, "V{:.1}", y(lower[columns - 1]));
        for c in (0..columns).rev() {
            let _ = write!(d, "H{:.1}", PLOT_LEFT + c as f64 * col_w);
            if c > 0 && lower[c - 1] != lower[c] {
                let _ = write!(d, "V{:.1}", y(lower[c - 1]));
            }
        }
        let label = esc(&band.label);
        let _ = writeln!(
            s.0,
            "<path class=\"band\" data-site=\"{label}\" data-peak=\"{}\" d=\"{d}Z\" fill=\"{}\" \
             stroke=\"#ffffff\" stroke-width=\"0.4\"><title>{label}: peak {}</title></path>",
            band.peak,
            band.colour,
            human_bytes(band.peak)
        );
        lower = upper;
    }
    let (py, px) = (y_of(chart.peak as f64), x_of(chart.peak_ns as f64));
    let _ = writeln!(
        s.0,
        "<line class=\"peak\" data-bytes=\"{}\" x1=\"{PLOT_LEFT}\" x2=\"{PLOT_RIGHT}\" \
         y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#222\" stroke-dasharray=\"4 3\"/>\
         <circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"3\" fill=\"#222\"/>\n\
         <path d=\"M{PLOT_LEFT},{PLOT_TOP}V{PLOT_BOTTOM}H{PLOT_RIGHT}\" fill=\"none\" \
         stroke=\"#333\"/>",
        chart.peak
    );
    let peak = format!("peak {}", human_bytes(chart.peak));
    s.text(PLOT_RIGHT - 4.0, py - 6.0, END, &peak);

    // Legend: largest first, each with its own peak.
    let heading = "peak · call site (first frame outside hbmalloc)";
    s.text(PLOT_LEFT, LEGEND_TOP - 6.0, "font-weight=\"bold\"", heading);
    for (i, band) in chart.bands.iter().enumerate() {
        let y = LEGEND_TOP + 6.0 + i as f64 * LEGEND_ROW;
        let _ = writeln!(
            s.0,
            "<rect x=\"{PLOT_LEFT}\" y=\"{y:.1}\" width=\"13\" height=\"13\" fill=\"{}\"/>",
            band.colour
        );
        s.text(PLOT_LEFT + 88.0, y + 11.0, END, &human_bytes(band.peak));
        s.text(PLOT_LEFT + 98.0, y + 11.0, "", &shorten(&band.label));
    }
    s.0.push_str("</svg>\n");
    w.write_all(s.0.as_bytes())
}

/// `2`, `2.5`: no trailing zeros.
fn trim_number(x: f64) -> String {
    let s = format!("{x:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}
