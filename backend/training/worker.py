"""The body of one training job, run in its own process (`python -m backend.training.worker JOB_ID`).

A crash or an out-of-memory kill here never touches the server: the runner sees the exit code and
marks the job failed, and the server keeps serving what it served. The steps: export the project's
annotations, fine-tune from the serving weights, check the new weights load, score new and serving
models on the same frozen validation split, register the candidate, and promote it only if it is not
worse than the serving version by more than the margin.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

from backend.errors import TandemError  # noqa: E402
from backend.labeling.config import parse_label_config  # noqa: E402
from backend.media.fetch import MediaFetcher  # noqa: E402
from backend.models.yolo import YoloAdapter, default_device  # noqa: E402
from backend.registry import Registry  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.storage.projects import ProjectRepo  # noqa: E402
from backend.training.evaluate import gate_scores  # noqa: E402
from backend.training.export import (  # noqa: E402
    MIN_VAL_TASKS,
    TASK_FOR_CONTROL,
    TOP_UP_FROM,
    add_replay,
    export_yolo_dataset,
)
from backend.training.jobs import JobStatus, JobStore  # noqa: E402
from backend.storage.artifacts import ArtifactStore, localise  # noqa: E402
from backend.storage.migrate import SchemaTooNew  # noqa: E402
from backend.training.lease import keep_worker_lease  # noqa: E402
from backend.training.replay import FEW_IMAGES, choose_schedule, gather_replay, unlabelled_images  # noqa: E402
from backend.training.yolo_finetune import fine_tune  # noqa: E402

# Fine-tuning on a few dozen corrections (see yolo_finetune.py): AdamW, no warm-up, a step every batch.
DEFAULTS = {"epochs": 30, "imgsz": None, "batch": 16, "margin": 0.01, "val_percent": 20, "lr0": 0.001}
# mAP integrates over every confidence, as ultralytics' own val does (conf 0.001): scored at the serving
# threshold, a fine-tune whose confidences dropped below 0.25 scores 0 however well it localises
EVAL_CONF = 0.001
METRIC_NAMES = {"map50": "mAP50", "map50_95": "mAP50-95", "top1": "top-1"}
FEW_VAL_IMAGES = 5  # below this the frozen split's mAP moves by a whole image's worth: say so in the log



def log_skipped(log, skipped: dict[int, str], most: int = 5) -> None:
    """Which annotated tasks a job left out and why (an unreadable image, a renamed label), the first few."""
    for task_id, why in list(skipped.items())[:most]:
        log(f"  task {task_id} skipped: {why}")
    if len(skipped) > most:
        log(f"  … and {len(skipped) - most} more (tandem_export.json in the job's dataset lists them all)")

def asked_options(params: dict, defaults: dict) -> dict:
    """What a job asked for beyond the server's defaults (an automatic trigger asks for nothing)."""
    return {k: v for k, v in (params or {}).items() if defaults.get(k, DEFAULTS.get(k)) != v}


def other_options(asked: dict, earlier: dict | None) -> dict:
    """The options a follow-up asked for (not None) that differ from those the version before it was trained
    with: a request for other epochs on the same data is run, not skipped as "nothing new". Unknown earlier
    options (a version from before they were recorded) count as the same."""
    if not earlier:
        return {}
    return {k: v for k, v in (asked or {}).items() if v is not None and k in DEFAULTS and earlier.get(k) != v}


def log(message: str) -> None:
    print(f"[tandem {time.strftime('%H:%M:%S')}] {message}", flush=True)


EXPORT_TIMEOUT_S = 120  # per request to Label Studio; a big project's export is one request
WAIT_LINE_S = 30.0  # how often a job's log says it is still waiting for Label Studio


