"""What the page shows, as plain data: the dashboard's panels and the query log, read from the
history (in its thread) and from the forwarder's live state. The JSON API returns these dicts
as they are; the templates lay them out."""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..history import History, QueryFilter
from ..querylog import TYPES

# How the plot and the totals group the forwarder's reasons: (key, label, colour, reasons).
OUTCOMES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("cached", "answered from the cache", "#2e8540", ("cached", "stale")),
    ("forwarded", "asked upstream", "#2f6db5", ("forwarded",)),
    ("local", "answered here", "#7b4fa0", ("local",)),
    ("refused", "refused", "#c98a00", ("refused", "ratelimited")),
    ("failed", "failed", "#c62828", ("servfail", "overload", "formerr")),
)
OUTCOME_OF = {reason: key for key, _, _, reasons in OUTCOMES for reason in reasons}
FORGERY = "forgery"  # the minutes table's count of discarded forgeries
# The periods the page offers, in hours, and the plot's bucket for each (seconds).
PERIODS = {1: 60, 6: 300, 24: 600, 168: 3600}
DEFAULT_HOURS = 24
TYPE_CODES = {name: code for code, name in TYPES.items()}


@dataclass
class Sources:
    """What the page reads: the history, and callables for the forwarder's state now."""

    history: History
    upstream_states: Callable[[], list[dict[str, Any]]]  # name, group, transport, health
    learned_forged: Callable[[], list[str]]  # learned forged addresses, as text
    cache_entries: Callable[[], int]
    identity: str
    started: float  # time.time() at start


def period(hours: int) -> tuple[int, int]:
    """A requested period snapped to one the page offers, with its plot bucket."""
    chosen = min(PERIODS, key=lambda h: abs(h - hours))
    return chosen, PERIODS[chosen]


