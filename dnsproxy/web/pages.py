"""The page's HTML: Jinja2 templates with autoescaping, plots drawn here as inline SVG. Runs in a
worker thread (server.Page.render): nothing here touches the event loop."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

import jinja2

from . import svg, views

# Upstreams' colours in the latency plot, in order.
PALETTE = ("#2f6db5", "#e07b00", "#2e8540", "#7b4fa0", "#c62828", "#00838f", "#6d4c41")
STEP_WORDS = {60: "minute", 300: "5 minutes", 600: "10 minutes", 3600: "hour"}
PERIOD_WORDS = {1: "last hour", 6: "last 6 hours", 24: "last 24 hours", 168: "last 7 days"}
FORGED_SHOWN = 15  # names in the censor panel; the rest behind "more"
# How a forgery was recognised (forgery.py's reasons), for a person.
REASON_WORDS = {
    "no-edns": "no EDNS record", "forged-address": "known forged address",
    "learned-address": "learned forged address", "too-fast": "arrived too fast",
    "mismatch": "wrong ID or question", "malformed": "malformed",
    "superseded": "a second unchecked answer",
}
OUTCOME_WORDS = {
    "cached": "answered from the cache", "stale": "answered from the cache (expired, refreshed)",
    "forwarded": "asked upstream", "local": "answered here (hosts, home or special names)",
    "refused": "refused (not an allowed client)", "ratelimited": "refused (rate limit)",
    "servfail": "failed (no upstream answered in time)",
    "overload": "failed (too many queries in flight)", "formerr": "malformed query",
}

ENV = jinja2.Environment(
    loader=jinja2.PackageLoader(__package__, "templates"),
    autoescape=jinja2.select_autoescape(default=True),
    trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)  # fmt: skip


def _local(ts: float, tz: int) -> time.struct_time:
    return time.gmtime(ts + tz * 60)


def clock(ts: float, tz: int) -> str:
    return time.strftime("%H:%M:%S", _local(ts, tz))


def when(ts: float, tz: int) -> str:
    """Time of day for today's, with the date for older ones."""
    today = time.strftime("%Y-%m-%d", _local(time.time(), tz))
    moment = _local(ts, tz)
    if time.strftime("%Y-%m-%d", moment) == today:
        return time.strftime("%H:%M:%S", moment)
    return time.strftime("%b %d %H:%M", moment)


def zone(tz: int) -> str:
    if not tz:
        return "UTC"
    sign = "+" if tz > 0 else "−"
    return f"UTC{sign}{abs(tz) // 60:02d}:{abs(tz) % 60:02d}"


def count(n: int | float) -> str:
    return f"{int(n):,}"


def share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f} %" if whole else "–"


def ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"


def ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def query_link(**args: Any) -> str:
    return "/queries?" + urlencode({k: v for k, v in args.items() if v not in (None, "")})


ENV.filters.update(clock=clock, when=when, count=count, ms=ms)
ENV.globals.update(zone=zone, share=share, query_link=query_link, ago=ago,
                   OUTCOMES=views.OUTCOMES, PERIOD_WORDS=PERIOD_WORDS, now=time.time,
                   reason_words=REASON_WORDS, outcome_words=OUTCOME_WORDS,
                   FORGED_SHOWN=FORGED_SHOWN)


def render(template: str, **context: Any) -> str:
    return ENV.get_template(template).render(**context)


def login(**context: Any) -> str:
    context.setdefault("error", None)
    return render("login.html", **context)


def loopback_only(**context: Any) -> str:
    return render("loopback.html", **context)


def dashboard(summary: dict[str, Any], forged: dict[str, Any], upstreams: dict[str, Any],
              **context: Any) -> str:
    tz = context["tz"]
    series = summary["series"]
    step_word = STEP_WORDS.get(series["step"], f"{series['step']} s")
    queries_plot = svg.stacked_bars(
        series["start"], series["step"],
        [(label, colour, series["counts"][key]) for key, label, colour, _ in views.OUTCOMES],
        title=f"Queries per {step_word}, by outcome", y_label=f"queries per {step_word}",
        offset_minutes=tz)  # fmt: skip
    latency_plot = svg.line_chart(
        upstreams["start"], upstreams["step"], latency_series(upstreams),
        title="Upstream latency over time (p50 solid, p95 dashed)", y_label="latency",
        unit="ms", offset_minutes=tz,
        dashed=frozenset(f"{u['name']} p95" for u in upstreams["upstreams"]))  # fmt: skip
    return render("dashboard.html", summary=summary, forged=forged, upstreams=upstreams,
                  queries_plot=queries_plot, latency_plot=latency_plot,
                  period=PERIOD_WORDS.get(summary["hours"], f"{summary['hours']} h"),
                  **context)  # fmt: skip


def latency_series(upstreams: dict[str, Any]) -> list[tuple[str, str, list[float | None]]]:
    """p50 and p95 per plot bucket for each upstream that replied in the period."""
    start, step = upstreams["start"], upstreams["step"]
    buckets = int((time.time() - start) // step) + 1
    out: list[tuple[str, str, list[float | None]]] = []
    shown = [u for u in upstreams["upstreams"] if u["replies"]]
    for index, upstream in enumerate(shown):
        colour = PALETTE[index % len(PALETTE)]
        for key in ("p50_ms", "p95_ms"):
            values: list[float | None] = [None] * buckets
            for at, point in upstream["steps"].items():
                slot = int((int(at) - start) // step)
                if 0 <= slot < buckets:
                    values[slot] = point[key]
            out.append((f"{upstream['name']} {key[:3]}", colour, values))
    return out


def query_log(result: dict[str, Any] | None, args: dict[str, str], **context: Any) -> str:
    page_args = {k: v for k, v in args.items() if k not in ("offset",) and v}

    def page(offset: int | None) -> str | None:
        return None if offset is None else query_link(**page_args, offset=offset or None)

    previous = None
    if result and result["offset"] > 0:
        previous = page(max(0, result["offset"] - result["limit"]))
    following = page(result["next_offset"]) if result else None
    types = sorted({name for name in views.TYPE_CODES})
    return render("queries.html", result=result, args=args, previous=previous,
                  following=following, types=types, **context)  # fmt: skip
