"""Real HTTP servers on loopback addresses (127.0.0.x) for the security tests: they record what reaches them."""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def png(size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


class Recorder:
    """A server on `host` (port picked by the OS). `routes` maps a path to a handler(req) -> None; every request
    is recorded as (path, headers)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.routes: dict[str, object] = {}
        self.active = 0
        self.peak = 0
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                with recorder._lock:
                    recorder.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                    recorder.active += 1
                    recorder.peak = max(recorder.peak, recorder.active)
                    self.counted = True
                try:
                    route = recorder.routes.get(self.path.split("?")[0])
                    if route is None:
                        self.send_response(200)
                        body = png()
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    recorder.leave(self)

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.host = host
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def leave(self, req) -> None:
        """A request stops counting as active once: a handler may leave before its last byte, since the client can
        finish, free its slot and send the next request before this handler's thread gets to run again."""
        with self._lock:
            if getattr(req, "counted", False):
                req.counted = False
                self.active -= 1

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        def handler(req):
            req.send_response(status)
            req.send_header("Location", location)
            req.send_header("Content-Length", "0")
            req.end_headers()
        self.routes[path] = handler

    def drip(self, path: str, every: float = 0.5, total: int = 10_000) -> None:
        """A body of `total` bytes, one byte every `every` seconds."""
        def handler(req):
            req.send_response(200)
            req.send_header("Content-Length", str(total))
            req.end_headers()
            for i in range(total):
                if i:
                    time.sleep(every)
                if i == total - 1:
                    self.leave(req)  # the client may be done the moment this byte arrives
                req.wfile.write(b"x")
                req.wfile.flush()
        self.routes[path] = handler

    def with_auth(self) -> list[str]:
        return [path for path, headers in self.requests if "authorization" in headers]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
