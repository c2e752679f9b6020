"""Rule: with auth on, every path needs it (the docs too), and it is checked on the headers before the body is
read; a body over its path's limit is refused with 413 before it is read in full. Runs the real middleware in
front of a real FastAPI app on a real socket."""

from __future__ import annotations

import base64
import socket

import httpx
import pytest
from fastapi import FastAPI, Request

from backend.dev.server_thread import ServerThread
from backend.server.guard import WEBHOOK_SECRET_HEADER, GuardMiddleware


def _app(**guard):
    app = FastAPI()
    app.state.bodies_read = 0

    @app.post("/predict")
    async def predict(request: Request):
        body = await request.body()
        app.state.bodies_read += 1
        return {"bytes": len(body)}

    @app.post("/webhook")
    async def webhook(request: Request):
        await request.body()
        app.state.bodies_read += 1
        return {"status": "ok"}

    @app.get("/health")
    def health():
        return {"status": "UP"}

    app.add_middleware(GuardMiddleware, **guard)
    return app


def _basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture()
def guarded():
    app = _app(basic_auth=("admin", "s3cret"), webhook_secret="hook", max_body=1_000_000,
               path_limits={"/webhook": 10_000})
    with ServerThread(app) as server:
        yield app, server.url


BAD_AUTH = [None, "", "Basic", "Bearer s3cret", _basic("admin", "wrong"), _basic("Admin", "s3cret"),
            _basic("admin", "s3cret "), _basic("admin", ""), "Basic " + base64.b64encode(b"admins3cret").decode(),
            "Basic !!!notbase64", _basic("", ""),
            "Digest admin:s3cret"]


@pytest.mark.parametrize("header", BAD_AUTH)
def test_every_path_needs_auth_including_the_docs(guarded, header):
    app, url = guarded
    headers = {"Authorization": header} if header is not None else {}
    for path in ("/docs", "/redoc", "/openapi.json", "/health", "/docs/oauth2-redirect", "/nope"):
        assert httpx.get(url + path, headers=headers).status_code == 401
    assert httpx.post(url + "/predict", content=b"x" * 500_000, headers=headers).status_code == 401
    assert app.state.bodies_read == 0  # refused on the headers: the body was never read


def test_the_right_credentials_pass(guarded):
    app, url = guarded
    good = {"Authorization": _basic("admin", "s3cret")}
    assert httpx.get(url + "/openapi.json", headers=good).status_code == 200
    assert httpx.get(url + "/docs", headers=good).status_code == 200
    assert httpx.post(url + "/predict", content=b"{}", headers={"authorization": "basic " + good["Authorization"][6:]}
                      ).json() == {"bytes": 2}


def test_the_webhook_takes_its_secret_header_instead(guarded):
    app, url = guarded
    assert httpx.post(url + "/webhook", json={}, headers={WEBHOOK_SECRET_HEADER: "hook"}).status_code == 200
    for wrong in ("", "hoo", "HOOK", "hookhook", "hook\x00"[:4] + "x"):
        assert httpx.post(url + "/webhook", json={}, headers={WEBHOOK_SECRET_HEADER: wrong}).status_code == 401
    # the secret opens /webhook only
    assert httpx.post(url + "/predict", json={}, headers={WEBHOOK_SECRET_HEADER: "hook"}).status_code == 401


def test_a_secret_without_basic_auth_guards_only_the_webhook():
    app = _app(webhook_secret="hook")
    with ServerThread(app) as server:
        assert httpx.post(server.url + "/webhook", json={}).status_code == 401
        assert httpx.post(server.url + "/predict", json={}).status_code == 200


def test_bodies_over_the_limit_are_refused_before_they_are_read(guarded):
    app, url = guarded
    good = {"Authorization": _basic("admin", "s3cret")}
    resp = httpx.post(url + "/predict", content=b"x" * 1_000_001, headers=good)
    assert resp.status_code == 413 and "limit" in resp.json()["detail"]
    assert httpx.post(url + "/webhook", content=b"x" * 10_001, headers={WEBHOOK_SECRET_HEADER: "hook"}).status_code == 413
    assert app.state.bodies_read == 0

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"x" * 50_000

    resp = httpx.post(url + "/predict", content=chunks(), headers=good)
    assert resp.status_code == 413 and app.state.bodies_read == 0
    assert httpx.post(url + "/predict", content=b"x" * 999_999, headers=good).json() == {"bytes": 999_999}


def test_a_lying_content_length_is_refused(guarded):
    _, url = guarded
    host, port = url.removeprefix("http://").split(":")
    for value in (b"-1", b"abc", b"99999999999999999999"):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            auth = _basic("admin", "s3cret").encode()
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth +
                         b"\r\nContent-Length: " + value + b"\r\n\r\n")
            answer = sock.recv(1000)
        assert answer.split(b" ")[1] in (b"400", b"413"), answer


def test_without_auth_only_sizes_are_checked():
    app = _app(max_body=100)
    with ServerThread(app) as server:
        assert httpx.get(server.url + "/openapi.json").status_code == 200
        assert httpx.post(server.url + "/predict", content=b"x" * 101).status_code == 413
