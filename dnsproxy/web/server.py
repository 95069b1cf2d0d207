"""The appliance's page over HTTP: aiohttp on the forwarder's own event loop.

Every request passes three gates, in order: the forwarder's access list (a stranger's
connection is closed with nothing sent, as its queries get nothing), then, without a password
file, loopback only (the page is the host's), then a session opened at /login. Reading the
history runs in its thread and rendering in a worker thread, so the loop that answers DNS only
parses requests and writes responses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from . import pages, views
from .auth import LoginLimiter, Password, Session, Sessions

log = logging.getLogger("dnsproxy.web")

COOKIE = "dnsproxy_session"
TZ_COOKIE = "tz"  # minutes east of UTC, set by static/tz.js
FAILED_LOGIN_DELAY = 0.5  # seconds a wrong password waits for its answer
MAX_BODY = 4096  # the login form is the only body the page takes
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; script-src 'self'; "
                               "img-src 'self' data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC = {"style.css": "text/css", "tz.js": "text/javascript"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Where the gates leave the session for the handlers (a typed key where aiohttp has them).
SESSION: Any = web.RequestKey("session", Session) if hasattr(web, "RequestKey") else "session"


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class Page:
    """The routes and the gates; `sources` is what they read."""

    def __init__(self, sources: views.Sources, allowed: Callable[[str], bool],
                 password_file: str | None) -> None:
        self.sources = sources
        self.allowed = allowed
        self.password = Password(password_file) if password_file else None
        self.sessions = Sessions()
        self.limiter = LoginLimiter()
        self.static = {name: resources.files(__package__).joinpath("static", name).read_bytes()
                       for name in STATIC}  # fmt: skip

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.gates], client_max_size=MAX_BODY)
        app.router.add_get("/", self.dashboard)
        app.router.add_get("/queries", self.query_log)
        app.router.add_get("/login", self.login_page)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/static/{name}", self.static_file)
        for name, read in (("summary", self.api_summary), ("queries", self.api_queries),
                           ("forgeries", self.api_forgeries), ("upstreams", self.api_upstreams)):
            app.router.add_get(f"/api/{name}", read)
        return app

    # ---- the gates ---------------------------------------------------------------------------

    @web.middleware
    async def gates(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request.remote or ""
        if not self.allowed(peer):
            if request.transport is not None:
                request.transport.abort()  # nothing sent, as a refused query's client gets
            raise web.HTTPForbidden()
        api = request.path.startswith("/api/")
        if self.password is None and not is_loopback(peer):
            response = (json_response({"error": "the page is served to the appliance's host "
                                       "only (no password file)"}, 403) if api else
                        await self.render(403, pages.loopback_only, request))  # fmt: skip
        elif self.password is None or request.path in ("/login",) or (
                request.path.startswith("/static/")):
            response = await handler(request)
        else:
            session = self.sessions.get(request.cookies.get(COOKIE),
                                        await self.password.current())
            if session is None:
                if api:
                    response = json_response({"error": "login required"}, 401)
                else:
                    response = see_other(f"/login?next={_quote(request.path_qs)}")
            else:
                request[SESSION] = session
                response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    # ---- login -------------------------------------------------------------------------------

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        if self.password is None:
            return see_other("/")
        return await self.render(200, pages.login, request, next=_next(request.query))

    async def login(self, request: web.Request) -> web.StreamResponse:
        if self.password is None:
            return see_other("/")
        form = await request.post()
        target = _next(form)
        peer = request.remote or ""
        wait = self.limiter.wait(peer)
        if wait > 0:
            return await self.render(429, pages.login, request, next=target,
                                     error=f"Too many wrong passwords: try again in "
                                           f"{int(wait) + 1} s.")  # fmt: skip
        password = await self.password.current()
        given = form.get("password")
        if not isinstance(given, str) or not Password.matches(given, password):
            self.limiter.failed(peer)
            log.warning("web: wrong password from %s", peer)
            await asyncio.sleep(FAILED_LOGIN_DELAY)
            return await self.render(401, pages.login, request, next=target,
                                     error="Wrong password.")  # fmt: skip
        self.limiter.succeeded(peer)
        assert password is not None
        response = see_other(target)
        response.set_cookie(COOKIE, self.sessions.open(password), httponly=True,
                            samesite="Strict", path="/")  # fmt: skip
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session = request.get(SESSION)
        form = await request.post()
        if session is not None and form.get("csrf") != session.csrf:
            return web.Response(status=403, text="stale form: reload the page")
        self.sessions.close(request.cookies.get(COOKIE))
        response = see_other("/login" if self.password else "/")
        response.del_cookie(COOKIE, path="/")
        return response

    # ---- pages -------------------------------------------------------------------------------

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        hours = _int(request.query.get("hours"), views.DEFAULT_HOURS)
        summary, forged, upstreams = await asyncio.gather(
            views.summary(self.sources, hours), views.forgeries(self.sources, hours),
            views.upstreams(self.sources, hours))  # fmt: skip
        return await self.render(200, pages.dashboard, request, summary=summary,
                                 forged=forged, upstreams=upstreams)  # fmt: skip

    async def query_log(self, request: web.Request) -> web.StreamResponse:
        offset = tz_offset(request)
        try:
            wanted = views.query_filter(dict(request.query), offset_minutes=offset)
        except views.BadFilter as exc:
            return await self.render(400, pages.query_log, request, error=str(exc),
                                     args=dict(request.query), result=None)  # fmt: skip
        result = await views.queries(self.sources, wanted)
        return await self.render(200, pages.query_log, request, error=None,
                                 args=dict(request.query), result=result)  # fmt: skip

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        response = web.Response(body=self.static[name], content_type=STATIC[name])
        return response

    async def render(self, status: int, page: Callable[..., str], request: web.Request,
                     **context: Any) -> web.Response:
        """A page rendered in a worker thread (templates and plots take milliseconds)."""
        context.update(tz=tz_offset(request), session=request.get(SESSION),
                       login=self.password is not None, path=request.path,
                       identity=self.sources.identity)  # fmt: skip
        html = await asyncio.to_thread(page, **context)
        return web.Response(status=status, text=html, content_type="text/html")

    # ---- the JSON API ------------------------------------------------------------------------

    async def api_summary(self, request: web.Request) -> web.StreamResponse:
        hours = _int(request.query.get("hours"), views.DEFAULT_HOURS)
        return json_response(await views.summary(self.sources, hours))

    async def api_forgeries(self, request: web.Request) -> web.StreamResponse:
        hours = _int(request.query.get("hours"), views.DEFAULT_HOURS)
        return json_response(await views.forgeries(self.sources, hours))

    async def api_upstreams(self, request: web.Request) -> web.StreamResponse:
        hours = _int(request.query.get("hours"), views.DEFAULT_HOURS)
        return json_response(await views.upstreams(self.sources, hours))

    async def api_queries(self, request: web.Request) -> web.StreamResponse:
        try:
            wanted = views.query_filter(dict(request.query), offset_minutes=0)
        except views.BadFilter as exc:
            return json_response({"error": str(exc)}, 400)
        return json_response(await views.queries(self.sources, wanted))


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data, separators=(",", ":")),
                        content_type="application/json")


def tz_offset(request: web.Request) -> int:
    """The viewer's zone as tz.js reported it (minutes east of UTC); UTC without JavaScript."""
    value = _int(request.cookies.get(TZ_COOKIE), 0)
    return value if -14 * 60 <= value <= 14 * 60 else 0


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text else default
    except ValueError:
        return default


def _next(values: Any) -> str:
    """Where a login goes on to: a path of this page only (never another site)."""
    target = values.get("next") if values is not None else None
    if isinstance(target, str) and target.startswith("/") and not target.startswith("//") \
            and "\\" not in target:
        return target
    return "/"


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


async def serve_web(sources: views.Sources, host: str, port: int,
                    allowed: Callable[[str], bool], password_file: str | None) -> web.AppRunner:
    """Start the page; the caller stops it with `await runner.cleanup()`."""
    runner = web.AppRunner(Page(sources, allowed, password_file).app(), access_log=None,
                           handle_signals=False)  # fmt: skip
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
