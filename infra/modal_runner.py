"""The client side of Modal training, run inside the local worker process of a `--runner modal` job:
upload dataset and parent weights to the Volume, spawn the deployed function, poll, download.

Credentials are checked before any call: without them Modal fails only at the first network call, and
with unreachable servers it retries for about a minute.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from backend.errors import TandemError
from backend.models.vlm import ADAPTER_BASE_FILE
from backend.training.export import ExportedDataset
from backend.training.jobs import Job, JobStore

APP_NAME = "tandem-train"
FUNCTION_NAME = "train_yolo"
VLM_FUNCTION_NAME = "train_vlm_lora"
VOLUME_NAME = "tandem-data"


class ModalUnavailable(TandemError):
    status_code = 400


def require_modal_credentials(app_file: str = "infra/modal_app.py") -> None:
    """Refuse before any call to Modal; `app_file` is the app the caller runs (deploy it once)."""
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return
    try:
        import modal.config

        if modal.config.config.get("token_id") and modal.config.config.get("token_secret"):
            return
    except Exception:  # noqa: BLE001 - an unreadable ~/.modal.toml is the same as none
        pass
    raise ModalUnavailable(
        "Modal credentials are missing: run `modal token new` (or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET), "
        f"then `modal deploy {app_file}`; or use --runner local"
    )


def _run_remote(function_name: str, job: Job, store: JobStore | None, log: Callable[[str], None], poll_s: float,
                **kwargs) -> dict:
    """Spawn the deployed function, record its call id on the job (for cancel), poll until it returns."""
    import modal

    call = modal.Function.from_name(APP_NAME, function_name).spawn(**kwargs)
    if store is not None:
        store.update(job.id, remote_id=call.object_id)
    log(f"spawned {APP_NAME}.{function_name} on an H100: call {call.object_id}")
    while True:
        try:
            return modal.FunctionCall.from_id(call.object_id).get(timeout=0)
        except TimeoutError:  # the builtin one: still running
            time.sleep(poll_s)


def train_on_modal(
    job: Job,
    parent_path: str,
    dataset: ExportedDataset,
    work: Path,
    params: dict,
    log: Callable[[str], None],
    store: JobStore | None = None,
    poll_s: float = 10.0,
) -> Path:
    require_modal_credentials()
    import modal

    volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
    prefix = f"jobs/{job.id}"
    log(f"uploading dataset ({dataset.train} train / {dataset.val} val) and parent weights to Volume {VOLUME_NAME}")
    with volume.batch_upload(force=True) as upload:
        upload.put_directory(str(dataset.root), f"/{prefix}/dataset")
        upload.put_file(parent_path, f"/{prefix}/parent.pt")
    data_rel = f"{prefix}/dataset/data.yaml" if dataset.task != "classify" else f"{prefix}/dataset"
    summary = _run_remote(FUNCTION_NAME, job, store, log, poll_s, dataset_path=data_rel,
                          parent_path=f"{prefix}/parent.pt", run_name=f"job{job.id}", params=params)
    log(f"trained in {summary['seconds']:.0f} s on Modal; downloading {summary['weights_vol']}")
    target = work / "modal_last.pt"
    with open(target, "wb") as fh:
        for chunk in volume.read_file(summary["weights_vol"]):
            fh.write(chunk)
    return target


def base_chain(source: str) -> list[str | Path]:
    """Bottom first: a hub id (str) or a checkpoint folder (Path), then each Tandem LoRA adapter on top."""
    adapters: list[str | Path] = []
    while (folder := Path(source).expanduser()).joinpath(ADAPTER_BASE_FILE).is_file() and \
            folder.joinpath("adapter_config.json").is_file():  # the loader's own test for a LoRA version
        adapters.insert(0, folder)
        source = json.loads((folder / ADAPTER_BASE_FILE).read_text())["base"]
    bottom = Path(source).expanduser()
    return [bottom if bottom.is_dir() else source, *adapters]


def train_vlm_on_modal(
    job: Job,
    base: str,
    annotations: Path,
    target: Path,
    params: dict,
    prompts: dict | None,
    log: Callable[[str], None],
    store: JobStore | None = None,
    poll_s: float = 10.0,
) -> dict:
    """Upload the corrected labels (and any local base folders), LoRA on an H100, download the adapter."""
    require_modal_credentials()
    import modal

    volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
    prefix = f"jobs/{job.id}"
    chain = []
    with volume.batch_upload(force=True) as upload:
        upload.put_directory(str(annotations), f"/{prefix}/vlm-data")
        for k, link in enumerate(base_chain(base)):
            if isinstance(link, str):
                chain.append({"hub": link})
                continue
            upload.put_directory(str(link), f"/{prefix}/vlm-base/{k}")
            chain.append({"vol": f"{prefix}/vlm-base/{k}"})
    log(f"uploaded the corrected labels and {sum('vol' in c for c in chain)} base folder(s) to Volume {VOLUME_NAME}")
    result = _run_remote(VLM_FUNCTION_NAME, job, store, log, poll_s, annotations_path=f"{prefix}/vlm-data",
                         chain=chain, base_source=base, run_name=f"job{job.id}", params=params, prompts=prompts)
    result["adapter"] = str(target)  # where it lives here, not the container's path
    log(f"LoRA trained in {result['seconds']:.0f} s on Modal; validation loss {result['val_loss_before']:.4f} -> "
        f"{result['val_loss_after']:.4f}; downloading {result['adapter_vol']}")
    target.mkdir(parents=True, exist_ok=True)
    for entry in volume.listdir(result["adapter_vol"], recursive=True):
        if entry.type != modal.volume.FileEntryType.FILE:
            continue
        local = target / Path(entry.path.lstrip("/")).relative_to(result["adapter_vol"])
        local.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "wb") as fh:
            for chunk in volume.read_file(entry.path):
                fh.write(chunk)
    return result


def cancel_remote(remote_id: str) -> None:
    """Stop the Modal call behind a cancelled job, so it does not keep an H100 busy."""
    import modal

    modal.FunctionCall.from_id(remote_id).cancel()