async def summary(sources: Sources, hours: int, now: float | None = None) -> dict[str, Any]:
    """Totals by outcome, the counts per bucket stacked by outcome, forgeries, split decisions
    and the top names and clients: one trip to the history's thread."""
    now = time.time() if now is None else now
    hours, step = period(hours)
    since = now - hours * 3600
    h = sources.history
    minutes, splits, names, clients = await h.read(lambda db: (
        h.summary(since)(db)["minutes"], h.splits(since)(db), h.top(since, "name")(db),
        h.top(since, "client")(db)))  # fmt: skip
    start = int(since // step) * step
    buckets = int((now - start) // step) + 1
    series = {key: [0] * buckets for key, *_ in OUTCOMES}
    totals = {key: 0 for key, *_ in OUTCOMES}
    forged = 0
    for minute, outcome, n in minutes:
        if outcome == FORGERY:
            forged += n
            continue
        key = OUTCOME_OF.get(outcome, "failed")
        totals[key] += n
        index = int((minute * 60 - start) // step)
        if 0 <= index < buckets:
            series[key][index] += n
    return {
        "hours": hours, "since": since, "until": now,
        "queries": sum(totals.values()), "outcomes": totals, "forgeries": forged,
        "split_decisions": sum(s["count"] for s in splits), "splits": splits,
        "series": {"start": start, "step": step, "counts": series},
        "top_names": [{"name": name, "count": n} for name, n in names],
        "top_clients": [{"client": client, "count": n} for client, n in clients],
        "cache_entries": sources.cache_entries(), "identity": sources.identity,
        "up_since": sources.started,
    }


async def forgeries(sources: Sources, hours: int, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    hours, _ = period(hours)
    names = await sources.history.read(sources.history.forgeries(now - hours * 3600))
    return {"hours": hours, "names": names, "learned": sources.learned_forged()}


async def upstreams(sources: Sources, hours: int, now: float | None = None) -> dict[str, Any]:
    """Each configured upstream's health now, and its replies, latency and errors over the
    period (an upstream no longer configured still shows what it did)."""
    now = time.time() if now is None else now
    hours, step = period(hours)
    since = now - hours * 3600
    stats = await sources.history.read(sources.history.upstreams(since, step))
    out = []
    for state in sources.upstream_states():
        seen = stats.pop(state["name"], None) or {}
        out.append({**state, **_stats(seen)})
    for name, seen in sorted(stats.items()):
        out.append({"name": name, "group": None, "transport": None, "health": "removed",
                    **_stats(seen)})  # fmt: skip
    return {"hours": hours, "since": since, "step": step, "start": int(since // step) * step,
            "upstreams": out}


def _stats(seen: dict[str, Any]) -> dict[str, Any]:
    return {"replies": seen.get("replies", 0), "p50_ms": _round(seen.get("p50_ms")),
            "p95_ms": _round(seen.get("p95_ms")), "errors": seen.get("errors", {}),
            "steps": {str(int(t)): {k: _round(v) for k, v in p.items()}
                      for t, p in seen.get("steps", {}).items()},
            "step_errors": {str(int(t)): n for t, n in seen.get("step_errors", {}).items()}}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2 if value < 10 else 1)


class BadFilter(ValueError):
    """A query-log filter that cannot be read: the page says which, the API answers 400."""


def query_filter(args: dict[str, str], page_size: int = 50,
                 offset_minutes: int = 0) -> QueryFilter:
    """The query log's filter from request parameters: client, name (a part), type (A, AAAA,
    ... or a number), outcome (a reason or a group of OUTCOMES), since/until (epoch seconds,
    or YYYY-MM-DDTHH:MM in the viewer's zone), hours (the last so many), limit, offset."""

    def number(key: str, low: int, high: int, default: int) -> int:
        text = args.get(key, "").strip()
        if not text:
            return default
        try:
            value = int(text)
        except ValueError:
            raise BadFilter(f"{key}: not a number: {text!r}") from None
        return max(low, min(high, value))

    qtype = None
    if text := args.get("type", "").strip().upper():
        if text.isdigit():
            qtype = int(text)
        elif text in TYPE_CODES:
            qtype = TYPE_CODES[text]
        elif text.startswith("TYPE") and text[4:].isdigit():
            qtype = int(text[4:])
        else:
            raise BadFilter(f"type: unknown type {text!r}")
    outcome = args.get("outcome", "").strip()
    groups = {key: reasons for key, _, _, reasons in OUTCOMES}
    if outcome and outcome not in groups and outcome not in OUTCOME_OF:
        raise BadFilter(f"outcome: unknown outcome {outcome!r}")
    outcomes = groups.get(outcome) or ((outcome,) if outcome else ())
    since = _time(args.get("since", ""), "since", offset_minutes)
    until = _time(args.get("until", ""), "until", offset_minutes)
    if since is None and (hours := number("hours", 0, 24 * 366, 0)):
        since = time.time() - hours * 3600
    return QueryFilter(
        client=args.get("client", "").strip() or None,
        name_part=args.get("name", "").strip().lower() or None,
        qtype=qtype, outcomes=outcomes, since=since, until=until,
        limit=number("limit", 1, 200, page_size), offset=number("offset", 0, 10**9, 0))


def _time(text: str, key: str, offset_minutes: int) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = time.strptime(text[:16], "%Y-%m-%dT%H:%M")
    except ValueError:
        raise BadFilter(f"{key}: not a time (YYYY-MM-DDTHH:MM or epoch seconds): "
                        f"{text!r}") from None
    return calendar.timegm(parsed) - offset_minutes * 60


async def queries(sources: Sources, wanted: QueryFilter) -> dict[str, Any]:
    """A page of the query log, newest first, and whether there is a next one."""
    h = sources.history
    rows = await h.read(h.queries(replace(wanted, limit=wanted.limit + 1)))
    more = len(rows) > wanted.limit
    rows = rows[:wanted.limit]
    for row in rows:
        row["outcome_group"] = OUTCOME_OF.get(row["outcome"], "failed")
    return {"queries": rows, "offset": wanted.offset, "limit": wanted.limit,
            "next_offset": wanted.offset + wanted.limit if more else None}
