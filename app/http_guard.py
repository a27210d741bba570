"""HTTP hardening in front of the Gradio app: headers that keep the page out of other sites' frames, requests
from other sites' pages refused, and the login cookie only in its safe form over HTTPS.

    app_kwargs={"middleware": [Middleware(HttpGuard, frame_ancestors="'none'")]}

Gradio 6 sets its login token twice, as `access-token-<id>` (Secure) and `access-token-unsecure-<id>`
(readable over plain HTTP, where a browser drops a Secure cookie). Over HTTPS the second copy has no use
and is removed; over plain HTTP it is the only one that works (a deployment exposed beyond loopback should
sit behind HTTPS: SECURITY.md).
"""
from __future__ import annotations

from urllib.parse import urlsplit

UNSAFE_METHODS = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})
INSECURE_COOKIE = b"access-token-unsecure-"


def _header(scope, name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == name), None)


def is_https(scope) -> bool:
    forwarded = (_header(scope, b"x-forwarded-proto") or "").split(",")[0].strip().lower()
    return scope.get("scheme") == "https" or forwarded == "https"


def cross_origin(scope) -> bool:
    """A state-changing request that a page of another site made: its Origin names another host than the
    request went to. Requests without Origin (gradio_client, curl) are not from a page."""
    if scope.get("method", "").encode() not in UNSAFE_METHODS:
        return False
    origin = _header(scope, b"origin")
    if origin is None:
        return False
    host = _header(scope, b"x-forwarded-host") or _header(scope, b"host") or ""
    return origin == "null" or urlsplit(origin).netloc.lower() != host.split(",")[0].strip().lower()


class HttpGuard:
    """ASGI middleware; `frame_ancestors`: the CSP source list of who may frame the app ("'none'"; a Space
    is framed by https://huggingface.co)."""

    def __init__(self, app, frame_ancestors: str = "'none'"):
        self.app = app
        self.headers = [(b"content-security-policy", f"frame-ancestors {frame_ancestors}".encode()),
                        (b"x-content-type-options", b"nosniff"),
                        (b"referrer-policy", b"same-origin")]
        if frame_ancestors == "'none'":
            self.headers.append((b"x-frame-options", b"DENY"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if cross_origin(scope):
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"), *self.headers]})
            await send({"type": "http.response.body",
                        "body": b"Refused: this request came from a page of another site."})
            return
        https = is_https(scope)

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if not (https and k.lower() == b"set-cookie" and v.startswith(INSECURE_COOKIE))]
                message = {**message, "headers": headers + self.headers}
            await send(message)

        await self.app(scope, receive, guarded_send)
