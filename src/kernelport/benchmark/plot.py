"""The latency chart of `kernelport bench`: a histogram of the latencies and their percentile curve, as a
self-contained HTML page (inline SVG) or a PNG image, with no plotting library.

`chart_series` turns latencies into the two series; `render_svg` and `render_png` draw the same chart
(`Chart`, a list of shapes in pixel coordinates) as SVG text or as RGB pixels. The PNG encoder writes the
signature, IHDR, one IDAT (zlib, filter 0 on every row) and IEND chunks, each with its CRC.
"""

from __future__ import annotations

import html
import json
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Chart", "chart_series", "encode_png", "render_html", "render_png", "render_svg", "write_plot"]

WIDTH, HEIGHT = 960, 400
BAR = (70, 120, 190)
CURVE = (200, 80, 40)
AXIS = (40, 40, 40)
GRID = (225, 225, 225)
WHITE = (255, 255, 255)
Color = tuple[int, int, int]


def chart_series(latencies_ns: np.ndarray, bins: int = 40, points: int = 200) -> dict[str, Any]:
    """The histogram (bin edges in µs, counts; log-spaced bins when the latencies span more than a factor
    of 20) and the percentile curve (percentile, µs) of a set of latencies."""
    us = np.asarray(latencies_ns, dtype=np.float64) / 1e3
    if us.size == 0:
        return {"histogram": {"edges_us": [], "counts": [], "log": False}, "percentiles": []}
    lo, hi = float(us.min()), float(us.max())
    log = lo > 0 and hi / lo > 20
    if hi <= lo:
        edges = np.array([lo * 0.99, hi * 1.01 + 1e-3])
    elif log:
        edges = np.geomspace(lo, hi, bins + 1)
    else:
        edges = np.linspace(lo, hi, bins + 1)
    counts, edges = np.histogram(us, bins=edges)
    # percentiles on a "nines" scale: evenly spaced in -log10(1 - p), up to the last one the data holds
    top = 1.0 - 1.0 / us.size if us.size > 1 else 0.5
    nines = np.linspace(0.0, -math.log10(1.0 - top), points) if top > 0 else np.zeros(1)
    pct = 100.0 * (1.0 - 10.0 ** -nines)
    values = np.percentile(us, pct)
    return {
        "histogram": {"edges_us": [float(e) for e in edges], "counts": [int(c) for c in counts], "log": bool(log)},
        "percentiles": [[float(p), float(v)] for p, v in zip(pct, values)],
    }


# ---- the chart as shapes -------------------------------------------------------------------------------


@dataclass
class Chart:
    width: int
    height: int
    shapes: list[tuple[Any, ...]] = field(default_factory=list)
    # ("rect", x, y, w, h, color, attrs) ("line", x1, y1, x2, y2, color) ("poly", [(x, y)], color, attrs)
    # ("text", x, y, text, anchor, size)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v >= 100 or v == int(v):
        return f"{v:.0f}"
    return f"{v:.3g}"