@contextmanager
def still_waiting(what: str, limit_s: float, every_s: float | None = None):
    """A line every `every_s` while a call blocks: a job's log that says nothing for two minutes looks hung."""
    done = threading.Event()
    start, every_s = time.monotonic(), every_s or WAIT_LINE_S

    def tick() -> None:
        while not done.wait(every_s):
            log(f"{what} ({time.monotonic() - start:.0f} s; each request gives up after {limit_s:.0f} s)")

    ticker = threading.Thread(target=tick, name="still-waiting", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


def fetch_annotated_tasks(settings: Settings, project_id: int) -> tuple[list[dict], str, dict[str, str]]:
    """The project's annotated tasks, its labeling config, and its label map as /setup is given it."""
    from label_studio_sdk import LabelStudio

    from backend.labelstudio.extra_params import project_extra

    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise TandemError("training needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to export annotations")
    client = LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key,
                         timeout=EXPORT_TIMEOUT_S)
    log(f"asking Label Studio ({settings.label_studio_url}) for project {project_id}'s annotations")
    try:
        with still_waiting(f"still waiting for Label Studio's export of project {project_id}", EXPORT_TIMEOUT_S):
            label_config = client.projects.get(id=project_id).label_config
            raw = b"".join(client.projects.exports.download_sync(
                project_id, export_type="JSON", download_all_tasks=False, download_resources=False))
            label_map = {**settings.label_map, **project_extra(client, project_id, "label_map")}
    except Exception as exc:  # the SDK's errors: unreachable, wrong key, no such project
        from backend.labelstudio.errors import describe

        raise TandemError(f"cannot export project {project_id}: {describe(exc, settings.label_studio_url)}") from exc
    return json.loads(raw), label_config, label_map


def train_local(serving_path: str, dataset, work: Path, params: dict) -> Path:
    return Path(fine_tune(serving_path, dataset.data, work, params, default_device())["weights"])


def gate(new: float, old: float, margin: float, serving: str) -> tuple[bool, str]:
    """Promote when not worse than the serving model by more than `margin`, but never a candidate that scores
    nothing: a 0-vs-0 tie on a few validation images says the retrain learned nothing checkable."""
    if new <= 0:
        return False, "rejected (it scores 0 on the frozen split: none of its predictions match the corrections)"
    if new < old - margin:
        return False, f"rejected (worse than {serving} by more than {margin})"
    if new <= old:  # said: next to "cannot tell differences … from noise" a bare "promoted" reads as a contradiction
        return True, (f"promoted (not worse than {serving} on the frozen split; on a tie the newer model, which "
                      "learned the latest corrections, serves)")
    return True, "promoted"


def scoring_adapter(weights: Path, device: str | None, name: str | None = None) -> YoloAdapter:
    """The model as the promotion gate scores it: every box, whatever its confidence (EVAL_CONF)."""
    return YoloAdapter(weights, name=name, device=device, conf=EVAL_CONF)


def project_parent(settings: Settings, registry: Registry, project_id: int, kind: str):
    """The version a job on this project fine-tunes: its binding, else what the server last served it, else the
    server-wide one. A bound weights file the registry has not seen is recorded (as the project's) first."""
    state = ProjectRepo(settings.database_url).get(project_id)
    if state is not None:
        spec = (state.model or state.served_model) if kind == "cnn" else (
            state.second_opinion or state.served_second_opinion)
        found = registry.resolve(spec)
        if found is not None and found.kind == kind:
            return found
        if spec and kind == "cnn" and Path(spec).is_file():
            from backend.models.yolo import file_digest

            version = f"{Path(spec).stem}-{file_digest(Path(spec))}"
            task = YoloAdapter(spec, device="cpu", engine="torch").task.value
            registry.add_candidate(version, Path(spec).stem, task, spec, None, "", {}, project_id=project_id)
            registry.set_status(version, "bound")
            return registry.get(version)
    return registry.current(kind)


