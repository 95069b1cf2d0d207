"""Plots for the appliance's page, drawn on the server as inline SVG strings.

The page has to work with JavaScript off and without fetching anything, so each plot is a
self-contained SVG: axes with units, a legend, tick labels in the viewer's time zone, and a
browser tooltip (an SVG <title>) per bar or point. The markup stays small: a path per series,
coordinates to a tenth of a unit, and buckets narrower than a few pixels merged into one bar
(a bar thinner than a pixel is invisible anyway, and its markup would only bloat the page).

Text widths are estimated (no font metrics on the server), generously, so labels keep apart.
"""

from __future__ import annotations

import html
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

FONT = "system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif"
TEXT = "#333"
MUTED = "#666"
AXIS = "#999"
GRID = "#e5e5e5"
NO_DATA = "No data yet"
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
DAY = 86400
# Tick intervals and bar widths a person reads without arithmetic, in seconds.
NICE_DURATIONS = (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, DAY,
                  2 * DAY, 7 * DAY)
MIN_BAR_PX = 6.0  # below this a bucket shares its bar (or point) with its neighbours
MIN_TICK_PX = 64.0  # room for an "HH:MM" label and a gap
LEGEND_ROW = 18
TOP = 52  # plot's top edge with one legend row: title, then legend
BOTTOM = 52  # under the plot: tick labels, dates, the axis title
RIGHT = 20
# Characters XML 1.0 forbids even when escaped: a label with one would make the page unparsable.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def stacked_bars(start: float, step: float, series: list[tuple[str, str, list[int]]], *,
                 title: str, y_label: str, offset_minutes: int = 0,
                 width: int = 960, height: int = 280) -> str:
    """Counts per time bucket stacked by series. start: epoch seconds of the first bucket;
    step: bucket length in seconds; series: (label, CSS colour, counts per bucket), all the same
    length, drawn bottom-up in list order."""
    step = _valid_step(step)
    n = max((len(counts) for _, _, counts in series), default=0)
    counts = [[_count(c[i]) if i < len(c) else 0 for i in range(n)] for _, _, c in series]
    width, height = max(width, 200), max(height, 120)
    offset = int(offset_minutes) * 60
    bins = _bins(start, step, n, _plot_width(width), offset)
    # A merged bar is as high as the mean of its buckets, so the y axis keeps the caller's unit
    # ("queries per minute"); its tooltip gives the totals over the bar's interval.
    sums = [[sum(c[a:b]) for a, b in bins] for c in counts]
    means = [[s / (b - a) for s, (a, b) in zip(row, bins, strict=True)] for row in sums]
    stack_max = max((sum(col) for col in zip(*means, strict=True)), default=0.0)
    ticks, decimals = _nice_ticks(stack_max, integer=True)
    legend = [(f"{label} ({sum(c):,})", colour, False)
              for (label, colour, _), c in zip(series, counts, strict=True)]
    frame, out = _frame(start, step, n, ticks, decimals, "", legend, lines=False, title=title,
                        y_label=y_label, offset=offset, width=width, height=height,
                        note=_note(bins, step, "1 bar", "height = average per"))
    if stack_max <= 0:
        return _finish(out + _no_data(frame))
    xs = [(_r(frame.x(start + a * step)), _r(frame.x(start + b * step))) for a, b in bins]
    # Each bar is a vertical stroke as wide as the bar: "M x bottom V top" is a third of the
    # markup of a rectangle. Bars cut short by the ends of the data get a path of their own width.
    bars = [_bar(x0, x1) for x0, x1 in xs]
    below = [0.0] * len(bins)
    for (_, colour, _), row in zip(series, means, strict=True):
        by_width: dict[float, list[str]] = {}
        for j, value in enumerate(row):
            bottom, top = _r(frame.y(below[j])), _r(frame.y(below[j] + value))
            below[j] += value
            if bottom != top:
                centre, w = bars[j]
                by_width.setdefault(w, []).append(f"M{_f(centre)} {_f(bottom)}V{_f(top)}")
        out.extend(f'<path stroke="{_esc(colour)}" stroke-width="{_f(w)}" d="{"".join(d)}"/>'
                   for w, d in by_width.items())
    tips = []
    for j, (a, b) in enumerate(bins):
        parts = [f"{sums[k][j]:,} {_clean(label)}" for k, (label, _, _) in enumerate(series)
                 if sums[k][j]]
        if parts:
            tips.append((j, f"{frame.span(start + a * step, start + b * step)}: "
                         + ", ".join(parts)))
    out.append(_hover(frame, xs, tips))
    return _finish(out)


