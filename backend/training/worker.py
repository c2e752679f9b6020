"""The body of one training job, run in its own process (`python -m backend.training.worker JOB_ID`).

A crash or an out-of-memory kill here never touches the server: the runner sees the exit code and
marks the job failed, and the server keeps serving what it served. The steps: export the project's
annotations, fine-tune from the serving weights, check the new weights load, score new and serving
models on the same frozen validation split, register the candidate, and promote it only if it is not
worse than the serving version by more than the margin.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

from backend.errors import TandemError  # noqa: E402
from backend.media.fetch import MediaFetcher  # noqa: E402
from backend.models.yolo import YoloAdapter, default_device  # noqa: E402
from backend.registry import Registry  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.training.evaluate import evaluate  # noqa: E402
from backend.training.export import export_yolo_dataset  # noqa: E402
from backend.training.jobs import JobStatus, JobStore  # noqa: E402
from backend.training.yolo_finetune import fine_tune  # noqa: E402

# Fine-tuning on a few dozen corrections (see yolo_finetune.py): AdamW, no warm-up, a step every batch.
DEFAULTS = {"epochs": 30, "imgsz": None, "batch": 16, "margin": 0.01, "val_percent": 20, "lr0": 0.001}


def log(message: str) -> None:
    print(f"[tandem {time.strftime('%H:%M:%S')}] {message}", flush=True)


def fetch_annotated_tasks(settings: Settings, project_id: int) -> tuple[list[dict], str]:
    from label_studio_sdk import LabelStudio

    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise TandemError("training needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to export annotations")
    client = LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key, timeout=120)
    label_config = client.projects.get(id=project_id).label_config
    raw = b"".join(client.projects.exports.download_sync(
        project_id, export_type="JSON", download_all_tasks=False, download_resources=False))
    return json.loads(raw), label_config


def train_local(serving_path: str, dataset, work: Path, params: dict) -> Path:
    return Path(fine_tune(serving_path, dataset.data, work, params, default_device())["weights"])


def run(job_id: int, settings: Settings) -> None:
    store, registry = JobStore(settings.db_path), Registry(settings.db_path)
    job = store.get(job_id)
    if job is None:
        raise SystemExit(f"no job {job_id}")
    if job.status is not JobStatus.QUEUED:
        raise SystemExit(f"job {job_id} is {job.status.value}, not queued")
    store.update(job_id, status=JobStatus.RUNNING, started_at=time.time(), pid=os.getpid())
    params = {**DEFAULTS, **job.params}
    work = settings.home / "jobs" / str(job_id)
    work.mkdir(parents=True, exist_ok=True)

    serving = registry.current()
    if serving is None or not serving.path or not Path(serving.path).is_file():
        raise TandemError("nothing to fine-tune from: serve a model first (its weights are the starting point)")
    log(f"job {job_id}: project {job.project_id}, fine-tuning {serving.version} ({job.reason})")

    tasks, label_config = fetch_annotated_tasks(settings, job.project_id)
    log(f"exporting {len(tasks)} annotated tasks")
    dataset = export_yolo_dataset(tasks, label_config, job.project_id, MediaFetcher(settings.media()),
                                  work / "dataset", val_percent=params["val_percent"])
    log(f"dataset {dataset.snapshot}: {dataset.train} train / {dataset.val} frozen val, {len(dataset.skipped)} skipped")
    if dataset.train == 0 or dataset.val == 0:
        raise TandemError(f"too few annotations: {dataset.train} train and {dataset.val} validation images "
                          "(the validation split is a fixed ~20% of tasks)")
    if serving.task != dataset.task:
        raise TandemError(f"the serving model is a {serving.task} model but the project needs {dataset.task}")

    if job.runner == "modal":
        from infra.modal_runner import train_on_modal

        weights = train_on_modal(job, serving.path, dataset, work, params, log, store=store)
    else:
        weights = train_local(serving.path, dataset, work, params)
    stem = f"p{job.project_id}-job{job_id}"
    target = settings.home / "models" / "versions" / f"{stem}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, target)

    log("scoring candidate and serving model on the frozen validation split")
    candidate = YoloAdapter(target, name=stem, device=settings.device)  # a corrupt file fails here: never promoted
    new = evaluate(candidate, dataset)
    old = evaluate(YoloAdapter(serving.path, device=settings.device), dataset)
    metrics = {"candidate": new, "serving": old, "serving_version": serving.version, "dataset": dataset.snapshot,
               "train": dataset.train, "val": dataset.val}
    registry.add_candidate(candidate.version, stem, candidate.task.value, str(target), serving.version,
                           dataset.snapshot, metrics)
    promote = new["fitness"] >= old["fitness"] - params["margin"]
    registry.set_status(candidate.version, "promoted" if promote else "rejected")
    verdict = "promoted" if promote else f"rejected (worse than {serving.version} by more than {params['margin']})"
    log(f"{candidate.version}: fitness {new['fitness']:.4f} vs {old['fitness']:.4f} -> {verdict}")
    store.finish(job_id, JobStatus.SUCCEEDED, version=candidate.version, promoted=int(promote), metrics=metrics)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    job_id = int(args[0])
    settings = Settings.from_env()
    try:
        run(job_id, settings)
        return 0
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
        traceback.print_exc()
        JobStore(settings.db_path).finish(job_id, JobStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
