"""Sign-in: who may log in, and how often anyone may try.

    python -m app hash-password ana >> auth.txt     # asks for ana's password, writes "ana:scrypt$..."
    python -m app --auth-file auth.txt              # one "user:hash" per line; '#' starts a comment

Passwords are kept as salted scrypt hashes (`--auth-file`), or in plain text where they come
from `--auth`/$LESIONLENS_AUTH. Either way `Authenticator` checks them in constant time, in a worker
thread (scrypt must not stall the server), and `LoginThrottle` stops guessing without handing an attacker
a way to lock people out:

- a user name and client address together get a few free failures, then HTTP 429 for a lock-out that
  doubles with each further failure: guessing one account from one place slows to a crawl;
- a user name across all addresses (guessing from many places), and one address across all user names
  (trying many accounts), get more free failures before they lock; these two locks do not apply where that
  user has signed in from that address before, so an attacker elsewhere (or guessing other accounts behind
  the same clinic NAT) cannot shut a known user out.

Every failure is logged (user and address, never the password).
"""
from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lesionlens")

# scrypt at n=2**14, r=8: ~16 MB and ~50 ms per check; slow for a guesser, unnoticed at login.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
HASH_PREFIX = "scrypt$"

PAIR_FREE_FAILURES = 5       # failed logins for one user name from one address before that pair is locked
USER_FREE_FAILURES = 30      # for one user name from anywhere (guessing spread over many addresses)
ADDRESS_FREE_FAILURES = 20   # from one address for any user (higher: a proxy or clinic NAT fronts many people)
FIRST_LOCK_S = 2.0           # the first lock-out; each further failure doubles it ...
MAX_LOCK_S = 900.0           # ... up to 15 minutes
FORGET_AFTER_S = 3600.0      # failures older than this (since the last one) no longer count
MAX_TRACKED = 10_000         # user names and addresses remembered, so guessing cannot fill memory


# ------------------------------------------------------------------ password hashes
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, salt: bytes | None = None) -> str:
    """'scrypt$N$r$p$salt$hash' (base64) with a random 16-byte salt."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                            p=SCRYPT_P, maxmem=64 * 1024 * 1024)
    return f"{HASH_PREFIX}{SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches a hash_password() result; False for a malformed hash."""
    try:
        name, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest, validate=True)
        if name != HASH_PREFIX.rstrip("$"):
            return False
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt, validate=True),
                             n=int(n), r=int(r), p=int(p), dklen=len(expected),
                             maxmem=64 * 1024 * 1024)
    except ValueError:
        return False
    return hmac.compare_digest(got, expected)


def read_auth_file(path: str | Path) -> dict[str, str]:
    """{user: hash} from lines 'user:scrypt$...'; ValueError names the file and line."""
    accounts = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        user = user.strip()
        if not sep or not user or not stored.startswith(HASH_PREFIX) or stored.count("$") != 5:
            raise ValueError(f"{path}, line {number}: expected user:scrypt$..., as written by "
                             "`python -m app hash-password USER` (plain passwords do not go "
                             "in this file)")
        if user in accounts:
            raise ValueError(f"{path}, line {number}: user {user!r} is listed twice")
        accounts[user] = stored
    if not accounts:
        raise ValueError(f"{path}: no users in it (one user:hash per line)")
    return accounts