def line_chart(start: float, step: float, series: list[tuple[str, str, list[float | None]]], *,
               title: str, y_label: str, unit: str, offset_minutes: int = 0,
               width: int = 960, height: int = 280, dashed: frozenset[str] = frozenset()) -> str:
    """One line per series over time buckets; None is a gap (no line drawn through it), and a
    lone point between gaps is still visible (a small circle). Series labels in `dashed` are
    drawn dashed (e.g. p95 dashed, p50 solid)."""
    step = _valid_step(step)
    n = max((len(values) for _, _, values in series), default=0)
    values = [[_value(v[i]) if i < len(v) else None for i in range(n)] for _, _, v in series]
    width, height = max(width, 200), max(height, 120)
    offset = int(offset_minutes) * 60
    bins = _bins(start, step, n, _plot_width(width), offset)
    points = [[_mean(v[a:b]) for a, b in bins] for v in values]
    top = max((p for row in points for p in row if p is not None), default=None)
    ticks, decimals = _nice_ticks(top or 0.0, integer=False)
    legend = [(label, colour, label in dashed) for label, colour, _ in series]
    frame, out = _frame(start, step, n, ticks, decimals, unit, legend, lines=True, title=title,
                        y_label=y_label, offset=offset, width=width, height=height,
                        note=_note(bins, step, "1 point", "average of"))
    if top is None:
        return _finish(out + _no_data(frame))
    xs = [(_r(frame.x(start + a * step)), _r(frame.x(start + b * step))) for a, b in bins]
    centres = [_r((x0 + x1) / 2) for x0, x1 in xs]
    for (label, colour, _), row in zip(series, points, strict=True):
        runs: list[list[tuple[float, float]]] = [[]]
        for j, p in enumerate(row):
            if p is None:
                if runs[-1]:
                    runs.append([])
            else:
                runs[-1].append((centres[j], _r(frame.y(p))))
        lines = [run for run in runs if len(run) > 1]
        dots = [run[0] for run in runs if len(run) == 1]
        if lines:
            d = "".join(f"M{_f(r[0][0])} {_f(r[0][1])}L"
                        + " ".join(f"{_f(x)} {_f(y)}" for x, y in r[1:]) for r in lines)
            dash = ' stroke-dasharray="6 4"' if label in dashed else ""
            out.append(f'<path fill="none" stroke="{_esc(colour)}" stroke-width="2" '
                       f'stroke-linejoin="round"{dash} d="{d}"/>')
        out.extend(f'<circle cx="{_f(x)}" cy="{_f(y)}" r="3" fill="{_esc(colour)}"/>'
                   for x, y in dots)
    tips = []
    for j, (a, b) in enumerate(bins):
        parts = [f"{_clean(label)} {_with_unit(_fmt_value(row[j]), unit)}"
                 for (label, _, _), row in zip(series, points, strict=True)
                 if row[j] is not None]
        if parts:
            tips.append((j, f"{frame.span(start + a * step, start + b * step)}: "
                         + ", ".join(parts)))
    out.append(_hover(frame, xs, tips))
    return _finish(out)


@dataclass(frozen=True)
class _Frame:
    """Where the plot area sits in the picture, and the data ranges it maps."""

    left: float
    top: float
    right: float
    bottom: float
    t0: float
    t1: float
    ymax: float
    offset: int  # viewer's UTC offset, seconds
    dates: bool  # the span crosses a (local) midnight: times alone would be ambiguous

    def x(self, t: float) -> float:
        span = self.t1 - self.t0
        if span <= 0:
            return self.left
        return self.left + (t - self.t0) / span * (self.right - self.left)

    def y(self, v: float) -> float:
        if self.ymax <= 0:
            return self.bottom
        return self.bottom - min(max(v, 0.0), self.ymax) / self.ymax * (self.bottom - self.top)

    def span(self, a: float, b: float) -> str:
        """A bar's interval for its tooltip, e.g. "14:05–14:10" (with the date when needed)."""
        seconds = bool(a % 60 or b % 60)  # buckets off the minute: "14:05:30–14:05:40"
        text = f"{_clock(a + self.offset, seconds)}–{_clock(b + self.offset, seconds)}"
        return f"{_date(a + self.offset)} {text}" if self.dates else text


