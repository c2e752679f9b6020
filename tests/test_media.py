import io
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from backend.errors import MediaError
from backend.media.fetch import MediaFetcher, MediaSettings


def exif_rotated_jpeg_bytes(displayed: Image.Image) -> bytes:
    """Store `displayed` rotated, with EXIF orientation 6, so a viewer shows `displayed` again."""
    raw = displayed.transpose(Image.Transpose.ROTATE_90)  # undo the 90° clockwise a viewer applies
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    raw.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


@pytest.fixture()
def served_dir(tmp_path):
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_exif_orientation_is_applied(tmp_path):
    displayed = Image.new("RGB", (200, 100), "white")
    displayed.paste((255, 0, 0), (150, 0, 200, 30))  # a red block at the top-right as the annotator sees it
    (tmp_path / "rot.jpg").write_bytes(exif_rotated_jpeg_bytes(displayed))
    fetcher = MediaFetcher(MediaSettings(local_files_root=tmp_path))
    loaded = fetcher.load("/data/local-files/?d=rot.jpg")
    assert loaded.size == (200, 100)
    arr = np.asarray(loaded.image)
    assert arr[10:20, 160:190, 0].mean() > 200 and arr[10:20, 160:190, 1].mean() < 60
    assert arr[60:90, 10:40].mean() > 200  # bottom-left stays white


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_every_image_mode_decodes_to_rgb(tmp_path, mode):
    source = Image.new("I;16", (40, 30), 20000) if mode == "I;16" else Image.new("RGB", (40, 30), (200, 40, 40)).convert(mode)
    name = "img.jpg" if mode == "CMYK" else "img.png"
    source.save(tmp_path / name)
    loaded = MediaFetcher(MediaSettings(local_files_root=tmp_path)).load(f"/data/local-files/?d={name}")
    assert loaded.image.mode == "RGB" and loaded.size == (40, 30)
    if mode == "I;16":  # as a browser shows it (the top 8 bits), not clipped to white
        assert np.asarray(loaded.image).min() == np.asarray(loaded.image).max() == round(20000 / 257)


def test_sixteen_bit_grey_keeps_its_shapes(tmp_path):
    grey = np.full((30, 40), 60000, dtype=np.uint16)
    grey[10:20, 10:20] = 5000  # a dark square on a light ground
    Image.fromarray(grey).save(tmp_path / "g16.png")
    arr = np.asarray(MediaFetcher(MediaSettings(local_files_root=tmp_path)).load("/data/local-files/?d=g16.png").image)
    assert arr[12:18, 12:18].max() < 30 and arr[:5].min() > 220


def test_local_files_path_traversal_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    fetcher = MediaFetcher(MediaSettings(local_files_root=root))
    with pytest.raises(MediaError, match="outside LOCAL_FILES_DOCUMENT_ROOT"):
        fetcher.load("/data/local-files/?d=../secret.png")
    with pytest.raises(MediaError, match="outside"):
        fetcher.load("/data/local-files/?d=%2E%2E%2Fsecret.png")


def test_local_files_that_are_not_files_are_refused_without_hanging(tmp_path):
    """A directory, a symlink out of the root, a FIFO (opening one for reading would block forever) and a
    file over the size limit each get a clear error."""
    import os

    root = tmp_path / "root"
    (root / "a_dir").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    os.mkfifo(root / "pipe.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "big.png")
    fetcher = MediaFetcher(MediaSettings(local_files_root=root, max_bytes=100))
    for name, message in [("a_dir", "not found"), ("link.png", "outside"), ("pipe.png", "not found"),
                          ("missing.png", "not found"), ("a_dir/x.png", "not found"), ("big.png", "larger than")]:
        with pytest.raises(MediaError, match=message):
            fetcher.load(f"/data/local-files/?d={name}")


def test_corrupt_and_non_image(served_dir):
    root, base = served_dir
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "text.png").write_text("hello")
    fetcher = MediaFetcher(MediaSettings(label_studio_url=base, api_key="k"))
    for name in ("bad.jpg", "text.png"):
        with pytest.raises(MediaError, match="corrupt or not an image") as caught:
            fetcher.load(f"{base}/{name}")
        assert name in str(caught.value) and "BytesIO" not in str(caught.value)  # names the image, not a buffer


def test_missing_image_is_a_clear_error(served_dir):
    _, base = served_dir
    fetcher = MediaFetcher(MediaSettings(label_studio_url=base, api_key="k"))
    with pytest.raises(MediaError, match="HTTP 404"):
        fetcher.load("/data/upload/1/missing.png")


