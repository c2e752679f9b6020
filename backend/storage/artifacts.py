"""Weights, datasets, adapters and job logs addressed by URI, on any fsspec filesystem.

The root is `TANDEM_ARTIFACTS`: by default the folder `TANDEM_HOME/artifacts`; a folder every replica mounts,
or `s3://bucket/prefix` (any fsspec URL whose driver is installed, `memory://` in tests), for several replicas.
The registry stores what `put` returns: an absolute path under a local root (what older rows and tools read
as they are), the URL under any other. Loaders that need a file on disk (ultralytics) ask `local_path(uri)`:
a local path or `file://` URI is the file itself; anything else is downloaded once into a local cache keyed by
the URI, written to a temporary name and renamed, so a half-downloaded file is never loaded.

Exported datasets go in as one tar per content (`put_dataset`): the name is the export's snapshot plus a digest
of what the files hold, so a snapshot exported twice is stored once, and labels edited under the same
annotation ids get a new archive rather than overwriting the old one. `fetch_dataset` unpacks one into a local
cache on any replica, again under a temporary name renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import fsspec


def is_uri(value: str) -> bool:
    return "://" in str(value)


def local_file(uri: str) -> Path | None:
    """The local path a `file://` URI or a plain path names; None for remote URIs."""
    if not is_uri(uri):
        return Path(uri)
    parsed = urlparse(uri)  # a file:// URL percent-encodes what a path spells out ("my%20home" is "my home")
    return Path(unquote(parsed.path)) if parsed.scheme in ("file", "local") else None


def exists(uri: str) -> bool:
    local = local_file(uri)
    if local is not None:
        return local.exists()
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


class ArtifactStore:
    def __init__(self, root: str | Path, cache_dir: Path) -> None:
        root = str(root)
        self.root = root.rstrip("/") if is_uri(root) else Path(root).resolve().as_uri()
        self.cache_dir = cache_dir
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)

    @classmethod
    def from_settings(cls, settings) -> ArtifactStore:
        root = getattr(settings, "artifacts", None) or os.environ.get("TANDEM_ARTIFACTS") or settings.home / "artifacts"
        return cls(root, cache_dir(settings))

    @property
    def local_root(self) -> Path | None:
        """The root folder where it is on this machine's file system (None for remote roots)."""
        return local_file(self.root)

    def uri(self, *parts: str | int) -> str:
        """The address of an artifact under the root: `uri("jobs", 7, "log.txt")` (a plain path if local)."""
        names = [str(p).strip("/") for p in parts]
        if any(n in ("", ".", "..") for n in names):
            raise ValueError(f"artifact names must be plain names, not {parts!r}")
        local = self.local_root
        return str(local.joinpath(*names)) if local is not None else "/".join([self.root, *names])

    def put(self, local: str | Path, *parts: str | int) -> str:
        """Copy a local file (or folder) in; returns its address. A file is written under a temporary name and
        moved into place where the file system can (local roots), so a reader never sees half a file."""
        uri, local = self.uri(*parts), Path(local)
        if not local.exists():
            raise FileNotFoundError(f"no file to store as an artifact: {local}")
        target = local_file(uri)
        if target is not None:
            if target.resolve() == local.resolve():
                return uri
            target.parent.mkdir(parents=True, exist_ok=True)
            if local.is_dir():
                shutil.copytree(local, target, dirs_exist_ok=True)
            else:
                partial = target.with_name(f"{target.name}.part-{os.getpid()}")
                try:
                    shutil.copyfile(local, partial)
                    os.replace(partial, target)
                except BaseException:  # a full disk must not stay full of the half copy
                    partial.unlink(missing_ok=True)
                    raise
            return uri
        fs, path = fsspec.core.url_to_fs(uri)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if local.is_dir():
            fs.put(str(local).rstrip("/") + "/", path, recursive=True)
        else:
            fs.put_file(str(local), path)
        return uri

    def write_text(self, text: str, *parts: str | int) -> str:
        uri = self.uri(*parts)
        target = local_file(uri)
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            return uri
        fs, path = fsspec.core.url_to_fs(uri)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "w") as out:
            out.write(text)
        return uri

    def local_path(self, uri: str) -> Path:
        return local_path(uri, self.cache_dir)

    def put_dataset(self, root: str | Path, project_id: int, snapshot: str) -> str:
        """Store an exported dataset folder as `datasets/p{project}/{snapshot}-{content}.tar`; returns its address.
        An archive already there under that name holds the same files and is not written again."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"no dataset folder to store: {root}")
        if not snapshot or not all(c.isalnum() for c in snapshot):
            raise ValueError(f"a dataset snapshot is a plain hex id, not {snapshot!r}")
        uri = self.uri("datasets", f"p{int(project_id)}", f"{snapshot}-{dataset_digest(root)}.tar")
        if exists(uri):
            return uri
        with tempfile.TemporaryDirectory(prefix="tandem-dataset-") as tmp:
            archive = Path(tmp) / "dataset.tar"
            with tarfile.open(archive, "w") as tar:  # uncompressed: the images are PNGs already
                for path in sorted(root.rglob("*")):
                    if path.is_file():
                        tar.add(path, arcname=path.relative_to(root).as_posix(), recursive=False)
            return self.put(archive, "datasets", f"p{int(project_id)}", Path(uri).name)


def dataset_digest(root: Path) -> str:
    """What an exported dataset holds, cheaply: every file's place, and the bytes of all but the images (an
    image's name already carries its pixels' digest) and of data.yaml (it names the folder it was written in)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        digest.update(f"{name}\0".encode())
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg") and name != "data.yaml":
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _size_file(target: Path) -> Path:
    return target.with_name(target.name + ".size")


