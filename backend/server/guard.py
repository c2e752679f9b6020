"""The door of the server: credentials and size, checked before a request's body is read.

A pure ASGI middleware (no Starlette request object, no body buffering), placed outermost:

- With basic auth configured, every path needs it — `/docs`, `/redoc` and `/openapi.json` too, which FastAPI's
  route dependencies never covered. `/webhook` also takes the shared secret header instead, because Label
  Studio's annotation webhooks cannot send basic auth. Auth is checked on the headers, before one byte of the body
  is received, so an unauthenticated caller cannot make the server read or parse anything.
- A body over its path's limit is refused with 413: at once when Content-Length says so, otherwise as soon as
  the bytes received pass the limit (chunked uploads), and the application never sees the rest.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.exceptions import HTTPException

WEBHOOK_SECRET_HEADER = "X-Tandem-Webhook-Secret"
DEFAULT_MAX_BODY = 32 * 1024 * 1024  # /predict with thousands of tasks is a few MB
DEFAULT_PATH_LIMITS = {"/webhook": 4 * 1024 * 1024, "/setup": 2 * 1024 * 1024, "/train": 256 * 1024}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI re-raises an HTTPException met while reading the body (any other exception
    there becomes its 400), so the answer is a 413 whichever layer renders it."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the {limit}-byte limit")


def _same(given: bytes, expected: bytes) -> bool:
    return secrets.compare_digest(given, expected)


def basic_auth_ok(header: bytes | None, expected: tuple[str, str]) -> bool:
    if not header or not header[:6].lower() == b"basic ":
        return False
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    user, sep, password = decoded.partition(b":")
    if not sep:
        return False
    # both compared every time: the time taken does not say which one was wrong
    return _same(user, expected[0].encode()) & _same(password, expected[1].encode())


class GuardMiddleware:
    """`GuardMiddleware(app, basic_auth=("u", "p"), webhook_secret="s")`; both None leaves only the size limits."""

    def __init__(
        self,
        app,
        basic_auth: tuple[str, str] | None = None,
        webhook_secret: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        path_limits: Mapping[str, int] | None = None,
        webhook_path: str = "/webhook",
    ) -> None:
        self.app = app
        self.basic_auth = basic_auth
        self.secret = webhook_secret.encode() if webhook_secret else None
        self.max_body = max_body
        self.path_limits = dict(DEFAULT_PATH_LIMITS if path_limits is None else path_limits)
        self.webhook_path = webhook_path

    # -- auth ---------------------------------------------------------------------------------------
    def _denied(self, scope: Scope) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        if self.basic_auth is None and self.secret is None:
            return None
        headers = dict(scope.get("headers") or [])  # lower-case names; the last of a repeated header
        path = scope.get("path", "")
        if path == self.webhook_path and self.secret is not None:
            given = headers.get(WEBHOOK_SECRET_HEADER.lower().encode(), b"")
            if _same(given, self.secret):
                return None
            if self.basic_auth is None:
                return 401, f"{WEBHOOK_SECRET_HEADER} header required", []
        if self.basic_auth is None:
            return None
        if basic_auth_ok(headers.get(b"authorization"), self.basic_auth):
            return None
        return 401, "basic auth required", [(b"www-authenticate", b'Basic realm="tandem"')]

    # -- ASGI ---------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            if self._denied(scope) is not None:
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        denied = self._denied(scope)
        if denied is not None:
            status, detail, extra = denied
            await _answer(send, status, detail, extra)
            return
        limit = self.path_limits.get(scope.get("path", ""), self.max_body)
        declared = _content_length(scope)
        if declared is not None and declared != -1 and declared > limit:
            await _answer(send, 413, f"request body of {declared} bytes is over the {limit}-byte limit")
            return
        if declared == -1:
            await _answer(send, 400, "Content-Length is not a non-negative number")
            return
        received = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if not started:
                await _answer(send, 413, exc.detail)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or []:
        if name == b"content-length":
            try:
                number = int(value)
            except ValueError:
                return -1
            return number if number >= 0 else -1
    return None


async def _answer(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
