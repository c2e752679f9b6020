"""A local Label Studio for the demo and the tests: installed once into its own uv tool environment
(its pins clash with Tandem's), started on 127.0.0.1 with an admin password and token made for this launch, stopped at the end."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

LABEL_STUDIO_VERSION = os.environ.get("TANDEM_LABEL_STUDIO_VERSION", "1.23.2")
ADMIN_EMAIL = "admin@example.com"


# Label Studio 1.23's feature flag (an environment variable of Label Studio's process) for its batched prediction
# import: with it off (the default) every import request recounts every predicted task of the project.
MEMORY_EFFICIENT_IMPORT_FLAG = "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _uv() -> str:
    return os.environ.get("UV") or shutil.which("uv") or "uv"


# Label Studio 1.23.2 does not bound sentry-sdk: 3.x (2026-12) refuses its `send_default_pii` option and it
# crashes at start. Installed with 2.x, and started with Sentry off either way (an install made without the pin).
SENTRY_PIN = "sentry-sdk<3"


def label_studio_executable(version: str = LABEL_STUDIO_VERSION) -> Path:
    """`uv tool install label-studio==VERSION --with 'sentry-sdk<3'` unless that version is already installed."""
    bin_dir = Path(subprocess.run([_uv(), "tool", "dir", "--bin"], capture_output=True, text=True,
                                  check=True).stdout.strip())
    exe = bin_dir / "label-studio"
    listed = subprocess.run([_uv(), "tool", "list"], capture_output=True, text=True).stdout
    if not exe.exists() or f"label-studio v{version}" not in listed:
        subprocess.run([_uv(), "tool", "install", "--force", f"label-studio=={version}", "--with", SENTRY_PIN],
                       check=True, capture_output=True)
    return exe


@dataclass
class LocalLabelStudio:
    url: str
    token: str
    process: subprocess.Popen
    log_path: Path
    password: str = ""  # the admin's (ADMIN_EMAIL), made for this launch: log in with it in a browser

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_label_studio(data_dir: Path, port: int | None = None, timeout: float = 240.0,
                       extra_env: dict[str, str] | None = None) -> LocalLabelStudio:
    """`extra_env`: Label Studio settings or feature flags for this launch (e.g. MEMORY_EFFICIENT_IMPORT_FLAG)."""
    exe = label_studio_executable()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    # made per launch, never shipped: a Label Studio started here is reachable by anything on this machine
    password, token = secrets.token_urlsafe(16), secrets.token_hex(20)
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": ADMIN_EMAIL,
        "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_HOST": url,
        # 1.23 refuses ML backends on loopback unless both are off
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "SENTRY_DSN": "",  # no error reports from a local test server (and no crash under sentry-sdk 3.x)
        "FRONTEND_SENTRY_DSN": "",
    }
    for leak in ("VIRTUAL_ENV", "PYTHONPATH", "UV_PROJECT_ENVIRONMENT"):
        env.pop(leak, None)
    env.update(extra_env or {})
    log_path = data_dir / "label-studio.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Label Studio exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                httpx.get(f"{url}/api/projects", headers={"Authorization": f"Token {token}"},
                          timeout=10).raise_for_status()
                return LocalLabelStudio(url, token, proc, log_path, password)
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"Label Studio did not answer /health within {timeout:.0f} s; see {log_path}")


MAX_FILES_PER_REQUEST = 100  # Django's DATA_UPLOAD_MAX_NUMBER_FILES: more gives a 500 (TooManyFilesSent)


def upload_images(url: str, token: str, project: int, files: dict[str, bytes]) -> None:
    """Each file becomes a task (`data.image` = /data/upload/...). One form field per file: LS reads a dict."""
    items = list(files.items())
    for start in range(0, len(items), MAX_FILES_PER_REQUEST):
        part = items[start : start + MAX_FILES_PER_REQUEST]
        r = httpx.post(
            f"{url}/api/projects/{project}/import",
            headers={"Authorization": f"Token {token}"},
            files=[(f"file{i}", (name, data, "image/jpeg" if name.endswith(".jpg") else "image/png"))
                   for i, (name, data) in enumerate(part)],
            timeout=120,
        )
        r.raise_for_status()
