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
        text = str(body)
        if "<html" in text[:500].lower() or "<!doctype" in text[:500].lower():
            # an HTML page where Label Studio's API answers JSON: another server, or a proxy's error page
            where = url or "LABEL_STUDIO_URL"
            return (f"{where} answered {exc.status_code} with an HTML page, not Label Studio's API: check "
                    "LABEL_STUDIO_URL (host, port, and no path after it)")
        if len(text) > 300:
            text = text[:300] + "…"
        hint = {401: " (check LABEL_STUDIO_API_KEY)", 404: " (check the project id)"}.get(exc.status_code or 0, "")
        return f"Label Studio answered {exc.status_code}: {text}{hint}"
    if isinstance(exc, httpx.TransportError):
        return f"cannot reach Label Studio at {url or 'LABEL_STUDIO_URL'}: {exc}"
    return f"{type(exc).__name__}: {exc}"