def _frame(start: float, step: float, n: int, ticks: list[float], decimals: int, unit: str,
           legend: list[tuple[str, str, bool]], *, lines: bool, title: str, y_label: str,
           offset: int, width: int, height: int, note: str) -> tuple[_Frame, list[str]]:
    """Everything but the data: title, legend, grid, axes, tick labels and axis titles."""
    # "3k ms" puzzles; a measurement reads better in full up to 10,000 ("3,000 ms").
    labels = [_with_unit(_compact(v, decimals, 1e4 if unit else 1e3), unit) for v in ticks]
    left = 26 + max((_text_width(s) for s in labels), default=8)
    legend_out, rows = _legend(legend, lines, 8, width - RIGHT)
    top = TOP + LEGEND_ROW * (rows - 1)
    bottom = max(height - BOTTOM, top + 20)
    t0, t1 = start, start + n * step
    # Dates go under the times when a time alone could be either of two days: the span crosses
    # a local midnight or starts on one.
    dates = n > 0 and (t1 - t0 > DAY or _day(t0 + offset) != _day(t1 + offset)
                       or (t0 + offset) % DAY == 0)
    frame = _Frame(left, top, width - RIGHT, bottom, t0, t1, ticks[-1] if ticks else 0.0,
                   offset, dates)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{_esc(title)}" class="plot" font-family="{FONT}" font-size="12">',
           f"<title>{_esc(title)}</title>",
           f'<text x="8" y="17" font-size="14" font-weight="600" fill="{TEXT}">'
           f"{_esc(title)}</text>"]
    out += legend_out
    # Grid and y tick labels; the 0 line is the x axis, drawn below.
    grid, ytext = [], []
    for v, s in zip(ticks, labels, strict=True):
        y = _r(frame.y(v))
        if v > 0:
            grid.append(f"M{_f(left)} {_f(y)}H{_f(frame.right)}")
        ytext.append(f'<text x="{_f(left - 6)}" y="{_f(y + 4)}">{_esc(s)}</text>')
    if grid:
        out.append(f'<path stroke="{GRID}" d="{"".join(grid)}"/>')
    out.append(f'<g class="y" fill="{MUTED}" text-anchor="end">{"".join(ytext)}</g>')
    out.append(f'<path fill="none" stroke="{AXIS}" '
               f'd="M{_f(left)} {_f(top)}V{_f(bottom)}H{_f(frame.right)}"/>')
    # Time ticks.
    xtext, marks = [], []
    interval, tick_times = _time_ticks(t0, t1, offset, frame.right - left)
    previous_day = None
    for t in tick_times:
        x = _r(frame.x(t))
        local = t + offset
        text = _date(local) if interval >= DAY else _clock(local, False)
        anchor = _anchor(x, _text_width(text) / 2, width)
        marks.append(f"M{_f(x)} {_f(bottom)}v4")
        xtext.append(f'<text x="{_f(x)}" y="{_f(bottom + 16)}"{anchor}>{text}</text>')
        day = _day(local)
        if frame.dates and interval < DAY and day != previous_day:
            date = _date(local)
            xtext.append(f'<text x="{_f(x)}" y="{_f(bottom + 30)}"'
                         f'{_anchor(x, _text_width(date) / 2, width)}>{date}</text>')
        previous_day = day
    if marks:
        out.append(f'<path stroke="{AXIS}" d="{"".join(marks)}"/>')
    out.append(f'<g class="x" fill="{MUTED}" text-anchor="middle">{"".join(xtext)}</g>')
    axis_title = f"time ({_zone(offset)})" + (f" · {note}" if note else "")
    below = 44 if frame.dates else 32  # under the dates, or right under the times
    out.append(f'<text x="{_f((left + frame.right) / 2)}" y="{_f(bottom + below)}" '
               f'text-anchor="middle" fill="{TEXT}">{_esc(axis_title)}</text>')
    middle = _f((top + bottom) / 2)
    out.append(f'<text transform="rotate(-90)" x="-{middle}" y="14" text-anchor="middle" '
               f'fill="{TEXT}">{_esc(y_label)}</text>')
    return frame, out


