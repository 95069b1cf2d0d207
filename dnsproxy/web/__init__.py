"""The appliance's own page (issue #21): totals and a plot of the household's queries, the
forgeries the censor tried, the upstreams' health and latency, top names and clients, and a
query log to search, read from the history (dnsproxy/history.py). server.py serves it, views.py
gathers its data (also the JSON API's), pages.py and templates/ lay it out, svg.py draws the
plots, auth.py guards it."""

from .server import serve_web
from .views import Sources

__all__ = ["Sources", "serve_web"]
