"""Fast CPU inference: each model version exported once to OpenVINO (cached under TANDEM_HOME), accepted
only if it agrees with the PyTorch model on a parity check at export time.

Detection and segmentation exports have dynamic input shapes, so an image is padded only to the stride
(640x480 runs as 640x480, not 640x640: a quarter less work); classification crops to a fixed square.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from backend.errors import ModelLoadError
from backend.models.base import ModelOutput

Runner = Callable[[list[np.ndarray], float], list[ModelOutput]]  # RGB uint8 images, confidence -> outputs
MARKER = "tandem_parity.json"


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


def export_openvino(weights: Path, version: str, task: str, imgsz: int, cache_dir: Path) -> Path:
    """The folder of the OpenVINO export of `weights`, exported on first use."""
    from ultralytics import YOLO

    target = cache_dir / f"{version}_openvino_model"
    if (target / MARKER).is_file() or any(target.glob("*.xml")):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staged = cache_dir / f"{version}.pt"
    shutil.copyfile(weights, staged)
    try:
        exported = Path(YOLO(str(staged)).export(format="openvino", imgsz=imgsz, dynamic=task != "classify",
                                                 half=False, verbose=False))
    except Exception as exc:  # noqa: BLE001 - any exporter failure means: serve with PyTorch
        raise ModelLoadError(f"OpenVINO export failed: {type(exc).__name__}: {exc}") from exc
    finally:
        staged.unlink(missing_ok=True)
    if exported.resolve() != target.resolve():
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(exported), target)
    return target


def verify_once(target: Path, reference: Runner, candidate: Runner, imgsz: int, conf: float = 0.05) -> dict:
    """Run the parity check the first time an export is served; its report is kept beside the model."""
    marker = target / MARKER
    if marker.is_file():
        return json.loads(marker.read_text())
    images = parity_images()
    # one image per call: ultralytics pads a batch of mixed sizes to the full square but a single image only
    # to the stride, and a weak model's scores move with the padding, which is not what is being checked
    ref = [reference([image], conf)[0] for image in images]
    got = [candidate([image], conf)[0] for image in images]
    report = {"imgsz": imgsz, **check_parity(ref, got)}
    marker.write_text(json.dumps(report))
    return report
