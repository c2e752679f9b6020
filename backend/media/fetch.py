"""Fetch and decode task images the way the annotator sees them.

Handles Label Studio uploads (`/data/upload/...`), local files (`/data/local-files/?d=...`, read from
disk when LOCAL_FILES_DOCUMENT_ROOT is shared), cloud URIs (resolved through Label Studio) and http(s)
URLs. Every request goes through one policy (backend/media/policy.py): credentials only to the Label Studio
origin, other hosts only when allowed, redirects followed by hand and re-checked, the address pinned.
Downloads have an overall deadline, a per-host concurrency cap and a size cap; the disk cache is bounded;
decoding is refused before it starts when the image's pixels or memory would pass their budgets.
Any failure is a MediaError for that one task.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import math
import os
import stat
import struct
import sys
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.errors import MediaError
from backend.media.ls_auth import LabelStudioAuth
from backend.media.policy import MAX_REDIRECTS, UrlPolicy, check_text

log = logging.getLogger("tandem.media")

CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")
# What a browser shows in Label Studio's image tag, and what Tandem decodes; EPS, PSD, ICNS, FITS and the
# other formats PIL knows are refused (some run external programs or hold many images)
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "ICO", "AVIF")
INVALID_TASK_PREFIX = "tandem-invalid-task:"  # written by the protocol layer for a task it could not read
MAX_TASK_ID = 2**63 - 1


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied; smaller than the file when decoded for a small model input
    source: str
    original_size: tuple[int, int] | None = None  # (w, h) of the whole image when `image` was decoded smaller

    @property
    def size(self) -> tuple[int, int]:
        """The whole image's size, oriented: what Label Studio's results are relative to."""
        return self.original_size or self.image.size

    @property
    def scale(self) -> tuple[float, float]:
        """Pixels of the whole image per pixel of `image`, (x, y): 1.0 unless decoded smaller."""
        (w, h), (dw, dh) = self.size, self.image.size
        return w / dw, h / dh


@dataclass
class MediaSettings:
    label_studio_url: str | None = None
    api_key: str | None = None
    cache_dir: Path | None = None
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)  # "*" allows any public host
    local_files_root: Path | None = None
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 80_000_000
    timeout: float = 30.0  # per connect / read
    download_deadline_s: float = 20.0  # a whole download, redirects included
    max_downloads_per_host: int = 4  # at once, per origin other than Label Studio's
    max_label_studio_downloads: int = 16  # at once, from the Label Studio origin
    max_decode_bytes: int = 1024 * 1024 * 1024  # memory one image may take to decode
    max_decode_bytes_total: int = 2 * 1024 * 1024 * 1024  # memory all images decoding at once may take
    max_cache_bytes: int = 2 * 1024 * 1024 * 1024  # the on-disk media cache; oldest files go first
    reduced_decode: bool = True  # a JPEG whose model input is far smaller decodes at 1/2, 1/4 or 1/8 (see decode_image)


class DecodeBudget:
    """Memory for decoding shared by every fetcher of the process: a decode waits for its share or fails."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, amount: int, timeout: float, what: str):
        amount = min(amount, self.capacity)
        end = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while self.used + amount > self.capacity:
                left = end - time.monotonic()
                if left <= 0:
                    raise MediaError(f"{what}: too many large images are being decoded at once; try again")
                self._cond.wait(left)
            self.used += amount
        try:
            yield
        finally:
            with self._cond:
                self.used -= amount
                self._cond.notify_all()


class HostSlots:
    """At most `limit` downloads at once per origin, process-wide; bounded in the number of origins it holds."""

    def __init__(self, max_origins: int = 1024) -> None:
        self._slots: OrderedDict[tuple[str, int], list] = OrderedDict()  # key -> [in use, condition]
        self._lock = threading.Lock()
        self._max = max_origins

    @contextmanager
    def hold(self, origin: str, limit: int, timeout: float):
        key = (origin, limit)
        with self._lock:
            entry = self._slots.get(key)
            if entry is None:
                entry = self._slots[key] = [0, threading.Condition(self._lock)]
                for old in list(self._slots):  # forget idle origins beyond the bound
                    if len(self._slots) <= self._max:
                        break
                    if self._slots[old][0] == 0 and old != key:
                        del self._slots[old]
            self._slots.move_to_end(key)
            end = time.monotonic() + max(0.0, timeout)
            while entry[0] >= limit:
                left = end - time.monotonic()
                if left <= 0:
                    raise MediaError(f"{origin} already has {limit} downloads in progress; its images wait their turn "
                                     "and this one ran out of time")
                entry[1].wait(left)
            entry[0] += 1
        try:
            yield
        finally:
            with self._lock:
                entry[0] -= 1
                entry[1].notify()