def vlm_base(settings: Settings, registry: Registry, project_id: int):
    """(the registry version, the weights) a LoRA job on this project adapts; a ConfigError when there is no
    VLM to adapt (checked before a job is opened, and again by the job)."""
    from backend.errors import ConfigError

    serving = project_parent(settings, registry, project_id, "vlm")
    base = localise(settings, serving.path) if serving and serving.path else settings.vlm
    if not base:
        raise ConfigError(f"nothing to fine-tune with --model vlm on project {project_id}: no VLM serves it; serve "
                          "one (tandem serve --vlm ID_OR_PATH, or tandem models bind --project ID --second-opinion "
                          "VLM) or set TANDEM_VLM")
    return serving, base


def run(job_id: int, settings: Settings) -> None:
    store, registry = JobStore(settings.database_url), Registry(settings.database_url)
    job = store.get(job_id)
    if job is None:
        raise SystemExit(f"no job {job_id}")
    keep_worker_lease(store, job_id)  # heartbeats while this process runs; a cancel stops it
    if not store.start(job_id, pid=os.getpid()):  # queued -> running, or someone else got there first
        raise SystemExit(f"job {job_id} is {store.get(job_id).status.value}, not queued")
    work = settings.home / "jobs" / str(job_id)
    work.mkdir(parents=True, exist_ok=True)
    if job.model_kind == "vlm":
        return run_vlm(job, settings, store, registry, work)
    params = {**DEFAULTS, **job.params}

    artifacts = ArtifactStore.from_settings(settings)
    serving = project_parent(settings, registry, job.project_id, "cnn")
    parent_weights = artifacts.local_path(serving.path) if serving is not None and serving.path else None
    if parent_weights is None or not parent_weights.is_file():
        raise TandemError("nothing to fine-tune from: serve a model first (its weights are the starting point)")
    log(f"job {job_id}: project {job.project_id}, fine-tuning {serving.version} ({job.reason})")

    tasks, label_config, label_map = fetch_annotated_tasks(settings, job.project_id)
    control = parse_label_config(label_config).controls[0]  # the control the export reads
    needed = TASK_FOR_CONTROL[control.kind]
    if serving.task != needed:  # said before minutes of image downloads, not after
        raise TandemError(f"the serving model {serving.version} is a {serving.task} model, but project "
                          f"{job.project_id}'s {control.kind} control '{control.name}' needs a {needed} model: bind "
                          f"one to this project (tandem models bind --project {job.project_id} --model WEIGHTS; "
                          f"`tandem train-starter --task {needed}` makes one)")
    log(f"exporting {len(tasks)} annotated tasks")
    dataset = export_yolo_dataset(tasks, label_config, job.project_id, MediaFetcher(settings.media()),
                                  work / "dataset", val_percent=params["val_percent"],
                                  auto_accepted=bool(params.get("auto_accepted", settings.train_auto_accepted)))
    log(f"dataset {dataset.snapshot}: {dataset.train} train / {dataset.val} frozen val, {len(dataset.skipped)} skipped")
    log_skipped(log, dataset.skipped)
    if dataset.auto_accepted or dataset.auto_left_out:
        log(f"auto-accepted tasks: {dataset.auto_accepted} in training, {dataset.auto_left_out} left out (never in the "
            "frozen split; TANDEM_TRAIN_AUTO_ACCEPTED=1 trains on them)")
    if dataset.train == 0 or dataset.val == 0:
        raise TandemError(f"project {job.project_id} has {dataset.train + dataset.val} usable annotated tasks "
                          f"({dataset.train} train, {dataset.val} validation): a retrain needs at least one of each. "
                          f"The frozen validation split is a fixed ~{params['val_percent']}% of tasks, and at least "
                          f"{MIN_VAL_TASKS} once {TOP_UP_FROM} tasks are annotated: annotate that many or more")
    if job.reason.startswith("coalesced"):  # a follow-up for corrections the job before it may already have had
        earlier = registry.trained_on(dataset.snapshot, serving.version)
        asked = asked_options(job.params, settings.training_params())
        other = {} if earlier is None else other_options(asked, earlier.metrics.get("params"))
        if earlier is not None and not other:
            log(f"nothing new since {earlier.version} (made from {earlier.parent} on this same dataset, "
                f"{dataset.snapshot}); not retrained")
            store.finish(job_id, JobStatus.SUCCEEDED, metrics={"skipped": f"same dataset as {earlier.version}",
                                                                "dataset": dataset.snapshot})
            return
        if other:
            log(f"same dataset as {earlier.version}, other options ("
                + ", ".join(f"{k}={v}" for k, v in sorted(other.items())) + "): retraining")
    if dataset.val < FEW_VAL_IMAGES:
        log(f"only {dataset.val} frozen validation images: the promotion verdict below is noisy — annotate more "
            "tasks before trusting it")
    if dataset.task == "classify" and len(present := dataset.val_classes()) < len(dataset.class_names):
        log(f"the frozen split has images of {len(present)} of the {len(dataset.class_names)} classes "
            f"({', '.join(present) or 'none'}): ultralytics' dataset check below logs this as an ERROR "
            f"(\"requires {len(dataset.class_names)} classes\"); it does not stop the job, and the gate scores "
            "top-1 on the images there are")
    # the export as it is (before any replay), where every replica can replay it from as this version's data
    dataset_uri = artifacts.put_dataset(dataset.root, job.project_id, dataset.snapshot)
    log(f"dataset stored at {dataset_uri}")
    # replay what the parent knew, and the schedule measured for it (backend/training/replay.py)
    items, said = gather_replay(
        dataset, serving.metrics, serving.name, settings.home,
        lambda: YoloAdapter(parent_weights, device=settings.device),
        lambda exclude, count: unlabelled_images(settings, job.project_id, control.image_key, exclude, count),
        label_map=label_map, seed=job_id)
    replayed = add_replay(dataset, items) if items else 0
    if said:
        log(said)
    elif dataset.task == "classify" and dataset.train < FEW_IMAGES:
        log(f"{dataset.train} corrections: a classify fine-tune replays nothing and trains the whole network (the "
            "few-corrections schedule is measured for boxes only: benchmarks/results/finetune_small.md); the gate "
            "judges the result as always")
    schedule = choose_schedule(params, dataset.train, replayed, dataset.task)
    if schedule.reason:
        log(schedule.reason)
    params = schedule.params

    if job.runner == "modal":
        from infra.modal_runner import train_on_modal

        weights = train_on_modal(job, str(parent_weights), dataset, work, params, log, store=store)
    else:
        weights = train_local(str(parent_weights), dataset, work, params)
    stem = f"p{job.project_id}-job{job_id}"
    target = work / f"{stem}.pt"
    shutil.copyfile(weights, target)

    log("scoring candidate and serving model on the frozen validation split")
    candidate = scoring_adapter(target, settings.device, name=stem)  # a corrupt file fails here: never promoted
    # both through the project's label map, as they are served: else a parent mapped "square" -> "Box" scores 0
    scored = {"label_map": label_map, "case_sensitive": settings.case_sensitive_labels}
    scores = gate_scores(candidate, scoring_adapter(parent_weights, settings.device), dataset, params["margin"],
                         **scored)
    new, old, resolution = scores.candidate, scores.serving, scores.resolution
    if said := scores.describe_metric(serving.version):
        log(said)
    if resolution is not None:
        log(f"what the gate can resolve: {resolution.describe()}")
    metrics = {"candidate": new, "serving": old, "serving_version": serving.version, "dataset": dataset.snapshot,
               "gate_metric": scores.metric, "copied_share": round(scores.copied, 4),
               "unchanged_share": round(scores.unchanged, 4),
               "params": {k: params.get(k) for k in DEFAULTS},  # what a follow-up on the same data compares
               "train": dataset.train, "val": dataset.val, "replay": replayed, "dataset_root": str(dataset.root),
               "dataset_uri": dataset_uri,
               "gate_resolution": None if resolution is None else asdict(resolution)}
    uri = artifacts.put(target, "models", "versions", f"{stem}.pt")  # where every replica can load it from
    registry.add_candidate(candidate.version, stem, candidate.task.value, uri, serving.version,
                           dataset.snapshot, metrics, project_id=job.project_id)
    promote, verdict = gate(new["fitness"], old["fitness"], params["margin"], serving.version)
    registry.set_status(candidate.version, "promoted" if promote else "rejected")
    if promote:  # into this project's binding only: other projects keep their models
        ProjectRepo(settings.database_url).update(job.project_id, model=candidate.version)
    log(f"{candidate.version}: fitness ({METRIC_NAMES[scores.metric]}) {new['fitness']:.4f} vs {old['fitness']:.4f} "
        f"-> {verdict}")
    store.finish(job_id, JobStatus.SUCCEEDED, version=candidate.version, promoted=int(promote), metrics=metrics)


