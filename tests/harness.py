"""Helpers for the tests; the Label Studio launcher and the server thread are the product's own (the demo uses them)."""

from __future__ import annotations

import io
import time

from PIL import Image

from backend.dev.local_label_studio import free_port, start_label_studio  # noqa: F401 - the demo uses them too
from backend.dev.server_thread import ServerThread  # noqa: F401


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def until(check, timeout: float = 15.0) -> bool:
    """Poll `check` every 0.1 s until it is true or `timeout` passes; its last answer."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return check()
