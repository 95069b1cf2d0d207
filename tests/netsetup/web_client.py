"""A LAN client of the forwarder's web page, run in a client's namespace by the end-to-end tests:
`python web_client.py URL PASSWORD [WRONG_PASSWORD]` prints, as one JSON object, what the page
answered to each step a browser takes: the page itself, the login form, a login, the API with
the session it set and without one, and a login with a wrong password. Redirects are reported,
not followed. Standard library only: it runs with the test's interpreter, in any namespace.
"""

from __future__ import annotations

import http.client
import json
import sys
from http.cookies import SimpleCookie
from urllib.parse import urlencode, urlsplit


def request(url: str, method: str, path: str, body: str | None = None,
            headers: dict[str, str] | None = None) -> dict:  # fmt: skip
    """One request on a connection of its own: status, the headers that matter, and the body
    read as JSON when it says it is JSON."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    cookie = SimpleCookie(response.headers.get("Set-Cookie") or "")
    session = cookie.get("session")
    out = {
        "status": response.status,
        "location": response.headers.get("Location"),
        "content_type": response.headers.get("Content-Type") or "",
        "session": session.value if session else None,
        "httponly": bool(session and session["httponly"]),
        "samesite": session["samesite"] if session else None,
        "json": None,
    }
    if "json" in out["content_type"]:
        try:
            out["json"] = type(json.loads(data)).__name__
        except ValueError:
            out["json"] = "invalid"
    return out


def login(url: str, password: str) -> dict:
    form = urlencode({"password": password})
    return request(url, "POST", "/login", form,
                   {"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip


def main(url: str, password: str, wrong: str = "not the password") -> dict:
    steps = {"root": request(url, "GET", "/"), "login_page": request(url, "GET", "/login")}
    steps["login"] = login(url, password)
    session = steps["login"]["session"]
    cookie = {"Cookie": f"session={session}"} if session else {}
    steps["summary"] = request(url, "GET", "/api/summary", headers=cookie)
    steps["summary_without"] = request(url, "GET", "/api/summary")
    steps["wrong"] = login(url, wrong)
    return steps


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))
