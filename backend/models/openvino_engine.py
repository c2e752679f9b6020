"""Fast CPU inference: each model version exported once to OpenVINO (cached under TANDEM_HOME), accepted
only if it agrees with the PyTorch model on a parity check at export time.

Detection and segmentation exports have dynamic input shapes, so an image is padded only to the stride
(640x480 runs as 640x480, not 640x640: a quarter less work); classification crops to a fixed square.

INT8 (detection): on CPUs without bf16 units OpenVINO computes in fp32, and there post-training INT8
quantization (nncf, calibrated on images like the ones served) is what makes the model fast. The box
decoding at the end of the head stays in floating point, as ultralytics' own INT8 export leaves it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from pathlib import Path

import numpy as np

from backend.errors import ModelLoadError
from backend.models.base import ModelOutput

Runner = Callable[[list[np.ndarray], float], list[ModelOutput]]  # RGB uint8 images, confidence -> outputs
MARKER = "tandem_parity.json"
T = TypeVar("T")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MIN_CALIBRATION = 16
MIN_CALIBRATION_READ = MIN_CALIBRATION * 3 // 4  # readable, besides the quarter held out for the check


def parity_images(n: int = 6) -> list[np.ndarray]:
    """RGB images with objects, at sizes that exercise both letterbox paths, plus one of pure noise."""
    from backend.datasets.shapes import generate_samples

    rng = np.random.default_rng(0)
    images = [np.asarray(img) for img, _ in generate_samples(n, seed=123)]
    images.append(np.asarray(generate_samples(1, seed=7, size=(500, 333))[0][0]))
    images.append(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
    return images


def check_parity(reference: list[ModelOutput], candidate: list[ModelOutput]) -> dict:
    """Compare the two engines' outputs on the same images; raise when they disagree beyond float noise."""
    import supervision as sv

    if reference and reference[0].probabilities is not None:
        diff = max(float(np.abs(a.probabilities - b.probabilities).max()) for a, b in zip(reference, candidate))
        if diff > 0.02:
            raise ModelLoadError(f"OpenVINO export disagrees with PyTorch: class probabilities differ by {diff:.3f}")
        return {"max_prob_diff": diff}
    matched = total = 0
    worst_conf = 0.0
    for a, b in zip(reference, candidate, strict=True):
        ref, got = a.detections, b.detections
        top = np.argsort(-ref.confidence)[:10]
        total += len(top)
        if len(top) == 0 or len(got) == 0:
            continue
        iou = sv.box_iou_batch(ref.xyxy[top], got.xyxy)
        for i, j in enumerate(iou.argmax(1)):
            dconf = abs(float(ref.confidence[top[i]]) - float(got.confidence[j]))
            if iou[i, j] >= 0.9 and ref.class_id[top[i]] == got.class_id[j] and dconf <= 0.05:
                matched += 1
                worst_conf = max(worst_conf, dconf)
    share = matched / total if total else 1.0
    if share < 0.9:
        raise ModelLoadError(f"OpenVINO export disagrees with PyTorch: only {share:.0%} of {total} boxes match")
    return {"boxes_compared": total, "matched": share, "max_conf_diff": worst_conf}


def check_agreement(reference: list[ModelOutput], candidate: list[ModelOutput], class_names: tuple[str, ...],
                    limit: float = 0.10) -> dict:
    """An INT8 model is not float-exact, so it is held to what an annotator would notice: the review queue's
    own disagreement score (1 − score-weighted matched-IoU F1) against PyTorch, on the boxes served."""
    from active_learning.scoring import score_outputs

    boxes = int(sum(len(r.detections) for r in reference))
    if boxes == 0:
        raise ModelLoadError("cannot check the INT8 model: PyTorch finds no box above the serving threshold on the "
                             "check images (calibrate with images that show the model's objects)")
    d = score_outputs(reference, class_names, candidate, class_names).disagreement
    mean = float(d.mean())
    if mean > limit:
        raise ModelLoadError(f"INT8 model disagrees with PyTorch: mean disagreement {mean:.3f} > {limit}")
    return {"check": "disagreement", "mean_disagreement": mean, "max_disagreement": float(d.max(initial=0.0)),
            "limit": limit, "boxes_compared": boxes}


