"""Label Studio's failures in one line: what a user reads when the URL, key or project id is wrong."""

from __future__ import annotations

import httpx
from label_studio_sdk.core.api_error import ApiError

from backend.labelstudio.errors import describe

PAGE = "<!DOCTYPE HTML>\n<html lang=\"en\">\n<head><title>Error response</title></head>\n<body>404</body></html>\n"


def test_an_html_page_is_another_server_not_a_dump():
    said = describe(ApiError(status_code=404, headers={"set-cookie": "sessionid=secret"}, body=PAGE),
                    "http://127.0.0.1:8232")
    assert said.startswith("http://127.0.0.1:8232 answered 404 with an HTML page, not Label Studio's API")
    assert "LABEL_STUDIO_URL" in said and "<html" not in said and "\n" not in said and "secret" not in said


def test_json_answers_keep_their_detail_and_hint():
    assert describe(ApiError(status_code=404, body={"detail": "Not found."})) == \
        "Label Studio answered 404: Not found. (check the project id)"
    assert describe(ApiError(status_code=401, body={"detail": "Invalid token."})).endswith(
        "(check LABEL_STUDIO_API_KEY)")
    long = describe(ApiError(status_code=400, body={"detail": "x" * 5000}))
    assert len(long) < 400 and long.endswith("…")


def test_an_unreachable_host_names_the_url():
    said = describe(httpx.ConnectError("[Errno 111] Connection refused"), "http://127.0.0.1:8231")
    assert said == "cannot reach Label Studio at http://127.0.0.1:8231: [Errno 111] Connection refused"
