"""Helpers for the tests; the Label Studio launcher and the server thread are the product's own (the demo uses them)."""

from __future__ import annotations

import io

from PIL import Image

from backend.dev.local_label_studio import free_port, start_label_studio  # noqa: F401 - the demo uses them too
from backend.dev.server_thread import ServerThread  # noqa: F401


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
