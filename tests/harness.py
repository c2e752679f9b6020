"""Real processes for the tests: a Label Studio 1.23 in its own uv tool environment, and Tandem on uvicorn."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from PIL import Image

LABEL_STUDIO_VERSION = os.environ.get("TANDEM_TEST_LABEL_STUDIO", "1.23.2")
ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "tandem-test-password"
ADMIN_TOKEN = "tandemtesttoken0123456789abcdef01234567"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _uv() -> str:
    return os.environ.get("UV") or shutil.which("uv") or "uv"


def label_studio_executable() -> Path:
    """Install Label Studio into its own tool environment once (its pins clash with ours)."""
    bin_dir = Path(subprocess.run([_uv(), "tool", "dir", "--bin"], capture_output=True, text=True, check=True).stdout.strip())
    exe = bin_dir / "label-studio"
    listed = subprocess.run([_uv(), "tool", "list"], capture_output=True, text=True).stdout
    if not exe.exists() or f"label-studio v{LABEL_STUDIO_VERSION}" not in listed:
        subprocess.run([_uv(), "tool", "install", "--force", f"label-studio=={LABEL_STUDIO_VERSION}"], check=True)
    return exe


@dataclass
class LabelStudioProcess:
    url: str
    token: str
    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_label_studio(data_dir: Path, timeout: float = 240.0) -> LabelStudioProcess:
    exe = label_studio_executable()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": ADMIN_EMAIL,
        "LABEL_STUDIO_PASSWORD": ADMIN_PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": ADMIN_TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_HOST": url,
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
    }
    for leak in ("VIRTUAL_ENV", "PYTHONPATH", "UV_PROJECT_ENVIRONMENT"):
        env.pop(leak, None)
    log_path = data_dir / "label-studio.log"
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Label Studio exited with {proc.returncode}; see {log_path}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                httpx.get(f"{url}/api/projects", headers={"Authorization": f"Token {ADMIN_TOKEN}"}, timeout=10).raise_for_status()
                return LabelStudioProcess(url, ADMIN_TOKEN, proc, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"Label Studio did not answer /health within {timeout:.0f} s; see {log_path}")


class ServerThread:
    """Tandem's real ASGI app on a real socket, in a thread of the test process."""

    def __init__(self, app, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("Tandem did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(10)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
