"""Fast CPU inference: each model version exported once to OpenVINO (cached under TANDEM_HOME), accepted
only if it agrees with the PyTorch model on a parity check at export time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from backend.errors import ModelLoadError


def _parity_images(n: int = 6) -> list[np.ndarray]:
    from backend.datasets.shapes import generate_samples

    rng = np.random.default_rng(0)
    images = [np.asarray(img)[:, :, ::-1].copy() for img, _ in generate_samples(n, seed=123)]
    images.append(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
    return images


def check_parity(reference, candidate, task: str, imgsz: int, conf: float = 0.05) -> dict:
    """Compare the two engines on the same images; raise when they disagree beyond float noise."""
    images = _parity_images()
    ref = reference.predict(images, imgsz=imgsz, conf=conf, verbose=False)
    got = candidate.predict(images, imgsz=imgsz, conf=conf, verbose=False)
    if task == "classify":
        diff = max(float(np.abs(a.probs.data.cpu().numpy() - b.probs.data.cpu().numpy()).max()) for a, b in zip(ref, got))
        if diff > 0.02:
            raise ModelLoadError(f"OpenVINO export disagrees with PyTorch: class probabilities differ by {diff:.3f}")
        return {"max_prob_diff": diff}
    import supervision as sv

    matched = total = 0
    worst_conf = 0.0
    for a, b in zip(ref, got, strict=True):
        top = a.boxes.conf.cpu().numpy().argsort()[::-1][:10]
        if len(top) == 0:
            continue
        ax, bx = a.boxes.xyxy.cpu().numpy()[top], b.boxes.xyxy.cpu().numpy()
        total += len(top)
        if len(bx) == 0:
            continue
        iou = sv.box_iou_batch(ax, bx)
        for i, j in enumerate(iou.argmax(1)):
            same_class = int(a.boxes.cls[top[i]]) == int(b.boxes.cls[j])
            dconf = abs(float(a.boxes.conf[top[i]]) - float(b.boxes.conf[j]))
            if iou[i, j] >= 0.9 and same_class and dconf <= 0.05:
                matched += 1
                worst_conf = max(worst_conf, dconf)
    share = matched / total if total else 1.0
    if share < 0.9:
        raise ModelLoadError(f"OpenVINO export disagrees with PyTorch: only {share:.0%} of {total} boxes match")
    return {"boxes_compared": total, "matched": share, "max_conf_diff": worst_conf}


def export_openvino(weights: Path, version: str, task: str, imgsz: int, cache_dir: Path):
    """Return an ultralytics YOLO on the OpenVINO export of `weights`, exporting (and checking) once."""
    from ultralytics import YOLO

    target = cache_dir / f"{version}_openvino_model"
    marker = target / "tandem_parity.json"
    if not marker.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        staged = cache_dir / f"{version}.pt"
        shutil.copyfile(weights, staged)
        try:
            exported = Path(YOLO(str(staged)).export(format="openvino", imgsz=imgsz, half=False, verbose=False))
        except Exception as exc:  # noqa: BLE001 - any exporter failure means: serve with PyTorch
            raise ModelLoadError(f"OpenVINO export failed: {type(exc).__name__}: {exc}") from exc
        finally:
            staged.unlink(missing_ok=True)
        if exported.resolve() != target.resolve():
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(str(exported), target)
        report = check_parity(YOLO(str(weights)), YOLO(str(target), task=task), task, imgsz)
        marker.write_text(json.dumps({"version": version, "imgsz": imgsz, **report}))
    return YOLO(str(target), task=task)