def _legend(items: list[tuple[str, str, bool]], lines: bool, x0: float, x1: float
            ) -> tuple[list[str], int]:
    """One swatch and label per series, in rows above the plot so it never covers data. Lines
    get a short stroke as swatch, so a dashed series looks dashed in the legend too."""
    out, row, x = [], 0, x0
    room = x1 - x0
    swatch = 20 if lines else 10
    for text, colour, dashed in items:
        text = _clean(text)
        if swatch + 4 + _text_width(text) > room:  # a label longer than the plot: cut it
            keep = max(1, int((room - swatch - 4) / 7) - 1)
            text = text[:keep] + "…"
        w = swatch + 4 + _text_width(text)
        if x > x0 and x + w > x1:
            row, x = row + 1, x0
        y = 36 + row * LEGEND_ROW
        if lines:
            dash = ' stroke-dasharray="6 4"' if dashed else ""
            out.append(f'<path stroke="{_esc(colour)}" stroke-width="2"{dash} '
                       f'd="M{_f(x)} {y - 4}h20"/>')
        else:
            out.append(f'<rect x="{_f(x)}" y="{y - 9}" width="10" height="10" '
                       f'fill="{_esc(colour)}"/>')
        out.append(f'<text x="{_f(x + swatch + 4)}" y="{y}" fill="{TEXT}">'
                   f"{html.escape(text)}</text>")
        x += w + 18
    return ['<g class="legend">', *out, "</g>"], row + 1


def _bar(x0: float, x1: float) -> tuple[float, float]:
    """A bar's centre and width inside its slot: a gap between bars wide enough to show one,
    none when the slot is only a few pixels wide."""
    slot = x1 - x0
    gap = slot * 0.2 if slot >= 20 else min(1.0, slot * 0.2) if slot >= 3 else 0.0
    return _r((x0 + x1) / 2), _r(slot - gap)


def _hover(frame: _Frame, xs: list[tuple[float, float]], tips: list[tuple[int, str]]) -> str:
    """Invisible full-height columns, one per non-empty bar, that carry the tooltip: a thick
    transparent stroke is the smallest markup that still catches the pointer."""
    if not tips:
        return ""
    widths = [x1 - x0 for x0, x1 in xs]
    usual = max(widths, default=1.0)
    parts = []
    for j, text in tips:
        x0, x1 = xs[j]
        own = "" if abs(widths[j] - usual) < 0.05 else f' stroke-width="{_f(widths[j])}"'
        parts.append(f'<path d="M{_f(_r((x0 + x1) / 2))} {_f(frame.top)}V{_f(frame.bottom)}"'
                     f"{own}><title>{_esc(text)}</title></path>")
    return (f'<g class="hv" stroke="#000" stroke-opacity="0" stroke-width="{_f(usual)}">'
            + "".join(parts) + "</g>")


def _no_data(frame: _Frame) -> list[str]:
    x, y = _f(_r((frame.left + frame.right) / 2)), _f(_r((frame.top + frame.bottom) / 2 + 5))
    return [f'<text x="{x}" y="{y}" text-anchor="middle" font-size="14" fill="{MUTED}">'
            f"{NO_DATA}</text>"]


def _finish(out: list[str]) -> str:
    return "".join(out) + "</svg>"


def _bins(start: float, step: float, n: int, plot_width: float, offset: int
          ) -> list[tuple[int, int]]:
    """Buckets [a, b) drawn as one bar or point. Buckets narrower than MIN_BAR_PX are merged
    into bars of a round duration (10 min, 1 h, ...) aligned on the viewer's clock, so tooltips
    read "14:00–14:10" rather than "14:03–14:13"."""
    if n == 0:
        return []
    per_bucket = plot_width / n
    if per_bucket >= MIN_BAR_PX:
        return [(i, i + 1) for i in range(n)]
    need = MIN_BAR_PX / per_bucket
    length = math.ceil(need) * step
    for d in NICE_DURATIONS:
        g = d / step
        if g >= need and abs(g - round(g)) < 1e-9:
            length = d
            break
    bins: list[tuple[int, int]] = []
    previous = None
    for i in range(n):
        key = math.floor((start + offset + i * step) / length + 1e-6)
        if key == previous:
            bins[-1] = (bins[-1][0], i + 1)
        else:
            bins.append((i, i + 1))
            previous = key
    return bins


def _note(bins: list[tuple[int, int]], step: float, what: str, how: str) -> str:
    """Says what a merged bar means; empty when every bar is one bucket."""
    if all(b - a == 1 for a, b in bins):
        return ""
    longest = max(b - a for a, b in bins)
    return f"{what} = {_duration(longest * step)}, {how} {_duration(step)}"


def _time_ticks(t0: float, t1: float, offset: int, plot_width: float
                ) -> tuple[float, list[float]]:
    """Ticks on round local times (on the hour, at midnight, ...), about 4 to 8 of them."""
    if not t1 > t0:
        return 60.0, []
    most = max(2, min(8, int(plot_width / MIN_TICK_PX)))

    def count(iv: float) -> int:
        return math.floor((t1 + offset) / iv) - math.ceil((t0 + offset) / iv) + 1

    interval = float(NICE_DURATIONS[-1])
    for d in NICE_DURATIONS:
        if count(d) <= most:
            interval = float(d)
            break
    while count(interval) > most:  # spans of months: whole numbers of weeks
        interval += 7 * DAY
    first = math.ceil((t0 + offset) / interval) * interval - offset
    return interval, [first + i * interval for i in range(max(0, count(interval)))]


