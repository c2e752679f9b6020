"""Label Studio credentials for media downloads: legacy tokens and personal access tokens.

A PAT is a JWT refresh token: it must be exchanged at /api/token/refresh/ for a 5-minute access token
(`Bearer`), which is cached and renewed early or on a 401. A legacy token is sent as `Token <key>`.
New Label Studio organisations have legacy tokens switched off, so PATs are the common case.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Generator

import httpx

from backend.errors import MediaError


def _jwt_claims(token: str) -> dict | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        return json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, json.JSONDecodeError):
        return None


def is_personal_access_token(token: str) -> bool:
    claims = _jwt_claims(token)
    return bool(claims) and claims.get("token_type") == "refresh"


class LabelStudioAuth(httpx.Auth):
    """httpx auth for requests to Label Studio; thread-safe, retries once after a 401 with a fresh token."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.is_pat = is_personal_access_token(api_key)
        self._timeout = timeout
        self._access: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def _refresh(self) -> str:
        try:
            resp = httpx.post(
                f"{self.base_url}/api/token/refresh/", json={"refresh": self.api_key}, timeout=self._timeout
            )
        except httpx.HTTPError as exc:
            raise MediaError(f"cannot reach Label Studio at {self.base_url} to refresh the access token: {exc}") from exc
        if resp.status_code != 200:
            raise MediaError(
                f"Label Studio refused the personal access token (HTTP {resp.status_code}); create a new one "
                "under Account & Settings → Personal Access Token"
            )
        access = resp.json()["access"]
        claims = _jwt_claims(access) or {}
        self._expires = float(claims.get("exp", time.time() + 300)) - 30  # renew 30 s early
        return access

    def header(self, force_refresh: bool = False) -> str:
        if not self.is_pat:
            return f"Token {self.api_key}"
        with self._lock:
            if force_refresh or self._access is None or time.time() >= self._expires:
                self._access = self._refresh()
            return f"Bearer {self._access}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self.header()
        response = yield request
        if response.status_code == 401 and self.is_pat:
            request.headers["Authorization"] = self.header(force_refresh=True)
            yield request
