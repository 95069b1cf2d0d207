"""The page's plots (dnsproxy/web/svg.py): well-formed SVG that a person can read at a glance
(legend with totals, nice y ticks at or above the data, time ticks in the viewer's zone with
dates where the day is ambiguous), safe with any label, gaps and lone points in lines, a
"No data yet" picture instead of an exception, and small enough for the page."""

from __future__ import annotations

import calendar
import random
import re
import xml.etree.ElementTree as ET

import pytest

from dnsproxy.web.svg import line_chart, stacked_bars

SVG = "{http://www.w3.org/2000/svg}"
START = calendar.timegm((2024, 12, 5, 14, 0, 0))  # a Thursday afternoon, UTC


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def texts(root: ET.Element, group: str) -> list[str]:
    """The text of every <text> in the <g class=group> (y or x tick labels, legend)."""
    (g,) = [e for e in root.iter(f"{SVG}g") if e.get("class") == group]
    return ["".join(t.itertext()) for t in g.iter(f"{SVG}text")]


def tips(root: ET.Element) -> list[str]:
    """The tooltips of the bars or points (not the picture's own title)."""
    return [t.text or "" for g in root.iter(f"{SVG}g") if g.get("class") == "hv"
            for t in g.iter(f"{SVG}title")]


def number(label: str) -> float:
    """A y tick label back to its value: "1.25k" -> 1250, "25 ms" -> 25."""
    value = label.split()[0].rstrip("%")
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(value[-1], 1)
    return float(value.rstrip("kMG")) * scale


def is_nice(step: float) -> bool:
    mantissa = f"{step:.6e}".split("e")[0].rstrip("0").rstrip(".")
    return mantissa in {"1", "2", "2.5", "5"}


def bars(counts: list[list[int]], **kwargs) -> str:
    names = ["cached", "forwarded", "blocked", "failed", "local"]
    colours = ["#4c9f70", "#3b7dd8", "#d8843b", "#c0392b", "#888"]
    series = [(names[i], colours[i], c) for i, c in enumerate(counts)]
    return stacked_bars(START, 300, series, title="Queries", y_label="queries", **kwargs)


def test_the_output_is_one_well_formed_svg_that_scales_with_the_page() -> None:
    for svg in (bars([[1, 2, 3], [4, 5, 6]]),
                line_chart(START, 60, [("p50", "#333", [1.0, 2.0])], title="Latency",
                           y_label="latency", unit="ms")):
        root = parse(svg)
        assert root.tag == f"{SVG}svg"
        assert root.get("viewBox") == "0 0 960 280"
        assert (root.get("role"), root.get("class")) == ("img", "plot")
        assert root.get("aria-label") in ("Queries", "Latency")
        assert root.get("width") is None and root.get("height") is None
        assert "sans-serif" in root.get("font-family", "")
        assert root[0].tag == f"{SVG}title" and root[0].text == root.get("aria-label")
        assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 960 280" '
                              'role="img" aria-label="')
    assert parse(bars([[1]], width=480, height=200)).get("viewBox") == "0 0 480 200"


def test_the_legend_names_every_series_with_its_total() -> None:
    root = parse(bars([[1000, 234, 0], [0, 5, 0], [0, 0, 0]]))
    assert texts(root, "legend") == ["cached (1,234)", "forwarded (5)", "blocked (0)"]
    root = parse(line_chart(START, 60, [("p50", "#333", [1.0]), ("p95", "#666", [2.0])],
                            title="t", y_label="latency", unit="ms"))
    assert texts(root, "legend") == ["p50", "p95"]


@pytest.mark.parametrize("label", ['<b>&"x', "tls://192.0.2.53#resolver.example", "<script>",
                                   "bell\x07and\x00nul"])
def test_any_label_is_escaped(label: str) -> None:
    svgs = [stacked_bars(START, 60, [(label, '"red', [3, 0, 1])], title=label, y_label=label),
            line_chart(START, 60, [(label, "red", [3.0, None, 1.0])], title=label,
                       y_label=label, unit="<ms>", dashed=frozenset({label}))]
    clean = label.replace("\x07", "").replace("\x00", "")
    for svg in svgs:
        assert "<b>" not in svg and "<script>" not in svg and "<ms>" not in svg
        root = parse(svg)
        assert root.get("aria-label") == clean
        assert texts(root, "legend")[0].startswith(clean)
        assert any(clean in tip for tip in tips(root))


@pytest.mark.parametrize("peak", [1, 3, 7, 10, 11, 24, 99, 101, 250, 999, 1001, 1234, 25_000,
                                  3_000_001])