def _nice_ticks(vmax: float, *, integer: bool) -> tuple[list[float], int]:
    """0 up to the first multiple of a round step (1, 2, 2.5 or 5 x 10^k) at or above vmax,
    in 3 to 5 steps; counts get whole steps. Returns the ticks and the decimals they need."""
    if not vmax > 0:
        return [0.0], 0
    k = math.floor(math.log10(vmax / 5))
    for exponent in range(k - 1, k + 3):
        for mantissa in (1, 2, 2.5, 5):
            s = mantissa * 10.0**exponent
            if integer and (s < 1 or (mantissa == 2.5 and exponent < 1)):
                continue
            steps = math.ceil(vmax / s - 1e-9)
            if steps <= 5:
                decimals = max(0, -exponent + (1 if mantissa == 2.5 else 0))
                return [round(i * s, decimals) for i in range(steps + 1)], decimals
    return [0.0, vmax], 0  # not reached: one of the steps above always fits


def _compact(v: float, decimals: int, shorten_from: float = 1e3) -> str:
    """1.2k, 3M: short tick labels keep the left margin narrow."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= max(div, shorten_from):
            return f"{v / div:.3f}".rstrip("0").rstrip(".") + suffix
    return f"{v:,.{decimals}f}" if v else "0"


def _fmt_value(v: float) -> str:
    """A measured value to about three significant digits, for tooltips."""
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    text = f"{v:.{2 if a < 10 else 1}f}" if a >= 1 else f"{v:.3g}"
    return text.rstrip("0").rstrip(".") if "." in text and "e" not in text else text


def _with_unit(text: str, unit: str) -> str:
    if not unit:
        return text
    return text + unit if unit == "%" else f"{text} {unit}"


def _zone(offset: int) -> str:
    """"UTC", "UTC+01:00", "UTC−05:30" (a real minus sign)."""
    if offset == 0:
        return "UTC"
    sign = "+" if offset > 0 else "\u2212"
    minutes = abs(offset) // 60
    return f"UTC{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _clock(local: float, seconds: bool) -> str:
    t = time.gmtime(math.floor(local + 1e-6))
    return f"{t.tm_hour:02d}:{t.tm_min:02d}" + (f":{t.tm_sec:02d}" if seconds else "")


def _date(local: float) -> str:
    t = time.gmtime(math.floor(local + 1e-6))
    return f"{MONTHS[t.tm_mon - 1]} {t.tm_mday}"


def _day(local: float) -> int:
    return math.floor(local / DAY + 1e-9)


def _duration(seconds: float) -> str:
    for size, name in ((DAY, " day"), (3600, " h"), (60, " min")):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count}{name}" + ("s" if name == " day" and count > 1 else "")
    return f"{seconds:g} s"


def _anchor(x: float, half: float, width: int) -> str:
    """Keeps an edge tick's label inside the picture instead of clipped."""
    if x - half < 2:
        return ' text-anchor="start"'
    if x + half > width - 2:
        return ' text-anchor="end"'
    return ""


def _text_width(text: str, size: float = 12) -> float:
    """A generous estimate of rendered width: 0.6 em a character, 1 em for wide scripts."""
    return sum(1.0 if ord(c) >= 0x2E80 else 0.6 for c in text) * size


def _plot_width(width: int) -> float:
    """The plot's width before its left margin is known: bins only need it roughly."""
    return max(width - RIGHT - 60, 20)


def _valid_step(step: float) -> float:
    return float(step) if isinstance(step, int | float) and math.isfinite(step) and step > 0 \
        else 60.0


def _count(v: object) -> int:
    try:
        c = int(v)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return 0
    return max(c, 0)


def _value(v: object) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _r(v: float) -> float:
    return round(v, 1)


def _f(v: float) -> str:
    """A coordinate with at most one decimal, without a trailing ".0"."""
    text = f"{v:.1f}"
    text = text[:-2] if text.endswith(".0") else text
    return "0" if text == "-0" else text


def _clean(text: str) -> str:
    return _NOT_XML.sub("", str(text))


def _esc(text: str) -> str:
    """Escapes for both text and attribute values, and drops what XML cannot carry."""
    return html.escape(_clean(text), quote=True)