def _whole(cached: Path) -> bool:
    """A cached file is as long as it was when it was downloaded (its size is kept beside it): one cut short or
    damaged since is fetched again, not loaded as it is. Files cached by an older release have no size kept."""
    try:
        return int(_size_file(cached).read_text()) == cached.stat().st_size
    except (OSError, ValueError):
        return True


def fetch_dataset(uri: str, cache: Path) -> Path:
    """The dataset archive at `uri` unpacked on this machine (under `cache`, once per address).

    Raises FileNotFoundError when the store has no such archive. The archive is streamed (never kept beside the
    unpacked copy) and unpacked with tarfile's `data` filter, so an entry cannot land outside its folder."""
    target = Path(cache) / hashlib.sha256(uri.encode()).hexdigest()[:24]
    if target.is_dir():
        return target
    if not exists(uri):
        raise FileNotFoundError(f"no dataset archive at {uri}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.part-", dir=target.parent))
    try:
        with open_uri(uri, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            tar.extractall(partial, filter="data")
        yaml = partial / "data.yaml"
        if yaml.is_file():  # it named the exporting replica's folder: name this one, so it trains as it is
            lines = yaml.read_text().splitlines()
            yaml.write_text("\n".join(f"path: {target}" if ln.startswith("path:") else ln for ln in lines) + "\n")
        try:
            os.replace(partial, target)
        except OSError:  # another process unpacked it first: theirs is the same archive
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def open_uri(uri: str, mode: str = "rb"):
    local = local_file(uri)
    if local is not None:
        return open(local, mode)
    return fsspec.open(uri, mode).open()


def read_text(uri: str, errors: str = "replace") -> str:
    if not exists(uri):
        return ""
    with open_uri(uri, "rb") as f:
        return f.read().decode(errors=errors)


def cache_dir(settings) -> Path:
    return settings.home / "cache" / "artifacts"


def localise(settings, spec: str) -> str:
    """A weights spec as a loader takes it: an artifact URL is fetched into this machine's cache; a local path,
    a hub id or a registry version is returned as it is."""
    if not is_uri(spec) or local_file(spec) is not None:
        return str(local_file(spec)) if is_uri(spec) else spec
    return str(local_path(spec, cache_dir(settings)))


def local_path(uri: str, cache_dir: Path) -> Path:
    """A file on this machine holding the artifact (the file itself where it is local)."""
    local = local_file(uri)
    if local is not None:
        return local
    name = Path(urlparse(uri).path).name
    target = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:24] / name
    if target.is_dir() or (target.is_file() and _whole(target)):
        return target  # no call to the store: a replica cut off from it goes on with what it has
    target.parent.mkdir(parents=True, exist_ok=True)
    fs, path = fsspec.core.url_to_fs(uri)
    partial = target.with_name(target.name + f".part-{os.getpid()}")
    fs.get(path, str(partial), recursive=fs.isdir(path))
    if partial.is_file():
        _size_file(target).write_text(str(partial.stat().st_size))
    os.replace(partial, target)
    return target
