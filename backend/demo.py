"""`tandem demo`: the whole loop on a laptop, offline, in a few minutes.

A local Label Studio, a project of generated shapes with known ground truth, Tandem serving a CNN with
a blind spot (it was never shown a triangle), pre-annotation through Label Studio's own "Retrieve predictions", a review queue ranked by
CNN-vs-second-opinion disagreement and uncertainty, a simulated annotator who corrects the queued tasks
from ground truth, a fine-tune job that must beat the CNN on the frozen split to be promoted, and a
re-score with the new model. No VLM weights exist offline, so the second opinion is a differently
trained YOLOv8n (another seed and input size); with `--vlm` (the VLM issue) it is a VLM.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import supervision as sv

from active_learning.pipeline import run_selection, write_queue
from active_learning.queue import LabelStudioQueue
from active_learning.selection import SelectionConfig, Strategy
from backend.convert.labelstudio import from_results, to_results
from backend.core.labels import LabelSpace
from backend.core.prediction import CLASS_NAME, Prediction
from backend.datasets.shapes import CLASS_NAMES, ShapeSample, generate_samples, write_yolo_dataset
from backend.dev.local_label_studio import ADMIN_EMAIL, start_label_studio, upload_images
from backend.dev.server_thread import ServerThread
from backend.labeling.config import parse_label_config
from backend.media.fetch import MediaFetcher, MediaSettings
from backend.models.starter import StarterRecipe, train_starter_model
from backend.models.yolo import YoloAdapter
from backend.server.app import create_app
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.training.evaluate import evaluate
from backend.training.export import ExportedDataset
from backend.training.runner import wait
from backend.training.service import TrainingPolicy

CONFIG = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="Square"/><Label value="Circle"/><Label value="Triangle"/></RectangleLabels></View>"""
CONTROL = parse_label_config(CONFIG).controls[0]
TRUTH_LABELS = LabelSpace.build(CONTROL, CLASS_NAMES)  # the generator's "square" is the config's "Square"
CNN_RECIPE = StarterRecipe("detect", epochs=8, classes=("square", "circle"))  # a blind spot: never saw a triangle
SECOND_RECIPE = StarterRecipe("detect", epochs=6, seed=1, imgsz=128)


@dataclass
class DemoSummary:
    images: int
    budget: int
    cnn_version: str = ""
    second_version: str = ""
    new_version: str = ""
    promoted: bool = False
    test_map50_before: float = 0.0
    test_map50_after: float = 0.0
    frozen_fitness_before: float = 0.0
    frozen_fitness_after: float = 0.0
    queued_active: int = 0
    queued_control: int = 0
    active_needed_correction: int = 0
    control_needed_correction: int = 0
    disagreement_before: list[float] = field(default_factory=list)
    disagreement_after: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    report: str = ""
    rounds: list[dict] = field(default_factory=list)  # backend.demo_rounds.RoundRecord per arm and round
    savings: dict = field(default_factory=dict)  # backend.demo_rounds.Savings, computed from `rounds`


def needs_correction(result: list[dict], truth: ShapeSample, min_iou: float = 0.5) -> bool:
    """Would an annotator have to touch this pre-annotation? Any missed, extra, misplaced or wrong box."""
    shown = from_results(result, CONTROL, (truth.width, truth.height)).detections
    if len(shown) != len(truth.objects):  # a box with a label outside the config counts as missing
        return True
    if not len(shown):
        return False
    iou = sv.box_iou_batch(np.array([o.box for o in truth.objects]), shown.xyxy)
    for i, obj in enumerate(truth.objects):
        j = int(iou[i].argmax())
        if iou[i, j] < min_iou or str(shown.data[CLASS_NAME][j]).lower() != obj.label:
            return True
    return False


def ground_truth_result(truth: ShapeSample) -> list[dict]:
    """The sample's objects as an annotation's result for CONFIG (what a careful annotator would save)."""
    objects = sv.Detections(xyxy=np.array([o.box for o in truth.objects], dtype=float).reshape(-1, 4),
                            confidence=np.ones(len(truth.objects)),
                            class_id=np.array([CLASS_NAMES.index(o.label) for o in truth.objects], dtype=int),
                            data={CLASS_NAME: np.array([o.label for o in truth.objects], dtype=object)})
    regions = to_results(Prediction(detections=objects, class_names=CLASS_NAMES), CONTROL,
                         (truth.width, truth.height), labels=TRUTH_LABELS)
    for region in regions:
        del region["score"]  # an annotation, not a prediction
    return regions