def build_chart(series: Mapping[str, Any], title: str = "") -> Chart:
    chart = Chart(WIDTH, HEIGHT)
    s = chart.shapes
    top, bottom = 40, HEIGHT - 50
    if title:
        s.append(("text", WIDTH / 2, 22, title, "middle", 14))
    hist = series["histogram"]
    edges, counts, log = hist["edges_us"], hist["counts"], hist["log"]
    # left panel: histogram
    x0, x1 = 70.0, WIDTH / 2 - 30
    s.append(("text", (x0 + x1) / 2, HEIGHT - 12, "latency us" + (" (log scale)" if log else ""), "middle", 12))
    s.append(("text", 16, (top + bottom) / 2, "requests", "middle", 12))
    if counts:
        cmax = max(counts) or 1
        e0, e1 = edges[0], edges[-1]
        tx = (lambda v: x0 + (math.log(v / e0) / math.log(e1 / e0)) * (x1 - x0)) if log else \
            (lambda v: x0 + (v - e0) / (e1 - e0) * (x1 - x0))
        ty = lambda c: bottom - c / cmax * (bottom - top)  # noqa: E731
        for t in _ticks(0, cmax, 4):
            s.append(("line", x0, ty(t), x1, ty(t), GRID))
            s.append(("text", x0 - 6, ty(t) + 4, _fmt(t), "end", 11))
        for lo, hi, c in zip(edges, edges[1:], counts):
            xa, xb = tx(lo), tx(hi)
            s.append(("rect", xa, ty(c), max(1.0, xb - xa - 1), bottom - ty(c), BAR,
                      {"class": "bar", "data-lo-us": f"{lo:.3f}", "data-hi-us": f"{hi:.3f}", "data-count": str(c)}))
        xt = [e0 * (e1 / e0) ** (i / 4) for i in range(5)] if log else _ticks(e0, e1, 5)
        for t in xt:
            if e0 <= t <= e1:
                s.append(("line", tx(t), bottom, tx(t), bottom + 4, AXIS))
                s.append(("text", tx(t), bottom + 17, _fmt(t), "middle", 11))
    s.append(("line", x0, bottom, x1, bottom, AXIS))
    s.append(("line", x0, top, x0, bottom, AXIS))
    # right panel: percentile curve, x on the nines scale
    x0, x1 = WIDTH / 2 + 60, WIDTH - 30
    s.append(("text", (x0 + x1) / 2, HEIGHT - 12, "percentile", "middle", 12))
    s.append(("text", WIDTH / 2 + 10, (top + bottom) / 2, "us", "middle", 12))
    pts = series["percentiles"]
    if pts:
        nmax = max(-math.log10(1 - p / 100.0) if p < 100 else 0.0 for p, _ in pts) or 1.0
        vmax = max(v for _, v in pts) or 1.0
        tx = lambda p: x0 + (-math.log10(1 - p / 100.0)) / nmax * (x1 - x0)  # noqa: E731
        ty = lambda v: bottom - v / vmax * (bottom - top)  # noqa: E731
        for t in _ticks(0, vmax, 4):
            s.append(("line", x0, ty(t), x1, ty(t), GRID))
            s.append(("text", x0 - 6, ty(t) + 4, _fmt(t), "end", 11))
        for p, label in ((0.0, "p0"), (50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p99.9"),
                         (99.99, "p99.99")):
            if -math.log10(1 - p / 100.0) <= nmax + 1e-9:
                s.append(("line", tx(p), bottom, tx(p), bottom + 4, AXIS))
                s.append(("text", tx(p), bottom + 17, label, "middle", 11))
        s.append(("poly", [(tx(p), ty(v)) for p, v in pts], CURVE,
                  {"class": "percentiles", "data-points": str(len(pts))}))
    s.append(("line", x0, bottom, x1, bottom, AXIS))
    s.append(("line", x0, top, x0, bottom, AXIS))
    return chart


# ---- SVG and HTML --------------------------------------------------------------------------------------


def _rgb(c: Color) -> str:
    return f"rgb({c[0]},{c[1]},{c[2]})"


def _attrs(d: Mapping[str, str]) -> str:
    return "".join(f' {k}="{html.escape(v)}"' for k, v in d.items())


def render_svg(chart: Chart) -> str:
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{chart.width}" height="{chart.height}" '
           f'viewBox="0 0 {chart.width} {chart.height}" font-family="sans-serif">',
           f'<rect x="0" y="0" width="{chart.width}" height="{chart.height}" fill="white"/>']
    for sh in chart.shapes:
        kind = sh[0]
        if kind == "rect":
            _, x, y, w, h, c, attrs = sh
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{_rgb(c)}"'
                       f'{_attrs(attrs)}><title>{html.escape(attrs.get("data-lo-us", ""))}-'
                       f'{html.escape(attrs.get("data-hi-us", ""))} us: {html.escape(attrs.get("data-count", ""))}'
                       f'</title></rect>')
        elif kind == "line":
            _, xa, ya, xb, yb, c = sh
            out.append(f'<line x1="{xa:.1f}" y1="{ya:.1f}" x2="{xb:.1f}" y2="{yb:.1f}" stroke="{_rgb(c)}"/>')
        elif kind == "poly":
            _, pts, c, attrs = sh
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(f'<polyline points="{points}" fill="none" stroke="{_rgb(c)}" stroke-width="2"'
                       f'{_attrs(attrs)}/>')
        elif kind == "text":
            _, x, y, text, anchor, size = sh
            rotate = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if x < 30 or x == WIDTH / 2 + 10 else ""
            out.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}"{rotate}>'
                       f'{html.escape(text)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def render_html(series: Mapping[str, Any], summary: Mapping[str, Any], title: str) -> str:
    """A page with the chart (inline SVG), the summary table and the series as JSON; it loads nothing."""
    svg = render_svg(build_chart(series, title))
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in summary.items())
    data = json.dumps({"summary": summary, "series": series}, separators=(",", ":")).replace("</", "<\\/")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:20px}th{text-align:left;padding-right:16px}"
        "table{border-collapse:collapse;margin-top:12px}</style></head><body>\n"
        f"<h2>{html.escape(title)}</h2>\n{svg}\n<table>{rows}</table>\n"
        f'<script type="application/json" id="kernelport-bench-data">{data}</script>\n</body></html>\n'
    )