def test_y_ticks_are_nice_and_reach_the_highest_stack(peak: int) -> None:
    # The peak is a stack: two series whose sum is the largest column.
    counts = [[0, peak // 3, peak // 4, 1], [0, peak - peak // 3, 0, 0]]
    labels = texts(parse(bars(counts)), "y")
    values = [number(s) for s in labels]
    assert values[0] == 0 and values[-1] >= peak
    assert all(float(v).is_integer() for v in values), "counts are whole numbers"
    step = values[1] - values[0]
    assert is_nice(step), labels
    assert all(abs(v - i * step) < 1e-6 * step for i, v in enumerate(values)), "evenly spaced"
    assert values[-1] - step < peak, "no tick more than needed"
    if peak >= 4:
        assert 4 <= len(values) <= 6, labels
    assert all(len(s) <= 5 for s in labels), f"compact labels: {labels}"


def test_y_tick_labels_are_compact_and_carry_the_unit() -> None:
    assert texts(parse(bars([[2400, 100]])), "y") == ["0", "500", "1k", "1.5k", "2k", "2.5k"]
    assert texts(parse(bars([[3_000_000]])), "y")[-1] == "3M"

    def y(values: list[float | None], unit: str = "ms") -> list[str]:
        return texts(parse(line_chart(START, 60, [("p50", "#333", values)], title="t",
                                      y_label="latency", unit=unit)), "y")

    assert y([12.0, 25.0]) == ["0 ms", "5 ms", "10 ms", "15 ms", "20 ms", "25 ms"]
    assert y([0.4, 0.31]) == ["0 ms", "0.1 ms", "0.2 ms", "0.3 ms", "0.4 ms"]
    assert y([0.035]) == ["0 ms", "0.01 ms", "0.02 ms", "0.03 ms", "0.04 ms"]
    assert y([2.4]) == ["0 ms", "0.5 ms", "1.0 ms", "1.5 ms", "2.0 ms", "2.5 ms"]
    assert y([93.0], "%") == ["0%", "20%", "40%", "60%", "80%", "100%"]
    assert y([2400.0])[-2:] == ["2,000 ms", "2,500 ms"], "a measurement in full below 10,000"
    assert y([24_000.0])[-2:] == ["20k ms", "25k ms"]


def test_a_bucket_tooltip_names_its_interval_and_counts() -> None:
    root = parse(bars([[120, 0, 7], [30, 0, 0]]))
    assert tips(root) == ["14:00–14:05: 120 cached, 30 forwarded", "14:10–14:15: 7 cached"], \
        "one tooltip per non-empty bucket, in the viewer's zone"
    root = parse(bars([[120, 0, 7], [30, 0, 0]], offset_minutes=-330))
    assert tips(root)[0] == "08:30–08:35: 120 cached, 30 forwarded"


def test_a_line_tooltip_gives_time_and_value_with_unit() -> None:
    svg = line_chart(START, 60, [("p50", "#333", [12.345, None]), ("p95", "#666", [0.4, 2.0])],
                     title="t", y_label="latency", unit="ms")
    assert tips(parse(svg)) == ["14:00–14:01: p50 12.3 ms, p95 0.4 ms", "14:01–14:02: p95 2 ms"]


def paths_of(root: ET.Element, colour: str) -> list[ET.Element]:
    return [p for p in root.iter(f"{SVG}path") if p.get("stroke") == colour]


def lines_of(root: ET.Element, colour: str) -> list[ET.Element]:
    """The plotted line, not its legend swatch."""
    return [p for p in paths_of(root, colour) if p.get("fill") == "none"]


def test_a_gap_splits_the_line() -> None:
    values = [1.0, 2.0, None, 3.0, 4.0, None, None, 5.0, 6.0, 7.0]
    root = parse(line_chart(START, 60, [("p50", "#123456", values)], title="t",
                            y_label="latency", unit="ms"))
    (path,) = lines_of(root, "#123456")
    assert path.get("d", "").count("M") == 3
    assert not list(root.iter(f"{SVG}circle"))
    root = parse(line_chart(START, 60, [("p50", "#123456", [1.0, 2.0, 3.0])], title="t",
                            y_label="latency", unit="ms"))
    assert lines_of(root, "#123456")[0].get("d", "").count("M") == 1


def test_a_lone_point_between_gaps_is_a_circle() -> None:
    values = [1.0, 2.0, None, 3.0, None, 4.0, 5.0]
    root = parse(line_chart(START, 60, [("p50", "#123456", values)], title="t",
                            y_label="latency", unit="ms"))
    (circle,) = list(root.iter(f"{SVG}circle"))
    assert circle.get("fill") == "#123456" and float(circle.get("r", "0")) >= 2
    (path,) = lines_of(root, "#123456")
    xs = [float(x) for x in re.findall(r"M([\d.]+)", path.get("d", ""))]
    assert xs[0] < float(circle.get("cx", "0")) < xs[1], "between the two line pieces"
    root = parse(line_chart(START, 60, [("p50", "#123456", [None, 4.0, None])], title="t",
                            y_label="latency", unit="ms"))
    assert len(list(root.iter(f"{SVG}circle"))) == 1 and not lines_of(root, "#123456")


def test_a_dashed_series_is_dashed_in_the_plot_and_the_legend() -> None:
    root = parse(line_chart(START, 60, [("p50", "#111111", [1.0, 2.0]),
                                        ("p95", "#999999", [3.0, 4.0])],
                            title="t", y_label="latency", unit="ms", dashed=frozenset({"p95"})))
    solid, dashed = paths_of(root, "#111111"), paths_of(root, "#999999")
    assert len(solid) == len(dashed) == 2, "the line and its legend swatch"
    assert all(p.get("stroke-dasharray") for p in dashed)
    assert not any(p.get("stroke-dasharray") for p in solid)


@pytest.mark.parametrize("svg", [
    stacked_bars(START, 60, [], title="t", y_label="queries"),
    stacked_bars(START, 60, [("cached", "#4c9f70", [])], title="t", y_label="queries"),
    stacked_bars(START, 60, [("cached", "#4c9f70", [0] * 1440)], title="t", y_label="queries"),
    stacked_bars(START, 0, [("cached", "#4c9f70", [0, 0])], title="t", y_label="queries"),
    line_chart(START, 60, [], title="t", y_label="latency", unit="ms"),
    line_chart(START, 60, [("p50", "#333", [])], title="t", y_label="latency", unit="ms"),
    line_chart(START, 60, [("p50", "#333", [None] * 100)], title="t", y_label="l", unit="ms"),
    line_chart(START, 60, [("p50", "#333", [float("nan")])], title="t", y_label="l", unit=""),
], ids=["no series", "empty series", "all zeros", "zero step", "no lines", "empty line",
        "all None", "nan"])
def test_no_data_still_draws_the_axes_and_says_so(svg: str) -> None:
    root = parse(svg)
    assert [t.text for t in root.iter(f"{SVG}text")].count("No data yet") == 1
    assert texts(root, "y") in (["0"], ["0 ms"])
    assert any(p.get("stroke") == "#999" for p in root.iter(f"{SVG}path")), "the axes"
    assert not tips(root)


def test_time_ticks_follow_the_viewers_offset_and_show_the_date_change() -> None:
    late = calendar.timegm((2024, 12, 5, 23, 0, 0))
    counts = [[1] * 24]  # two hours of five-minute buckets

    def x_labels(offset: int) -> list[str]:
        return texts(parse(stacked_bars(late, 300, [("q", "red", counts[0])], title="t",
                                        y_label="q", offset_minutes=offset)), "x")

    local = x_labels(60)  # 00:00 to 02:00 on Dec 6 for a viewer at UTC+1
    assert local[:2] == ["00:00", "Dec 6"] and "Dec 5" not in local
    assert [s for s in local if ":" in s][-1] == "02:00"
    utc = x_labels(0)  # 23:00 on Dec 5 to 01:00 on Dec 6
    assert utc[:2] == ["23:00", "Dec 5"]
    assert utc[utc.index("00:00") + 1] == "Dec 6"
    india = x_labels(330)  # 04:30 to 06:30 Dec 6: no midnight, no date
    assert india[0] == "04:30" and not [s for s in india if "Dec" in s]
    root = parse(stacked_bars(late, 300, [("q", "red", counts[0])], title="t", y_label="q",
                              offset_minutes=-330))
    assert [t.text for t in root.iter(f"{SVG}text")].count("time (UTC\u221205:30)") == 1
    assert "time (UTC+01:00)" in stacked_bars(late, 300, [], title="t", y_label="q",
                                              offset_minutes=60)
    assert ">time (UTC)<" in stacked_bars(late, 300, [], title="t", y_label="q")


@pytest.mark.parametrize(("step", "n", "every"), [
    (60, 60, 10), (60, 180, 30), (300, 72, 60), (60, 1440, 180), (300, 2016, 1440)])
def test_time_ticks_are_few_and_on_round_local_times(step: int, n: int, every: int) -> None:
    start = calendar.timegm((2024, 12, 5, 13, 7, 0))
    labels = texts(parse(stacked_bars(start, step, [("q", "red", [1] * n)], title="t",
                                      y_label="q", offset_minutes=60)), "x")
    times = [s for s in labels if ":" in s]
    dates = [s for s in labels if s.startswith("Dec")]
    if every >= 1440:  # a week: one tick a day, labelled with its date
        assert not times and 4 <= len(dates) <= 8 and dates[0] == "Dec 6"
        return
    assert 4 <= len(times) <= 8, labels
    for s in times:
        hours, minutes = map(int, s.split(":"))
        assert (hours * 60 + minutes) % every == 0, labels
    assert bool(dates) == (n * step > 10 * 3600), "a date only when the day changes"


def test_a_tiny_picture_still_has_room_for_a_plot() -> None:
    svg = stacked_bars(START, 60, [("a", "red", [1, 2])], title="t", y_label="q", width=0,
                       height=0)
    root = parse(svg)
    assert "No data yet" not in svg and len(tips(root)) == 2


def test_coordinates_have_at_most_one_decimal() -> None:
    random.seed(5)
    svg = bars([[random.randrange(1000) for _ in range(97)] for _ in range(3)], width=917)
    svg += line_chart(START, 7, [("p50", "#333", [random.random() for _ in range(333)])],
                      title="t", y_label="l", unit="ms")
    numbers = re.findall(r'(?:\sd|\sx|\sy|\scx|\scy|width|height)="([^"]*)"', svg)
    assert numbers
    assert not [n for n in numbers if re.search(r"\d\.\d\d", n)]


def test_a_day_of_minutes_stays_small() -> None:
    random.seed(7)
    counts = [[random.randrange(1, 5000) for _ in range(1440)] for _ in range(5)]
    svg = stacked_bars(START, 60, [(name, "#4c9f70", c) for name, c in zip(
        ["cached", "forwarded", "blocked", "failed", "local"], counts, strict=True)],
        title="Queries per minute", y_label="queries per minute")
    assert len(svg.encode()) < 40_000
    root = parse(svg)
    assert 100 <= len(tips(root)) <= 200, "merged into bars a person can point at"
    assert "1 bar = 10 min" in svg, "and the page says so"
    assert max(number(s) for s in texts(root, "y")) >= max(
        sum(c[i] for c in counts) for i in range(0, 1440, 10)) / 10
    lines = line_chart(START, 60, [("p50", "#333", [random.random() * 50 for _ in range(1440)]),
                                   ("p95", "#666", [random.random() * 500 for _ in range(1440)])],
                       title="Latency", y_label="latency", unit="ms")
    assert len(lines.encode()) < 40_000
    parse(lines)


def test_a_long_legend_wraps_instead_of_covering_the_plot() -> None:
    names = [f"tls://192.0.2.{i}#resolver-{i}.example.net" for i in range(6)]
    root = parse(stacked_bars(START, 60, [(n, "red", [1, 2]) for n in names], title="t",
                              y_label="q"))
    rows = {t.get("y") for g in root.iter(f"{SVG}g") if g.get("class") == "legend"
            for t in g.iter(f"{SVG}text")}
    assert len(rows) >= 2
    axes = [p for p in root.iter(f"{SVG}path") if p.get("fill") == "none"][0]
    plot_top = float(re.match(r"M[\d.]+ ([\d.]+)", axes.get("d", "")).group(1))
    assert max(float(y) for y in rows) + 6 < plot_top


@pytest.mark.parametrize(("offset", "width", "height"), [(0, 960, 280), (60, 480, 200),
                                                         (-330, 1200, 400)])
def test_text_stays_inside_the_picture_and_apart(offset: int, width: int, height: int) -> None:
    late = calendar.timegm((2024, 12, 5, 20, 0, 0))  # crosses midnight: a row of dates
    names = [f"tls://192.0.2.{i}#resolver.example.net" for i in range(4)]
    svg = stacked_bars(late, 60, [(n, "red", [i % 7 * 1000 for i in range(600)]) for n in names],
                       title="t", y_label="queries", offset_minutes=offset, width=width,
                       height=height)
    root = parse(svg)
    texts_ = [t for t in root.iter(f"{SVG}text") if t.get("transform") is None]
    for t in texts_:
        assert 0 <= float(t.get("x", "0")) <= width
        assert 12 <= float(t.get("y", "0")) <= height - 2
    axis_title = [t for t in texts_ if (t.text or "").startswith("time (")][0]
    lowest_label = max(float(t.get("y", "0")) for g in root.iter(f"{SVG}g")
                       if g.get("class") == "x" for t in g.iter(f"{SVG}text"))
    assert float(axis_title.get("y", "0")) >= lowest_label + 12