_BUDGETS: dict[int, DecodeBudget] = {}
_BUDGETS_LOCK = threading.Lock()
HOST_SLOTS = HostSlots()


def decode_budget(capacity: int) -> DecodeBudget:
    with _BUDGETS_LOCK:
        return _BUDGETS.setdefault(capacity, DecodeBudget(capacity))


class MediaCache:
    """Downloaded bytes on disk, bounded in total size: the least recently used files are removed first."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.total = sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())

    def path(self, key: str) -> Path:
        return self.folder / hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, key: str) -> bytes | None:
        path = self.path(key)
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used
        except OSError:
            return None
        return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        path = self.path(key)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            old = path.stat().st_size if path.exists() else 0
            os.replace(tmp, path)
        except OSError as exc:  # a full disk costs the cache, never the prediction
            log.warning("media cache: cannot write %s: %s", path.name, exc)
            return
        with self._lock:
            self.total += len(data) - old
            if self.total > self.max_bytes:
                self._evict()

    def _evict(self) -> None:
        files = []
        for p in self.folder.iterdir():
            try:
                if p.is_file() and not p.name.startswith(".tmp-"):
                    files.append((p.stat().st_mtime, p.stat().st_size, p))
            except OSError:
                continue
        files.sort()
        total = sum(size for _, size, _ in files)
        target = int(self.max_bytes * 0.9)
        for _, size, p in files:
            if total <= target:
                break
            try:
                p.unlink()
                total -= size
            except OSError:
                continue
        self.total = total


class MediaFetcher:
    def __init__(self, settings: MediaSettings, policy: UrlPolicy | None = None) -> None:
        self.settings = settings
        self.policy = policy or UrlPolicy(settings.label_studio_url, settings.allowed_hosts)
        base = settings.label_studio_url.rstrip("/") if settings.label_studio_url else None
        self._base = base
        self._auth = LabelStudioAuth(base, settings.api_key) if base and settings.api_key else None
        self._client = httpx.Client(timeout=settings.timeout, follow_redirects=False, trust_env=False)
        self._local_root = Path(settings.local_files_root).resolve() if settings.local_files_root else None
        self._cache = MediaCache(Path(settings.cache_dir), settings.max_cache_bytes) if settings.cache_dir else None
        self._budget = decode_budget(settings.max_decode_bytes_total)

    def close(self) -> None:
        self._client.close()

    # -- public -------------------------------------------------------------------------------------
    def load(self, url: str, task_id: int | None = None, deadline: float | None = None,
             min_side: int | None = None) -> LoadedImage:
        """The task's image, or a MediaError saying why not: nothing else escapes (one task, one error).

        `deadline` (a time.monotonic() value) shortens the download deadline, e.g. to a request's budget.
        `min_side`: the model resizes the image so its longer side is this; a JPEG at least twice as large may
        then be decoded smaller (`LoadedImage.scale` says by how much). None: the whole image.
        """
        return self._load(url, task_id, deadline, decode=True, min_side=min_side)  # type: ignore[return-value]

    def load_bytes(self, url: str, task_id: int | None = None, deadline: float | None = None) -> bytes:
        """The task's encoded image, checked and fetched as `load` does but not decoded (a GPU decodes it)."""
        return self._load(url, task_id, deadline, decode=False)  # type: ignore[return-value]

    def _load(self, url: str, task_id: int | None, deadline: float | None, decode: bool,
              min_side: int | None = None) -> LoadedImage | bytes:
        own = time.monotonic() + self.settings.download_deadline_s
        deadline = own if deadline is None else min(deadline, own)
        if isinstance(url, str) and url.startswith(INVALID_TASK_PREFIX):
            raise MediaError(url[len(INVALID_TASK_PREFIX):])
        if not isinstance(url, str) or not url.strip():
            raise MediaError("the task has no image URL in its data")
        try:
            url = check_text(url.strip())
            data = self._read_bytes(url, task_id, deadline)
            if not decode:
                return data
            image, size = self._decode(data, url, deadline, min_side if self.settings.reduced_decode else None)
            return LoadedImage(image=image, source=url, original_size=size if size != image.size else None)
        except MediaError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a hostile URL or file provokes stays this task's
            log.warning("image %r: unexpected %s", url[:200], type(exc).__name__, exc_info=True)
            raise MediaError(f"image {url[:200]!r} could not be loaded: {type(exc).__name__}: {exc}") from exc

    # -- bytes --------------------------------------------------------------------------------------
    def _read_bytes(self, url: str, task_id: int | None, deadline: float) -> bytes:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise MediaError(f"cannot resolve {url}: cloud URIs need the task id")
            if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 <= task_id <= MAX_TASK_ID:
                raise MediaError(f"cannot resolve {url}: the task id {str(task_id)[:40]!r} is not an integer id")
            encoded = base64.urlsafe_b64encode(url.encode()).decode()
            return self._cached(url, lambda: self._download(f"/tasks/{task_id}/resolve/?fileuri={encoded}", deadline))
        if url.startswith("/") and self.settings.local_files_root:
            parts = urlsplit(url)
            if parts.path.startswith("/data/local-files"):
                return self._read_local(parse_qs(parts.query).get("d", [""])[0])
        if scheme in ("http", "https") or url.startswith("/"):
            return self._cached(self._cache_key(url), lambda: self._download(url, deadline))
        raise MediaError(f"unsupported image URL {url[:200]!r}: expected http(s), /data/upload, /data/local-files "
                         "or s3/gs")

    def _read_local(self, relative: str) -> bytes:
        root = self._local_root
        name = unquote(relative)
        if "\x00" in name or len(name) > 4096:
            raise MediaError(f"refusing local file name {name[:100]!r}: it holds a NUL byte or is too long")
        target = (root / name).resolve()  # symlinks too: a link may not lead out of the root
        if not target.is_relative_to(root):
            raise MediaError(f"refusing local file outside LOCAL_FILES_DOCUMENT_ROOT: {relative[:200]!r}")
        try:  # one open and one fstat, not a stat per check; O_NONBLOCK: a FIFO here must not hang the server
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise MediaError(f"local file not found: {relative[:200]!r}") from exc
        except OSError as exc:
            raise MediaError(f"cannot read local file {relative[:200]!r}: {exc.strerror}") from exc
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > self.settings.max_bytes:
            os.close(fd)
            if not stat.S_ISREG(info.st_mode):
                raise MediaError(f"local file not found: {relative[:200]!r}")
            raise MediaError(f"image {relative[:200]!r} is larger than {self.settings.max_bytes} bytes")
        with os.fdopen(fd, "rb") as fh:
            return fh.read(self.settings.max_bytes + 1)[: self.settings.max_bytes]

    def _cache_key(self, url: str) -> str:
        """The absolute URL, with the origin lower-cased and default ports dropped."""
        try:
            return str(httpx.URL(self.policy.absolute(url)))
        except (httpx.InvalidURL, ValueError):
            return url

    def _cached(self, key: str, fetch) -> bytes:
        if self._cache is None:
            return fetch()
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        data = fetch()
        self._cache.put(key, data)
        return data

    def _download(self, url: str, deadline: float) -> bytes:
        """Follow redirects by hand: every hop is checked by the policy; credentials only to Label Studio."""
        current = self.policy.absolute(url)
        by_label_studio = False
        for _hop in range(MAX_REDIRECTS + 1):
            target = self.policy.check(current, redirected_by_label_studio=by_label_studio)
            limit = self.settings.max_label_studio_downloads if target.label_studio else self.settings.max_downloads_per_host
            with HOST_SLOTS.hold(str(target.origin), limit, deadline - time.monotonic()):
                outcome = self._get(target, url, deadline)
            if isinstance(outcome, bytes):
                return outcome
            current, by_label_studio = outcome, target.label_studio
        raise MediaError(f"image {url[:200]} could not be downloaded: more than {MAX_REDIRECTS} redirects")

    def _get(self, target, url: str, deadline: float) -> bytes | str:
        """The body, or the next URL when the answer is a redirect."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise MediaError(f"image {url[:200]} took longer than {self.settings.download_deadline_s:g} s to download")
        auth = self._auth if target.label_studio and self._auth is not None else None
        timeout = httpx.Timeout(min(self.settings.timeout, left))
        request = self._client.build_request("GET", target.connect_url, headers=target.headers(), timeout=timeout,
                                             extensions=target.extensions())
        try:
            resp = self._client.send(request, stream=True, auth=auth, follow_redirects=False)
        except httpx.HTTPError as exc:
            who = (f" (Label Studio at {self._base} did not answer: is it running?)"
                   if target.label_studio and self._base and isinstance(exc, httpx.ConnectError) else "")
            raise MediaError(f"image {url[:200]} could not be downloaded: {type(exc).__name__}: {exc}{who}") from exc
        try:
            if resp.is_redirect:
                location = resp.headers.get("location")
                if not location:
                    raise MediaError(f"image {url[:200]}: HTTP {resp.status_code} without a Location")
                return self.policy.join(target.url, location)
            if resp.status_code == 401:
                what = ("refused LABEL_STUDIO_API_KEY: set it to" if self._auth is not None else
                        "needs LABEL_STUDIO_API_KEY: set it to")
                raise MediaError(
                    f"Label Studio answered 401 for {url[:200]}: it {what} a personal access token of this Label "
                    "Studio (or a legacy token where the organisation allows them)"
                )
            if resp.status_code >= 400:
                hint = ""
                if resp.status_code in (403, 404) and "/data/local-files" in url:
                    hint = (" (a local file: give this server LOCAL_FILES_DOCUMENT_ROOT, the folder Label Studio "
                            "serves them from, and it reads them from disk; every replica needs it)")
                raise MediaError(f"image {url[:200]} could not be downloaded: HTTP {resp.status_code}{hint}")
            try:
                declared = int(resp.headers.get("content-length") or 0)
            except ValueError:
                declared = 0
            if declared > self.settings.max_bytes:
                raise MediaError(f"image {url[:200]} is {declared} bytes, over the {self.settings.max_bytes} limit")
            chunks, total = [], 0
            for chunk in resp.iter_bytes():
                total += len(chunk)
                if total > self.settings.max_bytes:
                    raise MediaError(f"image {url[:200]} is over the {self.settings.max_bytes}-byte limit")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise MediaError(f"image {url[:200]} took longer than {self.settings.download_deadline_s:g} s "
                                     "to download")
            return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise MediaError(f"image {url[:200]} could not be downloaded: {type(exc).__name__}: {exc}") from exc
        finally:
            resp.close()

    # -- decoding -----------------------------------------------------------------------------------
    def _decode(self, data: bytes, url: str, deadline: float | None = None,
                min_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
        left = 30.0 if deadline is None else max(0.0, deadline - time.monotonic())
        return decode_sized(data, url, self.settings.max_pixels, self.settings.max_decode_bytes, self._budget,
                            max(left, 1.0), min_side)


_CHUNK_PIXELS = 1 << 20


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit) grey as a browser shows it, the top 8 bits; PIL's convert clips it to white.

    Converted a band of rows at a time in float32: a copy of the whole image in float64 cost 8 bytes a pixel
    several times over (a 154 KB 16-bit PNG took 2 GB).
    """
    width, height = img.size
    rows = max(1, _CHUNK_PIXELS // max(width, 1))
    bands = [(top, min(height, top + rows)) for top in range(0, height, rows)]
    scale = 1.0 / 257.0
    if img.mode == "F":
        peak = -np.inf
        for top, bottom in bands:
            part = np.asarray(img.crop((0, top, width, bottom)), dtype=np.float32)
            if part.size and not np.isnan(part).all():
                peak = max(peak, float(np.nanmax(part)))
        scale = 255.0 if peak <= 1.0 else 1.0
    out = np.empty((height, width), dtype=np.uint8)
    for top, bottom in bands:
        part = np.asarray(img.crop((0, top, width, bottom)), dtype=np.float32) * np.float32(scale)
        np.nan_to_num(part, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        np.clip(part, 0, 255, out=part)
        np.rint(part, out=part)
        out[top:bottom] = part.astype(np.uint8)
    return Image.fromarray(out)


def _bytes_per_pixel(mode: str) -> int:
    """What PIL holds per pixel in memory (RGB is stored in 4 bytes)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16") or mode in ("BGR;15", "BGR;16"):
        return 2
    return 4


def decode_cost(mode: str, width: int, height: int, rotated: bool = False) -> int:
    """Bytes a decode of one frame takes at its peak: the frame, the 8-bit copy of a 16/32-bit frame, the RGB
    result, and a transposed copy when EXIF rotates it."""
    pixels = width * height
    cost = pixels * _bytes_per_pixel(mode)
    if mode.startswith("I") or mode == "F":
        cost += pixels + _CHUNK_PIXELS * 8  # the 8-bit image and one float32 band
    if mode != "RGB":
        cost += pixels * 4
    if rotated:
        cost += pixels * 4
    return cost


def _png_header(blob: bytes) -> tuple[int, int, str] | None:
    if blob[:8] != b"\x89PNG\r\n\x1a\n" or len(blob) < 26:
        return None
    width, height, depth, colour = struct.unpack(">IIBB", blob[16:26])
    mode = "I;16" if depth == 16 and colour in (0, 4) else ("RGBA" if colour in (4, 6) or depth == 16 else "RGB")
    return width, height, mode


ICO_MAGIC = b"\x00\x00\x01\x00"


def _check_ico(data: bytes, url: str, max_pixels: int, max_bytes: int) -> None:
    """An ICO is a directory of images, and PIL decodes one as it opens the file: each image is sized here from
    its own header, not from the directory (which says at most 256x256), before PIL sees the bytes — a 169 MP
    PNG can hide behind a 256x256 entry."""
    count = struct.unpack("<H", data[4:6])[0] if len(data) >= 6 else 0
    if count == 0 or len(data) < 6 + 16 * count:
        raise MediaError(f"image {url[:200]} is a truncated ICO")
    for i in range(count):
        entry = data[6 + 16 * i: 22 + 16 * i]
        declared_w, declared_h = entry[0] or 256, entry[1] or 256
        offset = struct.unpack("<I", entry[12:16])[0]
        blob = data[offset: offset + 32]
        png = _png_header(blob)
        if png is not None:
            width, height, mode = png
        elif len(blob) >= 16:
            width, height = struct.unpack("<ii", blob[4:12])
            width, height = abs(width), abs(height) // 2  # the AND mask doubles a BMP frame's height
            mode = "RGBA"
        else:
            raise MediaError(f"image {url[:200]} is a truncated ICO")
        if width > declared_w or height > declared_h:
            raise MediaError(f"image {url[:200]} is an ICO whose {declared_w}x{declared_h} entry holds a "
                             f"{width}x{height} image; refused")
        if width * height > max_pixels or decode_cost(mode, width, height) > max_bytes:
            raise MediaError(f"image {url[:200]} is an ICO holding a {width}x{height} image, over the limits")


def _orientation(img: Image.Image) -> int:
    """EXIF orientation: 1 as stored, 2-4 mirrored or upside down, 5-8 a quarter turn (the sides swap)."""
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is the decoder's problem, reported below
        return 1


def decode_image(
    data: bytes,
    url: str,
    max_pixels: int,
    max_bytes: int | None = None,
    budget: DecodeBudget | None = None,
    wait_s: float = 30.0,
) -> Image.Image:
    """RGB with EXIF orientation applied, or a MediaError naming the image.

    Only browser formats are opened; the first frame of a multi-frame image is the one decoded. Before any pixel
    is decoded, the size is checked against `max_pixels` and the memory the decode will take (by mode: 16-bit,
    32-bit, palette…) against `max_bytes`; then that memory is reserved from the process-wide `budget`.
    Transposes in place and converts only images not already RGB.
    """
    return decode_sized(data, url, max_pixels, max_bytes, budget, wait_s)[0]


def _draft_request(width: int, height: int, min_side: int) -> tuple[int, int]:
    """The smallest size whose longer side is still `min_side`, in the image's proportions."""
    s = min_side / max(width, height)
    return max(1, math.ceil(width * s)), max(1, math.ceil(height * s))


def decode_sized(
    data: bytes,
    url: str,
    max_pixels: int,
    max_bytes: int | None = None,
    budget: DecodeBudget | None = None,
    wait_s: float = 30.0,
    min_side: int | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """`decode_image`, and the whole image's oriented size. With `min_side`, a JPEG at least twice that size
    is decoded at the largest of 1/2, 1/4, 1/8 scale that keeps its longer side ≥ `min_side` (libjpeg's DCT
    scaling: several times faster and smaller than decoding every pixel and resizing afterwards, which a model
    at 160 or 640 pixels does anyway). Other formats decode whole."""
    max_bytes = max_bytes if max_bytes is not None else max_pixels * 12
    try:
        with warnings.catch_warnings():
            # PIL warns from 89.5 MP on; the limit below is ours and says so (open reads only the header)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.init()
            if data[:4] == ICO_MAGIC:  # PIL decodes an ICO's image while opening it: check it first
                _check_ico(data, url, max_pixels, max_bytes)
            img = _pil_open()(io.BytesIO(data), formats=[f for f in IMAGE_FORMATS if f in Image.OPEN])
            width, height = img.size
            if width * height > max_pixels:
                raise MediaError(f"image {url} is {width}x{height} pixels, over the {max_pixels}-pixel limit")
            if min_side and img.format == "JPEG" and max(width, height) >= 2 * min_side:
                img.draft("RGB", _draft_request(width, height, min_side))
            declared = img.size  # the header's size, or the reduced one the draft chose
            orientation = _orientation(img)
            cost = decode_cost(img.mode, *declared, orientation in range(2, 9))
            if cost > max_bytes:
                raise MediaError(f"image {url} ({width}x{height}, mode {img.mode}) would take {cost >> 20} MiB to "
                                 f"decode, over the {max_bytes >> 20} MiB limit")
            with budget.reserve(cost, wait_s, f"image {url}") if budget is not None else _nothing():
                img.load()
                if img.size != declared:  # a container whose frame differs from its header
                    raise MediaError(f"image {url} decoded to {img.size}, not the {declared[0]}x{declared[1]} it "
                                     "declared")
                ImageOps.exif_transpose(img, in_place=True)
                if img.mode.startswith("I") or img.mode == "F":
                    img = _to_8bit(img)
                whole = (height, width) if orientation in range(5, 9) else (width, height)  # a quarter turn swaps
                return (img if img.mode == "RGB" else img.convert("RGB")), whole
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:  # over twice PIL's limit: refused before our check could run
        raise MediaError(f"image {url} is over the {max_pixels}-pixel limit (its header claims more than "
                         "twice PIL's own limit, so not even its size was read)") from exc
    except UnidentifiedImageError as exc:  # its message names a BytesIO object, which says nothing
        raise MediaError(f"image {url} is corrupt or not an image (no image format recognises its "
                         f"{len(data)} bytes; Tandem reads {', '.join(IMAGE_FORMATS)})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"image {url} is corrupt or not an image: {exc}") from exc
    except MemoryError as exc:
        raise MediaError(f"image {url} ran out of memory while decoding") from exc
    except Exception as exc:  # noqa: BLE001 - decoder plugins (ultralytics patches Image.open) raise anything
        raise MediaError(f"image {url} could not be decoded: {type(exc).__name__}: {exc}") from exc


def _pil_open():
    """PIL's own Image.open: ultralytics' patch of it installs a package when PIL does not know an image, which
    a hostile file must not be able to start."""
    patches = sys.modules.get("ultralytics.utils.patches")
    return getattr(patches, "_image_open", None) or Image.open


@contextmanager
def _nothing():
    yield
