"""Plain-SVG line charts for scripts/bench-table.py: no dependency beyond Python itself, so CI
can draw and check them. One function, `line_chart`; every allocator keeps its colour across
charts (`colour`)."""
import math
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 900, 460
LEFT, RIGHT, TOP, BOTTOM = 80, 290, 40, 70  # margins: the legend sits in the right one
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#7f7f7f", "#bcbd22", "#393b79", "#637939"]
_assigned = {"in use": "#444444"}


def colour(name):
    """The same colour for an allocator in every chart of one run."""
    if name not in _assigned:
        _assigned[name] = PALETTE[len(_assigned) % len(PALETTE)]
    return _assigned[name]


def _ticks(lo, hi, log):
    """About five round tick values covering [lo, hi]."""
    if log:
        first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        return [10.0 ** e for e in range(first, last + 1)]
    step = 10 ** math.floor(math.log10((hi - lo) or 1))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= 6:
            step *= m
            break
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 2)]


def _label(v):
    if v >= 1e6 or (0 < v < 1e-2):
        return f"{v:.0e}"
    return f"{v:g}"


def line_chart(path, title, x_label, y_label, lines, log_x=False, log_y=False, x_format=_label,
               hlines=(), note=""):
    """Writes one chart to `path`. `lines`: [(name, [(x, y), ...], dashed[, colour key])], drawn
    in order; `hlines`: [(name, y[, colour key])] drawn as dotted horizontal references (the
    colour key, default the name, gives lines of one allocator one colour); `note`, a small line at the
    bottom (where the figures come from). Points with a non-positive
    coordinate on a log axis are left out."""
    def usable(x, y):
        return (x > 0 or not log_x) and (y > 0 or not log_y)
    points = [(x, y) for _, pts, *_ in lines for x, y in pts if usable(x, y)]
    points += [(points[0][0], h[1]) for h in hlines if points and usable(points[0][0], h[1])]
    if not points:
        raise ValueError(f"{path}: nothing to plot")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks = _ticks(min(xs), max(xs), log_x) if log_x else _ticks(min(xs + [0]), max(xs), False)
    y_ticks = _ticks(min(ys), max(ys), log_y) if log_y else _ticks(min(ys + [0]), max(ys) * 1.05, False)
    x_lo, x_hi = (min(xs), max(xs)) if log_x else (x_ticks[0], max(xs))
    y_lo, y_hi = y_ticks[0], y_ticks[-1]
    if log_x and x_lo == x_hi:
        x_lo, x_hi = x_lo / 2, x_hi * 2
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def scale(v, lo, hi, log):
        if log:
            v, lo, hi = math.log10(v), math.log10(lo), math.log10(hi)
        return (v - lo) / ((hi - lo) or 1)

    def sx(x):
        return LEFT + plot_w * scale(x, x_lo, x_hi, log_x)

    def sy(y):
        return TOP + plot_h * (1 - scale(y, y_lo, y_hi, log_y))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{LEFT}" y="24" font-size="15">{escape(title)}</text>']
    for t in y_ticks:
        if y_lo <= t <= y_hi:
            y = sy(t)
            out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(_label(t))}</text>')
    tick_xs = sorted(set(xs)) if log_x and len(set(xs)) <= 8 else [t for t in x_ticks if x_lo <= t <= x_hi]
    for t in tick_xs:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{escape(x_format(t))}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{LEFT + plot_w / 2:.0f}" y="{TOP + plot_h + 36}" text-anchor="middle">{escape(x_label)}</text>')
    if note:
        out.append(f'<text x="8" y="{HEIGHT - 8}" font-size="10" fill="#555">{escape(note)}</text>')
    out.append(f'<text transform="translate(18 {TOP + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle">'
               f'{escape(y_label)}</text>')
    legend_y = TOP + 8
    for name, y, *key in hlines:
        if not usable(points[0][0], y):
            continue
        c = colour(key[0] if key else name)
        out.append(f'<line class="reference" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                   f'stroke="{c}" stroke-dasharray="2 3"/>')
        out.append(_legend(legend_y, c, "2 3", name))
        legend_y += 18
    for name, pts, dashed, *key in lines:
        pts = [(x, y) for x, y in pts if usable(x, y)]
        if not pts:
            continue
        c, dash = colour(key[0] if key else name), "6 4" if dashed else ""
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline data-name="{escape(name)}" points="{coords}" fill="none" stroke="{c}" '
                   f'stroke-width="2"{dash_attr}/>')
        if len(pts) <= 12:  # a few measured points: mark them
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>' for x, y in pts]
        out.append(_legend(legend_y, c, dash, name))
        legend_y += 18
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def _legend(y, c, dash, name):
    x = WIDTH - RIGHT + 12
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<line x1="{x}" x2="{x + 22}" y1="{y}" y2="{y}" stroke="{c}" stroke-width="2"{dash_attr}/>'
            f'<text class="legend" x="{x + 28}" y="{y + 4}">{escape(name)}</text>')
