"""Label Studio's failures, said in one line a person can act on.

The SDK's ApiError prints the response headers, which carry Label Studio's session cookie: that text must
not reach a terminal, a log or the job table.
"""

from __future__ import annotations

import httpx
from label_studio_sdk.core.api_error import ApiError


def describe(exc: BaseException, url: str | None = None) -> str:
    if isinstance(exc, ApiError):
        body = exc.body
        if isinstance(body, dict):
            body = body.get("detail") or body.get("validation_errors") or body
        hint = {401: " (check LABEL_STUDIO_API_KEY)", 404: " (check the project id)"}.get(exc.status_code or 0, "")
        return f"Label Studio answered {exc.status_code}: {body}{hint}"
    if isinstance(exc, httpx.TransportError):
        return f"cannot reach Label Studio at {url or 'LABEL_STUDIO_URL'}: {exc}"
    return f"{type(exc).__name__}: {exc}"