def test_other_hosts_refused_unless_allowed(served_dir):
    root, base = served_dir
    Image.new("RGB", (8, 8)).save(root / "ok.png")
    other = base.replace("127.0.0.1", "localhost")
    strict = MediaFetcher(MediaSettings(label_studio_url="http://127.0.0.1:1", api_key="k"))
    port = other.rsplit(":", 1)[1]
    with pytest.raises(MediaError, match=rf"refusing to fetch localhost:{port}: only the configured Label Studio "
                                         rf"\(127.0.0.1:1\) is allowed \(add localhost:{port} to TANDEM_ALLOWED_HOSTS"):
        strict.load(f"{other}/ok.png")
    allowed = MediaFetcher(MediaSettings(label_studio_url="http://127.0.0.1:1", allowed_hosts=frozenset({"localhost"})))
    assert allowed.load(f"{other}/ok.png").size == (8, 8)


def test_size_and_pixel_limits(served_dir):
    root, base = served_dir
    Image.new("RGB", (400, 400)).save(root / "big.png")
    small_bytes = MediaFetcher(MediaSettings(label_studio_url=base, max_bytes=500))
    with pytest.raises(MediaError, match="limit"):
        small_bytes.load(f"{base}/big.png")
    few_pixels = MediaFetcher(MediaSettings(label_studio_url=base, max_pixels=10_000))
    with pytest.raises(MediaError, match="pixel limit"):
        few_pixels.load(f"{base}/big.png")


def test_downloads_are_cached(served_dir, tmp_path):
    root, base = served_dir
    Image.new("RGB", (10, 12)).save(root / "c.png")
    fetcher = MediaFetcher(MediaSettings(label_studio_url=base, cache_dir=tmp_path / "cache"))
    assert fetcher.load(f"{base}/c.png").size == (10, 12)
    (root / "c.png").unlink()
    assert fetcher.load(f"{base}/c.png").size == (10, 12)


def test_label_studio_path_without_url_is_explained():
    with pytest.raises(MediaError, match="LABEL_STUDIO_URL is not set"):
        MediaFetcher(MediaSettings()).load("/data/upload/1/a.png")


def test_wildcard_hosts_still_refuse_private_addresses(served_dir):
    root, base = served_dir
    Image.new("RGB", (8, 8)).save(root / "p.png")
    other = base.replace("127.0.0.1", "localhost")
    wildcard = MediaFetcher(MediaSettings(label_studio_url="http://10.255.255.1:1", allowed_hosts=frozenset({"*"})))
    with pytest.raises(MediaError, match="private, loopback or link-local"):
        wildcard.load(f"{other}/p.png")
    with pytest.raises(MediaError, match="private"):
        wildcard.load("http://169.254.169.254/latest/meta-data")  # the cloud metadata address


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels: enough for a decoder to read the size."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 20_000])  # 100 MP: past PIL's warning; 400 MP: past its hard limit
def test_huge_images_are_refused_by_our_limit_in_our_words(side):
    from backend.media.fetch import decode_image

    with pytest.raises(MediaError, match="over the 80000000-pixel limit"):
        decode_image(_png_header(side, side), "big.png", 80_000_000)


class _Refusing(SimpleHTTPRequestHandler):
    """Answers 401 under /data/upload and 403 under /data/local-files, as Label Studio does."""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(401 if self.path.startswith("/data/upload") else 403)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_what_label_studio_refused_says_what_to_set():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(MediaError, match="it refused LABEL_STUDIO_API_KEY: set it to a personal access token"):
            MediaFetcher(MediaSettings(label_studio_url=base, api_key="wrong")).load("/data/upload/1/a.png")
        with pytest.raises(MediaError, match="it needs LABEL_STUDIO_API_KEY"):
            MediaFetcher(MediaSettings(label_studio_url=base)).load("/data/upload/1/a.png")
        with pytest.raises(MediaError, match=r"HTTP 403 \(a local file: give this server LOCAL_FILES_DOCUMENT_ROOT"):
            MediaFetcher(MediaSettings(label_studio_url=base, api_key="k")).load("/data/local-files/?d=x/a.jpg")
    finally:
        server.shutdown()
        server.server_close()
    # nothing listens there any more: Label Studio is named as what did not answer
    with pytest.raises(MediaError, match=rf"Label Studio at {base} did not answer: is it running\?"):
        MediaFetcher(MediaSettings(label_studio_url=base, api_key="k")).load("/data/upload/1/a.png")