# ---- PNG -----------------------------------------------------------------------------------------------

# 3x5 glyphs (rows top to bottom, 3 bits each, high bit left) for the tick labels; a label with another
# character (the titles) is left out of the PNG (the HTML chart has every label).
_GLYPHS = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "p": (6, 5, 6, 4, 4),
    "u": (0, 5, 5, 5, 7), "s": (3, 4, 2, 1, 6), "-": (0, 0, 7, 0, 0), "e": (7, 5, 7, 4, 7),
}  # fmt: skip


class Canvas:
    """RGB pixels (height x width x 3, uint8) with the few drawing operations the chart needs."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.px = np.empty((height, width, 3), dtype=np.uint8)
        self.px[:, :] = background
        self.w, self.h = width, height

    def rect(self, x: float, y: float, w: float, h: float, c: Color) -> None:
        xa, ya = max(0, int(round(x))), max(0, int(round(y)))
        xb, yb = min(self.w, int(round(x + w))), min(self.h, int(round(y + h)))
        if xb > xa and yb > ya:
            self.px[ya:yb, xa:xb] = c

    def line(self, xa: float, ya: float, xb: float, yb: float, c: Color, width: int = 1) -> None:
        n = int(max(abs(xb - xa), abs(yb - ya))) + 1
        xs = np.rint(np.linspace(xa, xb, n)).astype(int)
        ys = np.rint(np.linspace(ya, yb, n)).astype(int)
        for dx in range(width):
            for dy in range(width):
                x, y = xs + dx - width // 2, ys + dy - width // 2
                ok = (x >= 0) & (x < self.w) & (y >= 0) & (y < self.h)
                self.px[y[ok], x[ok]] = c

    def text(self, x: float, y: float, text: str, anchor: str, scale: int = 2, c: Color = AXIS) -> None:
        if any(ch not in _GLYPHS for ch in text):
            return
        advance = 4 * scale
        width = len(text) * advance
        left = x - width / 2 if anchor == "middle" else x - width if anchor == "end" else x
        top = int(y) - 5 * scale
        for i, ch in enumerate(text):
            glyph = _GLYPHS[ch]
            gx = int(left) + i * advance
            for row, bits in enumerate(glyph):
                for col in range(3):
                    if bits & (4 >> col):
                        self.rect(gx + col * scale, top + row * scale, scale, scale, c)


def render_png(chart: Chart) -> bytes:
    canvas = Canvas(chart.width, chart.height)
    for sh in chart.shapes:
        kind = sh[0]
        if kind == "rect":
            canvas.rect(sh[1], sh[2], sh[3], sh[4], sh[5])
        elif kind == "line":
            canvas.line(sh[1], sh[2], sh[3], sh[4], sh[5])
        elif kind == "poly":
            pts = sh[1]
            for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
                canvas.line(xa, ya, xb, yb, sh[2], width=2)
        elif kind == "text":
            _, x, y, text, anchor, size = sh
            if not (x < 30 or x == WIDTH / 2 + 10):  # the rotated axis titles are HTML-only
                canvas.text(x, y, text, anchor)
    return encode_png(canvas.px)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of a (height, width, 3) uint8 array."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError("encode_png takes a (height, width, 3) uint8 array")
    h, w, _ = pixels.shape
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)  # filter type 0 (None) at the start of every row
    raw[:, 1:] = pixels.reshape(h, 3 * w)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, filter 0, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + _chunk(b"IEND", b""))


def write_plot(path: str, latencies_ns: np.ndarray, summary: Mapping[str, Any], title: str) -> None:
    """The chart into `path`: HTML (inline SVG) for `.html`/`.htm`, PNG for `.png`."""
    series = chart_series(latencies_ns)
    lower = path.lower()
    if lower.endswith((".html", ".htm")):
        with open(path, "w", encoding="utf-8") as f:
            f.write(render_html(series, summary, title))
    elif lower.endswith(".png"):
        with open(path, "wb") as f:
            f.write(render_png(build_chart(series, title)))
    else:
        raise ValueError(f"--plot {path}: the file name must end in .html or .png")


