"""Rule: one download, one image, one cache cannot take the server's time or memory.

- a download has an overall deadline, however slowly a host drips bytes;
- at most N downloads at once go to one host (Label Studio's own cap is separate);
- before any pixel is decoded, the image's pixels and the memory its mode needs (16-bit, 32-bit, RGBA…) are checked,
  an ICO's hidden images included; decoding memory across threads is bounded by one budget;
- only browser image formats are opened;
- the on-disk media cache is bounded in bytes, however many query strings spell the same image.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from backend.errors import MediaError
from backend.media.fetch import DecodeBudget, MediaFetcher, MediaSettings, decode_image


def test_a_dripping_host_is_cut_at_the_deadline(servers):
    _, other, _ = servers
    other.drip("/slow.png", every=0.3)
    fetcher = MediaFetcher(MediaSettings(allowed_hosts=frozenset({"127.0.0.2"}), download_deadline_s=1.5))
    started = time.monotonic()
    with pytest.raises(MediaError, match="longer than 1.5 s"):
        fetcher.load(f"{other.url}/slow.png")
    assert time.monotonic() - started < 4


def test_a_request_deadline_shortens_the_download(servers):
    _, other, _ = servers
    other.drip("/slow.png", every=0.3)
    fetcher = MediaFetcher(MediaSettings(allowed_hosts=frozenset({"127.0.0.2"})))
    started = time.monotonic()
    with pytest.raises(MediaError):
        fetcher.load(f"{other.url}/slow.png", deadline=time.monotonic() + 1)
    assert time.monotonic() - started < 3


def test_downloads_per_host_are_capped(servers):
    _, other, _ = servers
    other.drip("/slow.png", every=0.2, total=6)
    fetcher = MediaFetcher(MediaSettings(allowed_hosts=frozenset({"127.0.0.2"}), max_downloads_per_host=2,
                                         download_deadline_s=10))
    errors = []

    def one(i):
        try:
            fetcher.load(f"{other.url}/slow.png?{i}")
        except MediaError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert other.peak == 2 and len(other.requests) == 6  # all six served, never more than two at once
    assert len(errors) == 6  # (the drip is not an image)


def _png16(width: int, height: int) -> bytes:
    grey = np.zeros((height, width), dtype=np.uint16)
    grey[:, ::7] = 60000
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def test_sixteen_bit_images_decode_within_their_budget(tmp_path):
    """A small 16-bit PNG: its peak memory while decoding stays near what the pixels need (it was 8 bytes a pixel,
    several times over). Measured in a fresh process."""
    data = _png16(4000, 4000)  # 16 MP; a few hundred KB on disk
    path = tmp_path / "g16.png"
    path.write_bytes(data)
    code = ("import resource, sys; from pathlib import Path; from backend.media.fetch import decode_image;"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            "img = decode_image(Path(sys.argv[1]).read_bytes(), 'g16.png', 80_000_000);"
            "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            "print(img.mode, img.size, (after - before) // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    mode, *_, grew_mb = out.split()
    assert mode == "RGB"
    assert int(grew_mb) < 200, out  # 16 MP: ~32 MB 16-bit + 16 MB 8-bit + 64 MB RGB; the float64 path took 500+


@pytest.mark.parametrize("mode, shape, dtype", [("I;16", (3000, 3000), np.uint16), ("I", (3000, 3000), np.int32),
                                                 ("F", (3000, 3000), np.float32), ("RGBA", (3000, 3000), np.uint8)])
def test_decode_memory_is_checked_before_decoding(mode, shape, dtype):
    arr = np.zeros(shape + ((4,) if mode == "RGBA" else ()), dtype=dtype)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF" if mode in ("I", "F") else "PNG")
    data = buf.getvalue()
    with pytest.raises(MediaError, match="MiB to decode"):
        decode_image(data, "x", 80_000_000, max_bytes=9_000_000 * 3)  # 3 bytes a pixel: under what any of them needs
    assert decode_image(data, "x", 80_000_000, max_bytes=9_000_000 * 12).size == (3000, 3000)


def _ico_hiding(png_bytes: bytes, declared: int = 0) -> bytes:
    """An ICO whose directory says 256x256 (0) and whose one entry is `png_bytes`."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", declared, declared, 0, 0, 1, 32, len(png_bytes), 6 + 16)
    return header + entry + png_bytes


def _big_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = zlib.compress(b"".join(b"\x00" + b"\x00" * (width * 3) for _ in range(height)), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_an_ico_hiding_a_large_image_is_refused_before_decoding():
    data = _ico_hiding(_big_png(3000, 2000))  # 6 MP behind a 256x256 directory entry
    started = time.monotonic()
    with pytest.raises(MediaError, match="ICO"):
        decode_image(data, "favicon.ico", max_pixels=1_000_000)
    assert time.monotonic() - started < 0.5
    small = _ico_hiding(_big_png(64, 64), declared=64)
    assert decode_image(small, "ok.ico", max_pixels=1_000_000).size == (64, 64)


def test_an_ico_bmp_entry_that_lies_about_its_size_is_refused():
    dib = struct.pack("<IiiHHIIiiII", 40, 30000, 60000, 1, 32, 0, 0, 0, 0, 0, 0)  # a 30000x30000 BMP frame
    with pytest.raises(MediaError, match="ICO"):
        decode_image(_ico_hiding(dib + b"\x00" * 64, declared=16), "bmp.ico", max_pixels=80_000_000)


def test_only_browser_formats_are_opened():
    for fmt in ("EPS", "PPM", "PCX", "SGI", "TGA", "IM", "DDS"):
        buf = io.BytesIO()
        try:
            Image.new("RGB", (8, 8)).save(buf, format=fmt)
        except (KeyError, OSError):
            continue
        with pytest.raises(MediaError, match="not an image"):
            decode_image(buf.getvalue(), f"x.{fmt.lower()}", 1_000_000)


def test_a_multi_frame_image_decodes_its_first_frame_only():
    frames = [Image.new("P", (64, 64), i) for i in range(300)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    started = time.monotonic()
    assert decode_image(buf.getvalue(), "anim.gif", 1_000_000).size == (64, 64)
    assert time.monotonic() - started < 1


def test_the_decode_budget_is_shared_and_waits_then_refuses():
    budget = DecodeBudget(100)
    with budget.reserve(80, 1, "a"):
        started = time.monotonic()
        with pytest.raises(MediaError, match="at once"):
            with budget.reserve(50, 0.3, "b"):
                pass
        assert 0.25 < time.monotonic() - started < 2
    with budget.reserve(100, 0.1, "c"):
        assert budget.used == 100
    assert budget.used == 0


def test_the_media_cache_is_bounded_whatever_the_query_string(servers, tmp_path):
    _, other, _ = servers
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    body = buf.getvalue()

    def serve(req):
        req.send_response(200)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    other.routes["/img.png"] = serve
    cache = tmp_path / "cache"
    fetcher = MediaFetcher(MediaSettings(allowed_hosts=frozenset({"127.0.0.2"}), cache_dir=cache,
                                         max_cache_bytes=len(body) * 5))
    for i in range(30):
        fetcher.load(f"{other.url}/img.png?v={i}")
    stored = sum(p.stat().st_size for p in cache.iterdir())
    assert stored <= len(body) * 5
    assert fetcher.load(f"{other.url}/img.png?v=29").size == (64, 64)  # the newest are kept
    # the same URL spelt with a different case of host or default port is one entry
    before = len(other.requests)
    fetcher.load(f"HTTP://127.0.0.2:{other.port}/img.png?v=29")
    assert len(other.requests) == before