def run_vlm(job, settings: Settings, store: JobStore, registry: Registry, work: Path) -> None:
    """LoRA on the serving VLM (or TANDEM_VLM): promoted when its answers' loss on the frozen split is not worse."""
    from backend.models.vlm.generative import GenerativeVlm
    from backend.models.vlm.loader import load_vlm
    from backend.predict import registry_task
    from backend.training.vlm_examples import collect_annotations, to_examples
    from backend.training.vlm_lora import DEFAULTS as LORA_DEFAULTS
    from backend.training.vlm_lora import lora_fine_tune, mean_loss

    known = {*LORA_DEFAULTS, "margin", "val_percent"}
    params = {**LORA_DEFAULTS, "margin": 0.0, "val_percent": 20,
              **{k: v for k, v in job.params.items() if k in known and v is not None}}
    serving, base = vlm_base(settings, registry, job.project_id)
    log(f"job {job.id}: project {job.project_id}, LoRA on {serving.version if serving else base} ({job.reason})")
    tasks, label_config, _ = fetch_annotated_tasks(settings, job.project_id)
    annotated = collect_annotations(tasks, label_config, job.project_id, MediaFetcher(settings.media()),
                                    val_percent=params["val_percent"])
    n_val = sum(item.validation for item in annotated.items)
    log(f"annotations {annotated.snapshot}: {len(annotated.items) - n_val} train / {n_val} frozen val, "
        f"{len(annotated.skipped)} skipped")
    log_skipped(log, annotated.skipped)
    if n_val == 0 or n_val == len(annotated.items):
        raise TandemError(f"too few annotations: {len(annotated.items) - n_val} train and {n_val} validation images "
                          "(the validation split is a fixed ~20% of tasks)")
    stem = f"p{job.project_id}-job{job.id}-lora"
    target = work / stem

    if job.runner == "modal":
        from infra.modal_runner import train_vlm_on_modal

        result = train_vlm_on_modal(job, base, annotated.save(work / "vlm-data"), target, params,
                                    settings.vlm_prompts, log, store=store)
        candidate = load_vlm(str(target), device=settings.device)  # a broken adapter fails here: never promoted
        after = result["val_loss_after"]  # measured on the H100 with the same code, on the same frozen split
    else:
        vlm = load_vlm(base, device=settings.device)
        if not isinstance(vlm, GenerativeVlm):
            raise TandemError(f"{vlm.name} is a {vlm.family}; LoRA fine-tuning applies to generative VLMs "
                              "(Qwen2.5-VL, Florence-2, PaliGemma, LLaVA, SmolVLM)")
        data = to_examples(annotated, vlm, settings.vlm_prompts)
        if not data.train or not data.val:
            raise TandemError(f"too few annotations: {len(data.train)} train and {len(data.val)} validation examples")
        result = lora_fine_tune(vlm, data.train, data.val, target, base_source=base, params=params, log=log)
        result.update(train=len(data.train), val=len(data.val))
        candidate = load_vlm(str(target), device=settings.device)  # a broken adapter fails here: never promoted
        after = mean_loss(candidate, data.val, int(params["batch"]))
    before = result["val_loss_before"]
    metrics = {"candidate": {"val_loss": after}, "serving": {"val_loss": before}, "serving_version": base,
               "dataset": annotated.snapshot, "train": result["train"], "val": result["val"], "lora": result}
    uri = ArtifactStore.from_settings(settings).put(target, "models", "vlm", stem)
    registry.add_candidate(candidate.version, stem, registry_task(candidate), uri,
                           serving.version if serving else None, annotated.snapshot, metrics, project_id=job.project_id)
    promote = after <= before + params["margin"]
    registry.set_status(candidate.version, "promoted" if promote else "rejected")
    if promote:
        ProjectRepo(settings.database_url).update(job.project_id, second_opinion=candidate.version)
    log(f"{candidate.version}: validation loss {after:.4f} vs {before:.4f} -> {'promoted' if promote else 'rejected'}")
    store.finish(job.id, JobStatus.SUCCEEDED, version=candidate.version, promoted=int(promote), metrics=metrics)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    job_id = int(args[0])
    settings = Settings.from_env()
    try:
        run(job_id, settings)
        return 0
    except TandemError as exc:  # expected (no labels, Label Studio down...): one line, no traceback
        print(f"error: {exc}", flush=True)
        if isinstance(exc, SchemaTooNew):  # this release cannot write the job: the lease expiry fails it
            return 1
        JobStore(settings.database_url).finish(job_id, JobStatus.FAILED, error=str(exc))
        return 1
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
        line = disk_failure(exc, settings.home)
        if line:  # a full or read-only disk is the operator's to fix, not a bug: one line, no traceback
            print(f"error: {line}", flush=True)
        else:
            traceback.print_exc()
        try:
            JobStore(settings.database_url).finish(job_id, JobStatus.FAILED,
                                                   error=line or f"{type(exc).__name__}: {exc}")
        except Exception as db_exc:  # noqa: BLE001 - the same full disk may refuse the database: the lease expiry
            print(f"error: the job could not be marked failed ({db_exc}); it is failed when its lease runs out",
                  flush=True)  # fails it (every runner reaps expired leases)
        return 1


