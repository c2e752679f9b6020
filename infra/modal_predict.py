"""Whole-project pre-annotation fanned out on Modal GPUs (`tandem predict --runner modal`).

    modal deploy infra/modal_predict.py      # once, and again when the prediction code changes

The local job still pages the project, fetches the images (the media policy and Label Studio's credentials
stay on this side), keeps the store as the ledger and writes into Label Studio. Per chunk of the job it
uploads the images (lossless PNG) and, once, the weights to the Volume, in sub-chunks of `SUB_CHUNK`; the
deployed GPU function `.map()`s over the sub-chunks — one container per sub-chunk, in parallel — and returns
plain `Prediction` records, which the job turns into Label Studio results exactly as a local prediction
(same plan, same label mapping, same store keys).

YOLO detect/segment weights only (the GPU pipeline, backend/models/yolo_gpu.py); a VLM is refused before
any upload.
"""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import modal

from infra.modal_app import MOUNT, VOLUME_NAME, _pin, volume_root

APP_NAME = "tandem-predict"
FUNCTION_NAME = "predict_images"
SUB_CHUNK = 64  # images per GPU call: large enough to fill a batch, small enough to spread over containers

app = modal.App(APP_NAME)
volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
PACKAGES = ("ultralytics", "torch", "torchvision", "numpy", "pillow", "supervision", "scipy", "httpx", "pydantic")
image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("libgl1", "libglib2.0-0")
    .uv_pip_install(*(_pin(p) for p in PACKAGES))
    .env({"YOLO_CONFIG_DIR": "/tmp/Ultralytics", "YOLO_AUTOINSTALL": "False", "PYTHONUNBUFFERED": "1"})
    .add_local_python_source("backend")
)


@app.function(image=image, gpu="L4", volumes={MOUNT: volume}, timeout=30 * 60, memory=16 * 1024,
              retries=modal.Retries(max_retries=2, initial_delay=5.0))
def predict_images(chunk_dir: str, weights_path: str, conf: float, imgsz: int | None = None) -> list[dict]:
    """Every image in `chunk_dir` (Volume-relative, files in name order) -> one Prediction record each."""
    from backend.models.yolo_gpu import GpuYoloPipeline

    remote = not modal.is_local()
    root = volume_root()
    if remote:
        volume.reload()  # see the uploads committed after this container started
    folder = Path(root) / chunk_dir
    files = sorted(folder.iterdir())
    pipeline = GpuYoloPipeline(posixpath.join(root, weights_path), device="cuda" if remote else "cpu", conf=conf,
                               imgsz=imgsz)
    return [p.to_record() for p in pipeline.predict_bytes([f.read_bytes() for f in files])]


class _Replay:
    """The planned model, answering with the outputs the GPU function returned for these very images."""

    def __init__(self, inner: Any, outputs: dict[int, Any]) -> None:
        self._inner, self._outputs = inner, outputs

    def predict(self, images: list) -> list:
        return [self._outputs[id(img)] for img in images]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _png(img) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG", compress_level=1)
    return out.getvalue()


def modal_chunk_predictor(plan, spec: str, job_id: int, batch: int | None = None):
    """The job's chunk function for `--runner modal`. Credentials are checked before anything is uploaded."""
    from backend.errors import ConfigError
    from backend.models.base import is_promptable
    from backend.predict import Predictor, image_url
    from infra.modal_runner import require_modal_credentials

    require_modal_credentials("infra/modal_predict.py")
    batch = batch or SUB_CHUNK
    if any(is_promptable(c.adapter) for c in plan.controls) or not Path(spec).is_file():
        raise ConfigError(f"--runner modal pre-annotates with YOLO weights (a .pt file); {spec} is not one")
    vol = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
    function = modal.Function.from_name(APP_NAME, FUNCTION_NAME)
    base = f"predict/{job_id}"
    weights = f"{base}/weights{Path(spec).suffix}"
    with vol.batch_upload(force=True) as up:
        up.put_file(spec, f"/{weights}")
    conf = getattr(plan.controls[0].adapter, "conf", plan.min_confidence)  # the candidates' floor, as served
    imgsz = getattr(plan.controls[0].adapter, "imgsz", None)
    counter = [0]

    def predict_chunk(tasks: Sequence[Mapping[str, Any]], prefetched) -> list:
        from backend.core.prediction import Prediction
        from backend.errors import MediaError

        loaded: dict[tuple[int, str], Any] = {}
        for task in tasks:
            for key in plan.image_keys:
                url = image_url(task, key) or ""
                try:
                    loaded[(task["id"], url)] = prefetched.load(url, task_id=task["id"])
                except MediaError:
                    pass  # the predictor reports it as the task's error
        images = list({id(li.image): li.image for li in loaded.values()}.values())
        outputs: dict[int, Any] = {}
        if images:
            counter[0] += 1
            dirs = []
            with tempfile.TemporaryDirectory() as tmp, vol.batch_upload(force=True) as up:
                for start in range(0, len(images), batch):
                    folder = f"{base}/chunk-{counter[0]}-{start // batch}"
                    for i, img in enumerate(images[start : start + batch]):
                        local = os.path.join(tmp, f"{start + i:06d}.png")
                        Path(local).write_bytes(_png(img))
                        up.put_file(local, f"/{folder}/{start + i:06d}.png")
                    dirs.append(folder)
            records = [r for part in function.map(dirs, kwargs={"weights_path": weights, "conf": conf,
                                                                  "imgsz": imgsz})
                       for r in part]
            outputs = {id(img): Prediction.from_record(rec) for img, rec in zip(images, records, strict=True)}
        replay = replace(plan, controls=tuple(replace(c, adapter=_Replay(c.adapter, outputs)) for c in plan.controls))
        predictor = Predictor(prefetched, workers=1)
        try:
            return predictor.predict_typed(tasks, replay)
        finally:
            predictor.close()

    return predict_chunk
