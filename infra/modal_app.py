"""Tandem's fine-tune job on a Modal H100.

    modal deploy infra/modal_app.py      # once, and again when the training code changes

The backend then uploads each job's dataset and parent weights to the Volume, spawns `train_yolo`,
polls the call, and downloads the new weights (infra/modal_runner.py). The training code is the same
`backend.training.yolo_finetune.fine_tune` the local worker runs.
"""

from __future__ import annotations

import os
import posixpath
from importlib.metadata import PackageNotFoundError, version

import modal

APP_NAME = "tandem-train"
FUNCTION_NAME = "train_yolo"
VOLUME_NAME = "tandem-data"
MOUNT = "/vol"


def _pin(package: str) -> str:
    """The versions locked for this project, so the container trains with what the server serves."""
    try:
        return f"{package}=={version(package)}"
    except PackageNotFoundError:  # pragma: no cover - building the image from a partial install
        return package


app = modal.App(APP_NAME)
volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("libgl1", "libglib2.0-0")  # OpenCV runtime for ultralytics
    .uv_pip_install(*(_pin(p) for p in ("ultralytics", "torch", "torchvision", "numpy", "pillow")))
    .env({"YOLO_CONFIG_DIR": "/tmp/Ultralytics", "YOLO_AUTOINSTALL": "False", "PYTHONUNBUFFERED": "1"})
    .add_local_python_source("backend")  # mounted at start; must stay the last step
)


def volume_root() -> str:
    """`.local()` runs the body in-process without the Volume; tests point this at a folder."""
    return os.environ.get("TANDEM_MODAL_VOLUME_ROOT", MOUNT)


@app.function(
    image=image,
    gpu="H100",
    volumes={MOUNT: volume},
    timeout=4 * 60 * 60,
    retries=modal.Retries(max_retries=1, initial_delay=30.0),
    single_use_containers=True,
    cpu=8.0,
    memory=32 * 1024,
)
def train_yolo(dataset_path: str, parent_path: str, run_name: str, params: dict) -> dict:
    """Paths are relative to the Volume; returns plain types, with `weights_vol` to download."""
    from backend.training.yolo_finetune import fine_tune

    remote = not modal.is_local()
    root = volume_root()
    if remote:
        volume.reload()  # see the uploads committed after this container started
    summary = fine_tune(
        parent=posixpath.join(root, parent_path),
        data=posixpath.join(root, dataset_path),
        out_dir=posixpath.join(root, "runs", run_name),
        params={**params, "workers": 8 if remote else 0},
        device=0 if remote else "cpu",
    )
    summary["weights_vol"] = posixpath.relpath(summary["weights"], root)
    if remote:
        volume.commit()  # before returning: the exit-time commit can land after the caller reads
    return summary