@dataclass(frozen=True)
class RoundsPlan:
    """The offline rounds after the live walk-through: Tandem's loop beside random labelling, same data."""

    rounds: int = 3
    images: int = 150
    budget: int = 20
    epochs: int = 10
    test_images: int = 60


def run_demo(
    home: Path, out: Path, images: int = 60, budget: int = 20, epochs: int = 30, step=print, progress=lambda *_: None,
    plan: RoundsPlan | None = RoundsPlan(), effort=None, label_studio_port: int | None = None,
    port: int | None = None,
) -> DemoSummary:
    """The demo end to end; `label_studio_port` and `port` (Tandem's) default to free ports on 127.0.0.1."""
    from label_studio_sdk import LabelStudio

    t_all = time.perf_counter()
    summary = DemoSummary(images=images, budget=budget)
    home.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    def timed(name: str, t0: float) -> None:
        summary.seconds[name] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    step("Starting a local Label Studio (installed once into its own uv tool environment)")
    ls = start_label_studio(home / "label-studio", port=label_studio_port)
    timed("label_studio_start", t0)
    try:
        t0 = time.perf_counter()
        step("Training a CNN that never saw a triangle, and a differently trained second opinion (offline)")
        cnn_path = train_starter_model(home / "cnn", "detect", CNN_RECIPE)
        second_path = train_starter_model(home / "second", "detect", SECOND_RECIPE)
        cnn = YoloAdapter(cnn_path, name="cnn", device="cpu")
        second = YoloAdapter(second_path, name="second-opinion", device="cpu", conf=0.1)
        summary.cnn_version, summary.second_version = cnn.version, second.version
        timed("models", t0)

        t0 = time.perf_counter()
        step(f"Creating a project with {images} generated images and a held-out test set (Label Studio at {ls.url}: "
             f"log in as {ADMIN_EMAIL}, password {ls.password}, to watch it while the demo runs)")
        pool = generate_samples(images, seed=20261123)
        truth = {f"{s.name}.png": s for _, s in pool}
        test_root = home / "test-set"
        if not test_root.exists():
            write_yolo_dataset(test_root, train=0, val=60, seed=4242)
        test_set = ExportedDataset(root=test_root, task="detect", class_names=["square", "circle", "triangle"],
                                   data=str(test_root / "data.yaml"))
        client = LabelStudio(base_url=ls.url, api_key=ls.token)
        project = client.projects.create(title="Tandem demo: shapes", label_config=CONFIG)
        upload_images(ls.url, ls.token, project.id, {name: _png(img) for (img, _), name in zip(pool, truth, strict=True)})
        timed("project", t0)

        settings = Settings(home=home / "tandem", label_studio_url=ls.url, label_studio_api_key=ls.token)
        app = create_app(settings, ModelHolder(cnn), policy=TrainingPolicy(
            train_after=10_000, params={"epochs": epochs, "imgsz": 160}))
        with ServerThread(app, port=port) as srv:
            t0 = time.perf_counter()
            step(f"Connecting Tandem ({srv.url}) as the project's ML backend and pre-annotating every task")
            client.ml.create(project=project.id, url=srv.url, title="Tandem", is_interactive=False)
            client.actions.create(id="retrieve_tasks_predictions", project=project.id,
                                  selected_items={"all": True, "excluded": []})
            timed("pre_annotate", t0)

            t0 = time.perf_counter()
            step(f"Ranking by CNN-vs-second-opinion disagreement and uncertainty; queueing {budget} for review")
            queue = LabelStudioQueue(client, project.id)
            tasks = queue.tasks()
            fetcher = MediaFetcher(MediaSettings(label_studio_url=ls.url, api_key=ls.token, cache_dir=home / "cache"))
            config = SelectionConfig(strategy=Strategy.HYBRID, budget=budget, control_fraction=0.2, seed=0)
            outcome, table, ids = run_selection(tasks, CONFIG, fetcher, cnn, config, second=second, progress=progress)
            write_queue(queue, outcome, tasks, run="demo-1")
            summary.disagreement_before = [round(float(v), 4) for v in table.disagreement]
            timed("select", t0)

            t0 = time.perf_counter()
            step("A simulated annotator reviews the queue, correcting pre-annotations from ground truth")
            names = {t["id"]: t["data"]["image"].rsplit("/", 1)[-1].split("-", 1)[-1] for t in tasks}
            for entry in outcome.entries:
                sample = truth[names[entry.task_id]]
                (pred,) = [p for p in client.predictions.list(task=entry.task_id) if p.model_version == cnn.version]
                wrong = needs_correction(pred.result, sample)
                if entry.control:
                    summary.queued_control += 1
                    summary.control_needed_correction += wrong
                else:
                    summary.queued_active += 1
                    summary.active_needed_correction += wrong
                client.annotations.create(id=entry.task_id, result=ground_truth_result(sample))
            timed("annotate", t0)

            t0 = time.perf_counter()
            step("Fine-tuning the CNN on the corrected labels (a separate process) and gating it on the frozen split")
            summary.test_map50_before = evaluate(cnn, test_set)["map50"]
            job = app.state.training.trigger(project.id, "demo: queue reviewed")
            job = wait(app.state.training.store, job.id, timeout=900)
            if job.status.value != "succeeded":
                raise RuntimeError(f"the training job failed: {job.error}")
            summary.new_version, summary.promoted = job.version or "", bool(job.promoted)
            summary.frozen_fitness_before = job.metrics["serving"]["fitness"]
            summary.frozen_fitness_after = job.metrics["candidate"]["fitness"]
            new_model = YoloAdapter(app.state.registry.get(job.version).path, device="cpu")
            summary.test_map50_after = evaluate(new_model, test_set)["map50"]
            timed("retrain", t0)

            t0 = time.perf_counter()
            step("Re-scoring the remaining tasks with the new model")
            if summary.promoted:
                deadline = time.monotonic() + 60
                while app.state.holder.adapter.version != job.version and time.monotonic() < deadline:
                    time.sleep(0.5)
                client.actions.create(id="retrieve_tasks_predictions", project=project.id,
                                      selected_items={"all": True, "excluded": []})
            tasks = queue.tasks()
            current = new_model if summary.promoted else cnn
            outcome2, table2, ids2 = run_selection(tasks, CONFIG, fetcher, current, config, second=second,
                                                   progress=progress)
            write_queue(queue, outcome2, tasks, run="demo-2")
            summary.disagreement_after = [round(float(v), 4) for v in table2.disagreement]
            timed("rescore", t0)

            if plan is not None and plan.rounds > 0:
                t0 = time.perf_counter()
                step(f"{plan.rounds} rounds of Tandem's loop (auto-accept + queue + retrain) beside random labelling, "
                     f"{plan.budget} reviewed tasks a round, every human action counted")
                run_savings(summary, home, cnn_path, second_path, plan, effort, progress=step)
                timed("rounds", t0)

            step(f"Writing the report to {out}")
            from backend.demo_report import write_report

            examples = [(truth[names[e.task_id]], pool_image(pool, names[e.task_id])) for e in outcome.entries[:4]]
            write_report(out, summary, examples, cnn, second)
            summary.report = str(out)
            app.state.sync.wait_idle(30)
    finally:
        ls.stop()
    summary.seconds["total"] = round(time.perf_counter() - t_all, 1)
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=1))
    return summary


def run_savings(summary: DemoSummary, home: Path, cnn_path: Path, second_path: Path, plan: RoundsPlan,
                effort=None, progress=lambda _: None) -> None:
    """Both arms' rounds on a generated pool (`backend.demo_rounds`); fills summary.rounds and summary.savings."""
    from active_learning.effort import EffortModel
    from backend.demo_rounds import LoopConfig, build_pool, run_rounds, savings

    pool = build_pool(home / "rounds", plan.images, plan.test_images, parent_recipe=CNN_RECIPE)
    config = LoopConfig(rounds=plan.rounds, budget=plan.budget, epochs=plan.epochs,
                        effort=effort or EffortModel.from_env())
    records = run_rounds(pool, str(cnn_path), str(second_path), home / "rounds" / "work", config, progress=progress)
    summary.rounds = [asdict(r) for r in records]
    summary.savings = asdict(savings(records))


def pool_image(pool, name):
    return next(img for img, s in pool if f"{s.name}.png" == name)


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["DemoSummary", "RoundsPlan", "needs_correction", "run_demo", "run_savings"]
