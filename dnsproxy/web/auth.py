"""Who may see the page: a password kept in a file, sessions held in memory, and a limit on
failed logins.

The password file is read on every check (in a thread: it is small, but it is the disk), so a
new password written into it takes effect at once and ends every session opened with the old
one. Sessions are random tokens in an HttpOnly, SameSite=Strict cookie; they live in memory
only, so a restart asks everyone to log in again, which for a household's page costs little.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

# Letters and digits a person reads back without doubt (no 0/O, 1/l/I).
ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"
GENERATED_GROUPS = 4  # four groups of four: about 80 bits
SESSION_IDLE = 12 * 3600  # seconds a session lasts unused
SESSION_MAX = 7 * 86400  # and at most, used or not
MAX_SESSIONS = 64  # beyond, the least recently used goes


def generate_password() -> str:
    return "-".join("".join(secrets.choice(ALPHABET) for _ in range(4))
                    for _ in range(GENERATED_GROUPS))  # fmt: skip


def ensure_password_file(path: str) -> bool:
    """Create `path` with a generated password unless it exists (only its owner may read it);
    whether it was created. Start-up only: the event loop is not serving yet."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(generate_password() + "\n")
    return True


def read_password(path: str) -> str | None:
    """The first line of the file, stripped; None when it cannot be read or is empty (then
    nobody logs in, rather than everybody)."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.readline().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def fingerprint(password: str) -> bytes:
    """What a session remembers of the password it was opened with: a changed password ends it."""
    return hashlib.sha256(password.encode()).digest()


@dataclass
class Session:
    password: bytes  # fingerprint() of the password it was opened with
    created: float
    seen: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(16))


class Sessions:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.by_token: dict[str, Session] = {}

    def open(self, password: str) -> str:
        now = self.clock()
        if len(self.by_token) >= MAX_SESSIONS:
            oldest = min(self.by_token, key=lambda token: self.by_token[token].seen)
            del self.by_token[oldest]
        token = secrets.token_urlsafe(32)
        self.by_token[token] = Session(fingerprint(password), now, now)
        return token

    def get(self, token: str | None, password: str | None) -> Session | None:
        """The live session of `token` under the current password, its idle clock reset."""
        if not token or password is None:
            return None
        session = self.by_token.get(token)
        if session is None:
            return None
        now = self.clock()
        if (now - session.seen > SESSION_IDLE or now - session.created > SESSION_MAX
                or not hmac.compare_digest(session.password, fingerprint(password))):
            del self.by_token[token]
            return None
        session.seen = now
        return session

    def close(self, token: str | None) -> None:
        if token:
            self.by_token.pop(token, None)


class LoginLimiter:
    """Failed logins: a client gets `per_client` tries a `window`, every client together
    `overall` (a guesser with many addresses); past either, logins wait for the window."""

    def __init__(self, per_client: int = 5, overall: int = 30, window: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_client, self.overall, self.window, self.clock = per_client, overall, window, clock
        self.failures: dict[str, deque[float]] = {}
        self.all_failures: deque[float] = deque()

    def _recent(self, times: deque[float]) -> deque[float]:
        oldest = self.clock() - self.window
        while times and times[0] <= oldest:
            times.popleft()
        return times

    def wait(self, client: str) -> float:
        """Seconds until `client` may try again; 0 when it may now."""
        mine = self._recent(self.failures.get(client, deque()))
        everyone = self._recent(self.all_failures)
        waits = [times[0] + self.window - self.clock()
                 for times, limit in ((mine, self.per_client), (everyone, self.overall))
                 if len(times) >= limit]  # fmt: skip
        return max(waits, default=0.0)

    def failed(self, client: str) -> None:
        now = self.clock()
        self.failures.setdefault(client, deque()).append(now)
        self.all_failures.append(now)
        if len(self.failures) > 4096:  # a spray of addresses: keep those still counting
            self.failures = {c: t for c, t in self.failures.items() if self._recent(t)}

    def succeeded(self, client: str) -> None:
        self.failures.pop(client, None)


class Password:
    """The page's password as the file says now (read in a thread)."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def current(self) -> str | None:
        return await asyncio.to_thread(read_password, self.path)

    @staticmethod
    def matches(given: str, password: str | None) -> bool:
        return password is not None and hmac.compare_digest(given.encode(), password.encode())
