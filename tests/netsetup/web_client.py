"""A LAN client of the forwarder's web page, run in a client's namespace by the end-to-end tests:
`python web_client.py URL PASSWORD [WRONG_PASSWORD]` prints, as one JSON object, what the page
answered to each step a browser takes: the page itself, the login form, a login, the API with
the cookies the login set and without them, and a login with a wrong password. Redirects are
reported, not followed. Standard library only: it runs with the test's interpreter, in any
namespace.
"""

from __future__ import annotations

import http.client
import json
import sys
from http.cookies import SimpleCookie
from urllib.parse import urlencode, urlsplit


def request(url: str, method: str, path: str, body: str | None = None,
            headers: dict[str, str] | None = None) -> dict:  # fmt: skip
    """One request on a connection of its own: status, where it redirects, the cookies it sets
    (each with its HttpOnly and SameSite attributes), and the body's JSON type when it says it
    is JSON."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    cookies = SimpleCookie()
    for header in response.headers.get_all("Set-Cookie") or []:
        cookies.load(header)
    out = {
        "status": response.status,
        "location": response.headers.get("Location"),
        "content_type": response.headers.get("Content-Type") or "",
        "cookies": {name: {"value": morsel.value, "httponly": bool(morsel["httponly"]),
                           "samesite": morsel["samesite"]}
                    for name, morsel in cookies.items()},
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
    jar = "; ".join(f"{name}={c['value']}" for name, c in steps["login"]["cookies"].items())
    steps["summary"] = request(url, "GET", "/api/summary", headers={"Cookie": jar} if jar else {})
    steps["summary_without"] = request(url, "GET", "/api/summary")
    steps["wrong"] = login(url, wrong)
    return steps


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))