def export_openvino(weights: Path, version: str, task: str, imgsz: int, cache_dir: Path) -> Path:
    """The folder of the OpenVINO export of `weights`, exported on first use (in a folder of its own, then
    published whole: two processes loading one version never see each other's half-written files)."""
    import tempfile

    from ultralytics import YOLO

    target = cache_dir / f"{version}_openvino_model"
    if (target / MARKER).is_file() or any(target.glob("*.xml")):
        return require_intact(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(cache_dir)
    work = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".partial", dir=cache_dir))
    try:
        staged = work / f"{version}.pt"
        shutil.copyfile(weights, staged)
        try:
            exported = Path(YOLO(str(staged)).export(format="openvino", imgsz=imgsz, dynamic=task != "classify",
                                                     half=False, verbose=False))
        except Exception as exc:  # noqa: BLE001 - any exporter failure means: serve with PyTorch
            raise ModelLoadError(f"OpenVINO export failed: {type(exc).__name__}: {exc}") from exc
        return publish(exported, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class DamagedExport(ModelLoadError):
    """A cached export whose files are not the ones its parity check saw (cut short, overwritten)."""


def damaged_cache(exc: BaseException, target: Path) -> bool:
    """Whether a load failure is the cache's fault: its files differ from what the check saw, or an export that
    passed its check once (its report is there) no longer loads. A fresh export that fails is not: making it
    again would fail the same way."""
    return isinstance(exc, DamagedExport) or (target / MARKER).is_file()


def remade_once(make: Callable[[], T], target: Path, what: str, again: str) -> T:
    """`make()` (an export or quantization into `target`, and serving it); when it fails because the cached copy
    is damaged, that copy is set aside and `make()` runs once more. The inode is read first, so a copy another
    loader has already made again is not set aside a second time."""
    import logging

    before = inode_of(target)
    try:
        return make()
    except (ModelLoadError, RuntimeError) as exc:
        if not damaged_cache(exc, target):
            raise  # a fresh export that fails is not a damaged cache: making it again would fail the same way
        logging.getLogger("tandem.models").warning("the cached %s cannot be used (%s): %s", what, first_line(exc),
                                                   again)
        set_aside(target, before)
        return make()


def sweep_leftovers(cache_dir: Path, max_age_s: float = 3600.0) -> None:
    """Remove what killed exports left: `.partial` folders and set-aside damaged exports older than `max_age_s`
    (a live export in another process is younger; nothing is removed that a process may still be writing)."""
    import time

    now = time.time()
    for leftover in [*cache_dir.glob("*.partial"), *cache_dir.glob(".*.partial"), *cache_dir.glob(".*.damaged-*")]:
        try:
            if leftover.is_dir() and now - leftover.stat().st_mtime > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:  # another process removed it first
            continue


def set_aside(target: Path, inode: int | None = None) -> Path | None:
    """Move a damaged export out of the way in one rename, so it is exported again. Not deleted in place: a
    process serving it has its weights mapped; `sweep_leftovers` removes it an hour later. None when another
    loader got there first: the folder is gone, or is no longer the one that failed (`inode`, read before)."""
    import threading
    import time

    try:
        if inode is not None and target.stat().st_ino != inode:
            return None  # already replaced by a fresh export: that one is used
        aside = target.with_name(f".{target.name}.damaged-{os.getpid()}-{threading.get_ident()}-{time.time_ns()}")
        target.rename(aside)
        os.utime(aside)  # a rename keeps the folder's time: the hour before the sweep starts now
    except OSError:
        return None
    return aside


def require_intact(target: Path) -> Path:
    """A cached export whose model files are the ones its parity check saw (by size), before anything maps
    them; raises DamagedExport otherwise. Exports checked by an older release (no sizes recorded) pass."""
    try:
        seen = json.loads((target / MARKER).read_text()).get("files")
    except (OSError, ValueError):
        return target  # not checked yet: the check runs when it is served
    if seen is not None and seen != file_sizes(target):
        raise DamagedExport(f"its files differ from the ones its parity check saw: sizes "
                            f"{sorted(file_sizes(target).values())}, checked {sorted(seen.values())}")
    return target


def first_line(exc: BaseException, limit: int = 200) -> str:
    """OpenVINO's errors run to many lines of C++ source positions ("Exception from src/…/core.cpp:84:"):
    the first line that is not one says what failed."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    said = next((ln for ln in lines if not ln.startswith("Exception from ")), lines[0] if lines else "")
    return (said[:limit] + "…" if len(said) > limit else said) or type(exc).__name__


def inode_of(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def file_sizes(target: Path) -> dict[str, int]:
    """The export's model files and their sizes, as its parity report records them."""
    return {p.name: p.stat().st_size for p in sorted(target.iterdir()) if p.suffix in (".xml", ".bin")}


def publish(staged: Path, target: Path) -> Path:
    """Move a finished export into place in one rename. Readers map the model's weights file, and a file
    rewritten under a process that has mapped it kills that process (SIGBUS), so nothing is ever written in
    place. Whoever renames first wins; a later copy of the same version is dropped."""
    if target.is_dir() and not any(target.glob("*.xml")):
        shutil.rmtree(target, ignore_errors=True)  # a half-written leftover of a crashed export
    try:
        staged.rename(target)
    except OSError:
        if not any(target.glob("*.xml")):
            raise
        shutil.rmtree(staged, ignore_errors=True)
    return target


@dataclass(frozen=True)
class Calibration:
    """A calibration folder's images: most calibrate the INT8 model, every fourth is held out to check it."""

    calibrate: list[Path]
    check: list[Path]
    digest: str  # of the files' names, sizes and times, the image size and the serving threshold


def calibration_set(folder: Path, imgsz: int, conf: float, limit: int = 300) -> Calibration:
    """Up to `limit` images under `folder`, sampled evenly across its sorted listing (so one class folder
    does not fill the sample). Nothing is decoded here: a cached INT8 model starts without reading them."""
    import hashlib

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"INT8 calibration folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < MIN_CALIBRATION:
        raise ModelLoadError(f"INT8 calibration needs at least {MIN_CALIBRATION} readable images in {folder} "
                             f"(found {len(files)}): use images like the ones you serve")
    if len(files) > limit:
        files = [files[i] for i in np.unique(np.linspace(0, len(files) - 1, limit).round().astype(int))]
    h = hashlib.sha256(f"{imgsz}|{conf}".encode())
    for path in files:
        st = path.stat()
        h.update(f"{path.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}".encode())
    check = files[::4]
    return Calibration([p for i, p in enumerate(files) if i % 4], check, h.hexdigest()[:8])


def load_images(paths: list[Path], imgsz: int) -> list[np.ndarray]:
    """RGB arrays, EXIF-rotated and shrunk so the longer side is at most `imgsz` (the letterbox would shrink
    them anyway, and 300 phone photos at full size would take gigabytes); unreadable files are skipped."""
    from PIL import Image, ImageOps

    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.draft("RGB", (imgsz, imgsz))  # JPEG: decode at a reduced scale
                img = ImageOps.exif_transpose(img).convert("RGB")
                img.thumbnail((imgsz, imgsz))
                images.append(np.asarray(img))
        except Exception:  # noqa: BLE001 - bombs, truncated files, bad EXIF: skip, never crash the start
            continue
    return images


def quantize_openvino(fp32: Path, key: str, files: list[Path], imgsz: int, stride: int, head: int,
                      cache_dir: Path) -> Path:
    """The INT8 copy of the fp32 detection export `fp32`, quantized on first use (nncf post-training
    quantization, calibrated on `files`); `key` names it in the cache."""
    import tempfile

    target = cache_dir / f"{key}_openvino_model"
    if any(target.glob("*.xml")):
        return require_intact(target)
    images = load_images(files, imgsz)
    if len(images) < MIN_CALIBRATION_READ:
        raise ModelLoadError(f"INT8 calibration needs at least {MIN_CALIBRATION_READ} readable images besides "
                             f"the ones held out for its check (read {len(images)} of {len(files)})")
    try:
        import nncf
        import openvino as ov

        from backend.models.openvino_detector import letterbox

        model = ov.Core().read_model(next(fp32.glob("*.xml")))
        square = not model.input().get_partial_shape()[2].is_dynamic

        def to_input(image: np.ndarray) -> np.ndarray:  # what the fp32 graph takes: NCHW float in [0, 1]
            padded, _ = letterbox(image, imgsz, stride, square)
            return padded.transpose(2, 0, 1)[None].astype(np.float32) / 255.0

        # box decoding (DFL, anchor arithmetic, sigmoid) stays in floating point, as in ultralytics' export
        ignored = nncf.IgnoredScope(patterns=[rf".*model\.{head}/.*/{op}.*" for op in ("Add", "Sub", "Mul", "Div")]
                                    + [rf".*model\.{head}\.dfl.*"], types=["Sigmoid"], validate=False)
        quantized = nncf.quantize(model, nncf.Dataset(images, to_input), preset=nncf.QuantizationPreset.MIXED,
                                  subset_size=len(images), ignored_scope=ignored)
        cache_dir.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(cache_dir)
        staged = Path(tempfile.mkdtemp(prefix=f"{key}.", suffix=".partial", dir=cache_dir))
        ov.save_model(quantized, staged / "model.xml", compress_to_fp16=False)
        for extra in fp32.glob("*.yaml"):  # ultralytics' metadata: names, stride, task
            shutil.copyfile(extra, staged / extra.name)
        publish(staged, target)
    except Exception as exc:  # noqa: BLE001 - a failed quantization means: serve the fp32 export
        raise ModelLoadError(f"INT8 quantization failed: {type(exc).__name__}: {exc}") from exc
    return target


def verify_once(target: Path, reference: Runner, candidate: Runner, imgsz: int, conf: float = 0.05,
                check: Callable[[list[ModelOutput], list[ModelOutput]], dict] = check_parity,
                check_images: Callable[[], list[np.ndarray]] = parity_images) -> dict:
    """Run the parity check the first time an export is served; its report is kept beside the model."""
    marker = target / MARKER
    if marker.is_file():
        return json.loads(marker.read_text())
    images = check_images()  # a callable, so a model checked before reads nothing
    # one image per call: ultralytics pads a batch of mixed sizes to the full square but a single image only
    # to the stride, and a weak model's scores move with the padding, which is not what is being checked
    ref = [reference([image], conf)[0] for image in images]
    got = [candidate([image], conf)[0] for image in images]
    report = {"imgsz": imgsz, "conf": conf, **check(ref, got), "files": file_sizes(target)}
    partial = marker.with_name(f".{MARKER}.{os.getpid()}.{threading.get_ident()}")
    partial.write_text(json.dumps(report))
    partial.replace(marker)  # whole or not at all: another process may be reading it
    return report
