"""The forwarder's web page seen from the host: where the LAN finds it, and its password.

The password is a file in the forwarder's state volume (compose.web.yaml), which the forwarder
writes with a generated password at its first start and reads at every login. The host never
opens the volume's directory: with an engine reached over DOCKER_HOST (a nested or remote one)
that path is not on this machine. It goes through the engine, as `docker cp` does: a tar
archive put into the running container, and one read out of it.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Callable
from typing import Any

from dnsproxy.defaults import WEB_PORT
from netsetup import plan
from netsetup.errors import BadInput
from netsetup.plan import Settings

# Where compose.web.yaml tells the forwarder its password is (the state volume).
PASSWORD_DIR = "/var/lib/dnsproxy"
PASSWORD_NAME = "web-password"
PASSWORD_PATH = f"{PASSWORD_DIR}/{PASSWORD_NAME}"
# The appliance image's user (images/appliance/Dockerfile): the file is its, readable by it only.
APPLIANCE_UID = APPLIANCE_GID = 10053
PASSWORD_MODE = 0o600
# WEB_PASSWORD reaches `netsetup up` in the environment: on the command line `ps` would show it.
PASSWORD_ENV = "NETSETUP_WEB_PASSWORD"


def urls(settings: Settings, host_address: str) -> list[str]:
    """Where the LAN opens the page, one address per way the modes give (none when it is off):
    the container's own address (direct), the host's LAN address at WEB_PORT (port), LAN_IP
    (lan; LAN_IP6 too once the page listens on IPv6, plan.WEB_OVER_IPV6)."""
    if not settings.web:
        return []
    out = []
    if settings.direct:
        out.append(url(settings.ip, WEB_PORT))
    if settings.published:
        out.append(url(host_address, settings.web_port))
    if settings.lan and settings.lan_ip:
        out.append(url(settings.lan_ip, WEB_PORT))
    if settings.ipv6 and settings.lan_ip6 and plan.WEB_OVER_IPV6:
        out.append(url(f"[{settings.lan_ip6}]", WEB_PORT))
    return out


def url(host: str, port: int) -> str:
    return f"http://{host}/" if port == 80 else f"http://{host}:{port}/"


def checked_password(text: str) -> str:
    """A WEB_PASSWORD the forwarder can read back as given: its file holds the password on its
    first line, so one line, not empty, and no blanks at its ends that an editor or a shell
    would lose on the way to the login form."""
    if not text:
        raise BadInput("WEB_PASSWORD is empty: give a password, or none to keep the current one")
    if "\n" in text or "\r" in text:
        raise BadInput("WEB_PASSWORD holds a line break: the password is one line")
    if text != text.strip():
        raise BadInput("WEB_PASSWORD begins or ends with a blank: leave them out")
    return text


def password_archive(password: str, mtime: float | None = None) -> bytes:
    """A tar holding the password file as the forwarder makes it (the password on its first
    line, newline-terminated; the appliance's user, mode 0600), for `put_archive` into
    PASSWORD_DIR. The engine keeps a member's owner and mode as the archive gives them."""
    data = (password + "\n").encode()
    member = tarfile.TarInfo(PASSWORD_NAME)
    member.size = len(data)
    member.mode = PASSWORD_MODE
    member.uid, member.gid = APPLIANCE_UID, APPLIANCE_GID
    member.mtime = int(time.time() if mtime is None else mtime)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def password_from_archive(data: bytes) -> str | None:
    """The password in what `get_archive` gave for PASSWORD_PATH: the first line of its one
    regular file; None when there is none, or it is empty (the forwarder still writing it)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.name.rsplit("/", 1)[-1] == PASSWORD_NAME:
                    handle = tar.extractfile(member)
                    text = handle.read().decode("utf-8", "replace") if handle else ""
                    first = text.split("\n", 1)[0].rstrip("\r")
                    return first or None
    except tarfile.TarError:
        return None
    return None


def _missing(exc: Exception) -> bool:
    """The engine's answer for a path that does not exist (docker.errors.NotFound: 404)."""
    return getattr(exc, "status_code", None) == 404


def read_password(container: Any, timeout: float = 0.0, sleep: Callable[[float], None] = time.sleep,
                  clock: Callable[[], float] = time.monotonic) -> str | None:  # fmt: skip
    """The password the running forwarder has, read out of its container; retried for
    `timeout` seconds while the file is missing or empty (the forwarder may still be creating
    it). None when it is still not there; an engine error other than a missing file raises."""
    deadline = clock() + timeout
    while True:
        try:
            chunks, _ = container.get_archive(PASSWORD_PATH)
            password = password_from_archive(b"".join(chunks))
            if password:
                return password
        except Exception as exc:
            if not _missing(exc):
                raise
        if clock() >= deadline:
            return None
        sleep(0.25)


def settle_password(container: Any, given: str | None, timeout: float = 10.0,
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> str | None:  # fmt: skip
    """The page's password once `up` is done: `given` (WEB_PASSWORD) written into the container
    when it differs from the forwarder's, then read back. Waits for the forwarder's own file
    first, so that a forwarder creating it at its start does not write over ours."""
    current = read_password(container, timeout, sleep, clock)
    if given is None or given == current:
        return current
    if not container.put_archive(PASSWORD_DIR, password_archive(given)):
        raise OSError(f"the engine refused to write {PASSWORD_PATH}")
    return read_password(container, timeout, sleep, clock)