# ------------------------------------------------------------------ throttling
@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class LoginThrottle:
    """Failed logins counted per key ('user:NAME', 'address:IP'); thread-safe."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._failures: dict[str, _Failures] = {}
        self._known: dict[tuple[str, str], float] = {}   # (user, address) that signed in -> when
        self._lock = threading.Lock()

    def remember(self, user: str, address: str) -> None:
        """`user` signed in from `address`: only the pair's own lock applies to it from now on."""
        with self._lock:
            self._known[(user, address)] = self._clock()
            if len(self._known) > MAX_TRACKED:   # the oldest half goes: a guesser cannot add entries
                for pair in sorted(self._known, key=self._known.get)[: len(self._known) // 2]:
                    del self._known[pair]

    def known(self, user: str, address: str) -> bool:
        with self._lock:
            return (user, address) in self._known

    def wait_s(self, *keys: str) -> float:
        """Seconds until all `keys` may try again; 0 when none is locked."""
        now = self._clock()
        with self._lock:
            return max([0.0] + [f.locked_until - now for k in keys
                                if (f := self._failures.get(k)) and f.locked_until > now])

    def failed(self, key: str, free_failures: int) -> tuple[int, float]:
        """Count a failure; returns (failures in a row, lock-out seconds it starts, 0 if none)."""
        now = self._clock()
        with self._lock:
            f = self._failures.get(key)
            if f is None or now - f.last > FORGET_AFTER_S:
                f = self._failures[key] = _Failures()
            f.count += 1
            f.last = now
            lock = 0.0
            if f.count >= free_failures:
                lock = min(MAX_LOCK_S, FIRST_LOCK_S * 2 ** (f.count - free_failures))
                f.locked_until = now + lock
            if len(self._failures) > MAX_TRACKED:
                self._forget_oldest()
            return f.count, lock

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def _forget_oldest(self) -> None:
        by_age = sorted(self._failures, key=lambda k: self._failures[k].last)
        for key in by_age[: len(by_age) // 2]:
            del self._failures[key]


# The client address of the login request being handled: Gradio calls the auth function with
# the user name and password only, so a small middleware hands it over.
_client_address: contextvars.ContextVar[str] = contextvars.ContextVar("client_address",
                                                                      default="unknown")


class ClientAddressMiddleware:
    """ASGI middleware: makes the client address of /login requests known to Authenticator."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").rstrip("/").endswith("/login"):
            client = scope.get("client")
            token = _client_address.set(client[0] if client else "unknown")
            try:
                await self.app(scope, receive, send)
            finally:
                _client_address.reset(token)
        else:
            await self.app(scope, receive, send)


class Authenticator:
    """Gradio's `auth=` callable: (user, password) -> bool, or HTTP 429 while locked out.

    `accounts`: {user: ('hash', 'scrypt$...') or ('plain', password)}.
    """

    def __init__(self, accounts: dict[str, tuple[str, str]], throttle: LoginThrottle | None = None):
        self.accounts = dict(accounts)
        self.throttle = throttle or LoginThrottle()
        # Unknown user names cost the same as known ones: timing does not tell which exist.
        self._decoy = hash_password(secrets.token_urlsafe(16))

    @classmethod
    def from_sources(cls, pairs: list[tuple[str, str]] | None = None,
                     hashes: dict[str, str] | None = None) -> "Authenticator":
        """Plain `(user, password)` pairs (--auth) and `{user: hash}` (--auth-file)."""
        accounts = {user: ("hash", stored) for user, stored in (hashes or {}).items()}
        for user, password in pairs or []:
            if user in accounts:
                raise ValueError(f"user {user!r} is given twice (--auth and --auth-file)")
            accounts[user] = ("plain", password)
        return cls(accounts)

    def __len__(self) -> int:
        return len(self.accounts)

    def _matches(self, user: str, password: str) -> bool:
        kind, secret = self.accounts.get(user, ("hash", self._decoy))
        if kind == "plain":
            ok = hmac.compare_digest(password.encode("utf-8"), secret.encode("utf-8"))
        else:
            ok = verify_password(password, secret)
        return ok and user in self.accounts

    async def check(self, user: str, password: str) -> bool:
        """Gradio's `auth=`: a coroutine, so its login route awaits it and the scrypt check runs in a worker
        thread (with this request's context: the client address) instead of on the server's event loop."""
        return await asyncio.to_thread(self, user, password)

    def __call__(self, user: str, password: str) -> bool:
        address = _client_address.get()
        pair, by_user, by_address = f"pair:{user}@{address}", f"user:{user}", f"address:{address}"
        keys = (pair,) if self.throttle.known(user, address) else (pair, by_user, by_address)
        wait = self.throttle.wait_s(*keys)
        if wait > 0:   # refused unchecked: the right password does not help while locked out
            log.warning("login refused for user %r from %s: locked out for %.0f s more",
                        user, address, wait)
            raise _too_many(wait)
        if self._matches(user, password):
            self.throttle.succeeded(pair)
            self.throttle.remember(user, address)
            return True
        count, lock = self.throttle.failed(pair, PAIR_FREE_FAILURES)
        lock = max(lock, self.throttle.failed(by_user, USER_FREE_FAILURES)[1],
                   self.throttle.failed(by_address, ADDRESS_FREE_FAILURES)[1])
        log.warning("failed login for user %r from %s (%d in a row for this user from this address)%s",
                    user, address, count, f"; locked out for {lock:.0f} s" if lock else "")
        return False


def _too_many(wait_s: float):
    """The 429 FastAPI sends when Gradio's login route calls us."""
    from fastapi import HTTPException
    seconds = max(1, math.ceil(wait_s))
    return HTTPException(status_code=429, headers={"Retry-After": str(seconds)},
                         detail=f"Too many failed sign-ins: try again in {seconds} s.")
