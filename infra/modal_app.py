"""Tandem's fine-tune job on a Modal H100.

    modal deploy infra/modal_app.py      # once, and again when the training code changes

The backend then uploads each job's dataset and parent weights to the Volume, spawns `train_yolo` (or
`train_vlm_lora`), polls the call, and downloads the new weights or adapter (infra/modal_runner.py). The
training code is the same the local worker runs: `backend.training.yolo_finetune.fine_tune` and
`backend.training.vlm_lora.lora_fine_tune`.
"""

from __future__ import annotations

import os
import posixpath
from importlib.metadata import PackageNotFoundError, version

import modal

APP_NAME = "tandem-train"
FUNCTION_NAME = "train_yolo"
VLM_FUNCTION_NAME = "train_vlm_lora"
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


# What `backend.training.vlm_lora` and the VLM loader import, at the versions this project locks.
VLM_PACKAGES = ("torch", "torchvision", "transformers", "peft", "tokenizers", "safetensors", "huggingface-hub",
                "sentencepiece", "supervision", "label-studio-sdk", "httpx", "pydantic", "numpy", "pillow", "scipy")
vlm_image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("libgl1", "libglib2.0-0")
    .uv_pip_install(*(_pin(p) for p in VLM_PACKAGES))
    .env({"HF_HOME": f"{MOUNT}/hf", "PYTHONUNBUFFERED": "1"})  # hub downloads persist on the Volume
    .add_local_python_source("backend")
)


def volume_root() -> str:
    """`.local()` runs the body in-process without the Volume; tests point this at a folder."""
    return os.environ.get("TANDEM_MODAL_VOLUME_ROOT", MOUNT)


# Both training functions: one H100, the Volume, 4 h, one retry, a fresh container per job.
H100_JOB = dict(gpu="H100", volumes={MOUNT: volume}, timeout=4 * 60 * 60, single_use_containers=True, cpu=8.0,
                retries=modal.Retries(max_retries=1, initial_delay=30.0))


@app.function(image=image, memory=32 * 1024, **H100_JOB)
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


def materialize_base(chain: list[dict], root: str) -> str:
    """The VLM to load, from the bottom of its chain up: a hub id or an uploaded folder, then each uploaded
    LoRA adapter re-pointed at the copy below it (its tandem_base.json names a path on the server)."""
    import json

    from backend.models.vlm import ADAPTER_BASE_FILE

    source = ""
    for link in chain:
        if "hub" in link:
            source = link["hub"]
            continue
        folder = posixpath.join(root, link["vol"])
        marker = posixpath.join(folder, ADAPTER_BASE_FILE)
        if os.path.exists(marker):
            with open(marker) as fh:
                meta = json.load(fh)
            with open(marker, "w") as fh:
                json.dump({**meta, "base": source}, fh)
        source = folder
    return source


@app.function(image=vlm_image, memory=64 * 1024, **H100_JOB)
def train_vlm_lora(annotations_path: str, chain: list[dict], base_source: str, run_name: str, params: dict,
                   prompts: dict | None = None) -> dict:
    """LoRA on corrected labels; the adapter lands in runs/<run_name>/adapter on the Volume (`adapter_vol`)."""
    from pathlib import Path

    from backend.models.vlm.generative import GenerativeVlm
    from backend.models.vlm.loader import load_vlm
    from backend.training.vlm_examples import AnnotatedSet, to_examples
    from backend.training.vlm_lora import lora_fine_tune

    remote = not modal.is_local()
    root = volume_root()
    if remote:
        volume.reload()
    vlm = load_vlm(materialize_base(chain, root), device="cuda" if remote else "cpu")
    if not isinstance(vlm, GenerativeVlm):
        raise ValueError(f"{vlm.name} is a {vlm.family}; LoRA fine-tuning applies to generative VLMs")
    data = to_examples(AnnotatedSet.load(Path(root) / annotations_path), vlm, prompts)
    if not data.train or not data.val:  # before the H100 does anything: a retry would fail the same way
        raise ValueError(f"too few examples for {vlm.name}: {len(data.train)} train and {len(data.val)} validation")
    out = posixpath.join(root, "runs", run_name, "adapter")
    result = lora_fine_tune(vlm, data.train, data.val, Path(out), base_source=base_source, params=params)
    result.update(adapter_vol=posixpath.relpath(out, root), train=len(data.train), val=len(data.val),
                  snapshot=data.snapshot)
    if remote:
        volume.commit()
    return result
