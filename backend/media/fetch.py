"""Fetch and decode task images the way the annotator sees them.

Handles Label Studio uploads (`/data/upload/...`), local files (`/data/local-files/?d=...`, read from
disk when LOCAL_FILES_DOCUMENT_ROOT is shared), cloud URIs (resolved through Label Studio) and http(s)
URLs. Only the configured Label Studio host gets credentials; other hosts are refused unless allowed.
Downloads are size-capped while streaming, cached on disk, and decoded with EXIF orientation applied.
"""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import os
import socket
import stat
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlparse

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.errors import MediaError
from backend.media.ls_auth import LabelStudioAuth

CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    source: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


@dataclass
class MediaSettings:
    label_studio_url: str | None = None
    api_key: str | None = None
    cache_dir: Path | None = None
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)  # "*" allows any host
    local_files_root: Path | None = None
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 80_000_000
    timeout: float = 30.0


def _resolves_to_private(hostname: str) -> bool:
    try:
        infos = socket.getaddrinfo(hostname, None)
    except OSError:
        return False  # unresolvable: the download itself will fail with a clear error
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            return True
    return False


def _host(url: str) -> str:
    parsed = urlparse(url)
    return f"{parsed.hostname}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"


class MediaFetcher:
    def __init__(self, settings: MediaSettings) -> None:
        self.settings = settings
        base = settings.label_studio_url.rstrip("/") if settings.label_studio_url else None
        self._base = base
        self._auth = LabelStudioAuth(base, settings.api_key) if base and settings.api_key else None
        self._client = httpx.Client(timeout=settings.timeout, follow_redirects=True)
        self._local_root = Path(settings.local_files_root).resolve() if settings.local_files_root else None
        if settings.cache_dir:
            Path(settings.cache_dir).mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self._client.close()

    # -- public -------------------------------------------------------------------------------------
    def load(self, url: str, task_id: int | None = None) -> LoadedImage:
        if not isinstance(url, str) or not url.strip():
            raise MediaError("the task has no image URL in its data")
        data = self._read_bytes(url.strip(), task_id)
        return LoadedImage(image=self._decode(data, url), source=url)

    # -- bytes --------------------------------------------------------------------------------------
    def _read_bytes(self, url: str, task_id: int | None) -> bytes:
        parsed = urlparse(url)
        if parsed.scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise MediaError(f"cannot resolve {url}: cloud URIs need the task id")
            encoded = base64.urlsafe_b64encode(url.encode()).decode()
            return self._cached(url, lambda: self._download(f"/tasks/{task_id}/resolve/?fileuri={encoded}"))
        if parsed.path.startswith("/data/local-files") and self.settings.local_files_root:
            return self._read_local(parse_qs(parsed.query).get("d", [""])[0])
        if parsed.scheme in ("http", "https") or url.startswith("/"):
            return self._cached(url, lambda: self._download(url))
        raise MediaError(f"unsupported image URL {url!r}: expected http(s), /data/upload, /data/local-files or s3/gs")

    def _read_local(self, relative: str) -> bytes:
        root = self._local_root
        target = (root / unquote(relative)).resolve()  # symlinks too: a link may not lead out of the root
        if not target.is_relative_to(root):
            raise MediaError(f"refusing local file outside LOCAL_FILES_DOCUMENT_ROOT: {relative!r}")
        try:  # one open and one fstat, not a stat per check; O_NONBLOCK: a FIFO here must not hang the server
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise MediaError(f"local file not found: {relative!r}") from exc
        except OSError as exc:
            raise MediaError(f"cannot read local file {relative!r}: {exc.strerror}") from exc
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > self.settings.max_bytes:
            os.close(fd)
            if not stat.S_ISREG(info.st_mode):
                raise MediaError(f"local file not found: {relative!r}")
            raise MediaError(f"image {relative!r} is larger than {self.settings.max_bytes} bytes")
        with os.fdopen(fd, "rb") as fh:
            return fh.read()

    def _cached(self, key: str, fetch) -> bytes:
        if not self.settings.cache_dir:
            return fetch()
        path = Path(self.settings.cache_dir) / hashlib.sha256(key.encode()).hexdigest()
        if path.is_file():
            return path.read_bytes()
        data = fetch()
        fd, tmp = tempfile.mkstemp(dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return data

    def _absolute(self, url: str) -> tuple[str, bool]:
        """Return the absolute URL and whether Label Studio credentials go with it."""
        if url.startswith("/"):
            if not self._base:
                raise MediaError(
                    f"{url} is a Label Studio path but LABEL_STUDIO_URL is not set; set it (and LABEL_STUDIO_API_KEY)"
                )
            return urljoin(self._base + "/", url.lstrip("/")), True
        if self._base and _host(url) == _host(self._base):
            return url, True
        allowed = self.settings.allowed_hosts
        hostname = urlparse(url).hostname or ""
        if hostname in allowed or _host(url) in allowed:
            return url, False  # named explicitly: trusted, private address or not
        if "*" in allowed:
            if _resolves_to_private(hostname):
                raise MediaError(
                    f"refusing to fetch {hostname}: it resolves to a private, loopback or link-local address "
                    "(name the host in TANDEM_ALLOWED_HOSTS to permit it)"
                )
            return url, False
        raise MediaError(
            f"refusing to fetch {urlparse(url).hostname}: only the configured Label Studio is allowed "
            "(add the host to TANDEM_ALLOWED_HOSTS to permit it)"
        )

    def _download(self, url: str) -> bytes:
        absolute, with_auth = self._absolute(url)
        if with_auth and self._auth is None:
            auth = None
        else:
            auth = self._auth if with_auth else None
        try:
            with self._client.stream("GET", absolute, auth=auth) as resp:
                if resp.status_code == 401:
                    raise MediaError(
                        f"Label Studio answered 401 for {url}: set LABEL_STUDIO_API_KEY to a personal access token "
                        "(or a legacy token where the organisation allows them)"
                    )
                if resp.status_code >= 400:
                    raise MediaError(f"image {url} could not be downloaded: HTTP {resp.status_code}")
                declared = int(resp.headers.get("content-length") or 0)
                if declared > self.settings.max_bytes:
                    raise MediaError(f"image {url} is {declared} bytes, over the {self.settings.max_bytes} limit")
                chunks, total = [], 0
                for chunk in resp.iter_bytes():
                    total += len(chunk)
                    if total > self.settings.max_bytes:
                        raise MediaError(f"image {url} is over the {self.settings.max_bytes}-byte limit")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise MediaError(f"image {url} could not be downloaded: {type(exc).__name__}: {exc}") from exc

    # -- decoding -----------------------------------------------------------------------------------
    def _decode(self, data: bytes, url: str) -> Image.Image:
        return decode_image(data, url, self.settings.max_pixels)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit) grey as a browser shows it, the top 8 bits; PIL's convert clips it to white."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F" and values.size and np.nanmax(values) <= 1.0:
        values = values * 255.0
    elif img.mode != "F":
        values = values / 257.0
    return Image.fromarray(np.nan_to_num(values).clip(0, 255).round().astype(np.uint8))


def decode_image(data: bytes, url: str, max_pixels: int) -> Image.Image:
    """RGB with EXIF orientation applied, or a MediaError naming the image.

    Transposes in place and converts only images not already RGB: the copies `exif_transpose` and
    `convert` otherwise make cost twice the JPEG decode itself.
    """
    try:
        with warnings.catch_warnings():
            # PIL warns from 89.5 MP on; the limit below is ours and says so (open reads only the header)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise MediaError(f"image {url} is {width}x{height} pixels, over the {max_pixels}-pixel limit")
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            if img.mode.startswith("I") or img.mode == "F":
                img = _to_8bit(img)
            return img if img.mode == "RGB" else img.convert("RGB")
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:  # over twice PIL's limit: refused before our check could run
        raise MediaError(f"image {url} is over the {max_pixels}-pixel limit ({exc})") from exc
    except UnidentifiedImageError as exc:  # its message names a BytesIO object, which says nothing
        raise MediaError(f"image {url} is corrupt or not an image (no image format recognises its "
                         f"{len(data)} bytes)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"image {url} is corrupt or not an image: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - decoder plugins (ultralytics patches Image.open) raise anything
        raise MediaError(f"image {url} could not be decoded: {type(exc).__name__}: {exc}") from exc
