# What the forwarder loads at start-up (httpx only for https:// upstreams, aiohttp, Jinja2 and
# sqlite3 only with the page, but they must work), run inside the trimmed root. Keep it in step
# with dnsproxy/: the byte code of what it loads is all that stays (trim.py, prune_bytecode).
import importlib
import ssl

for name in (
    "argparse", "asyncio", "collections", "contextlib", "dataclasses", "enum", "functools",
    "importlib.resources", "importlib.util", "ipaddress", "json", "logging", "os", "re",
    "secrets", "signal", "socket", "struct", "time", "tomllib", "typing", "urllib.parse",
    "zlib", "dnslib", "uvloop", "httpx", "sqlite3", "aiohttp.web", "jinja2",
):  # fmt: skip
    importlib.import_module(name)

ctx = ssl.create_default_context(cafile="/etc/ssl/certs/ca-certificates.crt")
assert ctx.cert_store_stats()["x509_ca"] > 50, "CA bundle is empty"