# what a refused write means for the operator; EACCES, EPERM and EROFS only with a file named (sockets and
# signals raise them too)
_DISK = {errno.ENOSPC: "free space", errno.EDQUOT: "free space (a quota is full)", errno.EFBIG: "raise the file-size "
         "limit (ulimit -f)", errno.EROFS: "make it writable", errno.EACCES: "fix its permissions",
         errno.EPERM: "fix its permissions"}
_NEEDS_FILE = {errno.EROFS, errno.EACCES, errno.EPERM}
# torch.save's writer reports a refused write only as its own assertion ("file write failed" on a full disk,
# "unexpected pos" past a file-size limit)
_TORCH_WRITER = ("file write failed", "unexpected pos")


def disk_failure(exc: BaseException, home: Path) -> str | None:
    """One line for a write the disk refused (full, read-only, no permission), found anywhere in the chain of
    causes, torch.save's included; it names the folder of the file when there is one, else TANDEM_HOME. None
    for anything else (that keeps its traceback)."""
    seen: BaseException | None = exc
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError) and seen.errno in _DISK and (seen.filename or seen.errno not in _NEEDS_FILE):
            where = Path(seen.filename).parent if seen.filename else f"{home} (TANDEM_HOME)"
            named = f" ({seen.filename})" if seen.filename else ""
            return (f"{seen.strerror or os.strerror(seen.errno)}{named}: {_DISK[seen.errno]} under {where} and "
                    "retrain; the server keeps serving the model it had")
        if isinstance(seen, RuntimeError) and "PytorchStreamReader" not in str(seen) \
                and any(w in str(seen) for w in _TORCH_WRITER):
            return (f"writing the model failed ({str(seen).splitlines()[0].strip()[:200]}): check free space and "
                    f"file-size limits under {home} (TANDEM_HOME) and retrain; the server keeps serving the model "
                    "it had")
        seen = seen.__cause__ or seen.__context__
    return None


if __name__ == "__main__":
    raise SystemExit(main())
