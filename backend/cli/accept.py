"""`tandem accept`: auto-accept the tasks both models agree on, at a threshold calibrated on human-verified tasks.

The evidence is what Tandem stored: each task's pre-annotation and second opinion (`PredictionRepo`), and the
final human annotation of the tasks people reviewed. Calibration compares, on those reviewed tasks, the
regions both models agreed on with what the human kept (`agreement.verify`), preferring the queue's random
control picks (unbiased) when there are enough of them, and picks the threshold with a precision guarantee
(`calibration.calibrate`). Unlabeled tasks whose agreement passes it get fields and a saved view in Label
Studio, a random spot-check slice marked first; `--create-annotations` writes their agreed regions as
annotations marked `AUTO_MARKER`, recorded under TANDEM_HOME, which `--undo` deletes exactly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from backend.cli.common import Home, app, console, load_settings, reading_project, setup_logging, stdout_console
from backend.core.prediction import Prediction, Role


@dataclass
class TaskEvidence:
    """One task: what each model stored, what the human finally said, and how the task was picked."""

    task_id: int
    data: dict[str, Any]
    control_pick: bool = False
    shown: dict[str, Prediction] = field(default_factory=dict)  # model version -> its newest pre-annotation, as
    # annotators saw it (no faint boxes)
    shown_at: dict[str, float] = field(default_factory=dict)  # model version -> when that pre-annotation was stored
    # model version -> when Label Studio received its prediction for the task (what annotators can be shown;
    # `tandem select` stores predictions Label Studio never gets)
    in_label_studio: dict[str, float] = field(default_factory=dict)
    pre_latest: Prediction | None = None  # the newest pre-annotation, as shown
    pre_version: str | None = None
    second: Prediction | None = None  # the newest second opinion, its regions at the serving threshold
    size: tuple[int, int] | None = None  # (width, height) as the stored regions give it
    human: Prediction | None = None  # the newest finished annotation not written by auto-accept
    human_when: float = 0.0
    human_first: float = 0.0  # when a person first annotated the task: models made later may have learned it
    annotations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def labeled(self) -> bool:
        """A person finished it (auto-accept's own annotation does not count: re-running keeps those tasks)."""
        from active_learning.queue import is_auto_accepted

        return any(not a.get("was_cancelled") and not is_auto_accepted(a) for a in self.annotations)

    def auto_annotation(self) -> int | None:
        """The id of the task's annotation auto-accept wrote (still marked), if any."""
        from active_learning.queue import is_auto_accepted

        return next((int(a["id"]) for a in self.annotations if a.get("id") is not None and is_auto_accepted(a)), None)


@dataclass
class ProjectEvidence:
    project_id: int
    control: Any  # ControlSpec
    tasks: list[TaskEvidence]
    # reviewed tasks left out of the evidence: their annotation uses labels the config no longer has (task -> labels)
    renamed: dict[int, list[str]] = field(default_factory=dict)

    def renamed_note(self) -> str:
        """A line for the console, or "": the reviewed tasks left out for a label renamed since."""
        if not self.renamed:
            return ""
        import json

        labels = dict.fromkeys(label for found in self.renamed.values() for label in found)
        quoted = ", ".join(json.dumps(label, ensure_ascii=False) for label in labels)
        n = len(self.renamed)
        uses = "their annotations use" if n != 1 else "its annotation uses"
        return (f"{n} reviewed task{'s' * (n != 1)} left out: {uses} {quoted}, which control "
                f"'{self.control.name}' no longer has (renamed or removed since); relabel those regions in Label "
                "Studio to count them")


def _when(value: Any) -> float:
    if not value:
        return 0.0
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _size(item: Mapping[str, Any]) -> tuple[int, int] | None:
    for region in item.get("result") or []:
        if region.get("original_width") and region.get("original_height"):
            return int(region["original_width"]), int(region["original_height"])
    return None


def gather(tasks: Sequence[Mapping[str, Any]], label_config: str, rows, project_id: int,
           control_name: str | None = None, learned_at: Mapping[str, float] | None = None,
           second_versions: frozenset[str] = frozenset()) -> ProjectEvidence:
    """Label Studio tasks (with annotations) + stored rows -> the evidence per task, for one control.

    The control is `control_name`, else the first of the config that stored predictions fill. `learned_at` maps
    the model versions Tandem trained on project labels to when they were made: on a task a person had annotated
    by then, such a version's prediction is left out. It may have learned that very annotation, so agreeing
    with it proves nothing (a calibration on it would promise a precision the models do not have), and no
    annotator was shown it. Versions not in `learned_at` (hub, starter or bound weights) always count.
    `second_versions` are the project's second opinion now: their rows count as its, whatever role they were
    stored under (a VLM that pre-annotated the project before a CNN was bound beside it).
    """
    from active_learning.queue import CONTROL_PICK, is_auto_accepted
    from backend.convert.labelstudio import from_results, unknown_labels
    from backend.errors import ConfigError
    from backend.labeling.config import parse_label_config

    controls = parse_label_config(label_config).controls
    stored = {name for r in rows for name in r.controls}
    if control_name is not None:
        picked = [c for c in controls if c.name == control_name]
        if not picked:
            raise ConfigError(f"no control named {control_name!r} in project {project_id}'s labeling config "
                              f"(it has {', '.join(c.name for c in controls)})")
    else:
        picked = [c for c in controls if c.name in stored] or list(controls[:1])
    if not picked:
        raise ConfigError(f"project {project_id}'s labeling config has no control Tandem fills")
    control = picked[0]
    by_task: dict[int, TaskEvidence] = {}
    renamed: dict[int, list[str]] = {}
    for t in tasks:
        data = dict(t.get("data") or {})
        ev = TaskEvidence(int(t["id"]), data, data.get("tandem_pick") == CONTROL_PICK,
                          annotations=list(t.get("annotations") or []))
        for p in t.get("predictions") or []:
            if isinstance(p, Mapping) and p.get("model_version"):
                made = p.get("created_at")
                at = made.timestamp() if isinstance(made, datetime) else _when(made)
                ev.in_label_studio[str(p["model_version"])] = min(at, ev.in_label_studio.get(
                    str(p["model_version"]), at))
        human = [a for a in ev.annotations if not a.get("was_cancelled") and not is_auto_accepted(a)]
        if human:
            last = max(human, key=lambda a: (_when(a.get("updated_at") or a.get("created_at")), a.get("id") or 0))
            if gone := unknown_labels(last.get("result") or [], control):  # its objects would read as "missed"
                renamed[ev.task_id] = gone
                by_task[ev.task_id] = ev
                continue
            ev.human = from_results(last.get("result") or [], control)
            ev.human_when = _when(last.get("updated_at") or last.get("created_at"))
            ev.human_first = min(_when(a.get("created_at") or a.get("updated_at")) for a in human)
        by_task[ev.task_id] = ev
    learned_at = learned_at or {}
    for r in rows:  # oldest first: the newest row of each role wins
        ev = by_task.get(r.task_id)
        p = r.controls.get(control.name)
        if ev is None or p is None:
            continue
        made = learned_at.get(r.model_version)
        if made is not None and ev.human is not None and made >= ev.human_first:
            continue
        # agreement, calibration and the report read what each model showed (its regions at the serving
        # threshold): auto-accepting a task is accepting its pre-annotation unreviewed, and a faint candidate
        # below the threshold is no region of it
        if r.role == Role.SECOND_OPINION or r.model_version in second_versions:
            ev.second = as_shown(p, r.item, control)
        else:
            ev.shown[r.model_version] = as_shown(p, r.item, control)
            ev.shown_at[r.model_version] = r.created_at
            ev.pre_latest, ev.pre_version = ev.shown[r.model_version], r.model_version
            ev.size = _size(r.item) or ev.size
    return ProjectEvidence(project_id, control, list(by_task.values()), renamed)


def as_shown(p: Prediction, item: Mapping[str, Any], control) -> Prediction:
    """The regions annotators were shown: the stored item's result for this control. The typed prediction also
    keeps the candidates below the serving threshold (scoring reads them), which no one saw, kept or deleted.
    Choices are shown whole (the top choice), so their typed probabilities stand."""
    from backend.convert.labelstudio import from_results
    from backend.labeling.config import ControlKind

    if control.kind == ControlKind.CHOICES or p.detections is None:
        return p
    try:
        return from_results(item.get("result") or [], control)
    except ValueError:  # a region without its image size (not one Tandem wrote): the typed prediction stands
        return p


@dataclass(frozen=True)
class CalibrationData:
    scores: np.ndarray  # per agreed region of a reviewed candidate task: the task's agreement
    correct: np.ndarray
    source: str  # "control picks" or "every reviewed task"
    tasks: int  # reviewed tasks with both models' predictions
    control_tasks: int
    candidates: int  # of those, auto-accept candidates
    regions: int  # every final human region of the reviewed tasks (coverage's denominator)


def calibration_data(evidence: ProjectEvidence, iou: float = 0.5, min_items: int = 149) -> CalibrationData:
    """Verified items from reviewed tasks: the control picks alone when they give `min_items`, else all reviewed
    tasks (the active picks lean toward disagreement; the agreed ones among them are harder than average)."""
    from active_learning.agreement import verify

    def items(only_control: bool):
        scores, correct, tasks, candidates, regions = [], [], 0, 0, 0
        for ev in evidence.tasks:
            if ev.human is None or ev.pre_latest is None or ev.second is None or (only_control and not ev.control_pick):
                continue
            v = verify(ev.pre_latest, ev.second, ev.human, iou)
            tasks += 1
            det = ev.human.detections
            regions += 1 if v.verdict.kind == "choices" else (0 if det is None else len(det))
            if v.verdict.candidate:
                candidates += 1
                scores += [v.verdict.score] * len(v.correct)
                correct += v.correct.tolist()
        return np.array(scores, float), np.array(correct, bool), tasks, candidates, regions

    control = items(True)
    n_control = control[2]
    if len(control[0]) >= min_items:
        return CalibrationData(control[0], control[1], "control picks", n_control, n_control, control[3], control[4])
    s, c, n, cand, regions = items(False)
    return CalibrationData(s, c, "every reviewed task", n, n_control, cand, regions)


@dataclass(frozen=True)
class Accepted:
    task_id: int
    score: float
    regions: int
    prediction: Prediction  # the agreed regions (the pre-annotation's geometry)
    spot_check: bool = False


def plan(evidence: ProjectEvidence, threshold: float | None, iou: float = 0.5, spot_check: float = 0.05,
         seed: int = 0) -> tuple[list[Accepted], int]:
    """Unlabeled tasks whose agreement passes `threshold` (a random `spot_check` share marked, at least one);
    returns them and the number of candidates among unlabeled tasks."""
    from active_learning.agreement import agreed, task_agreement

    out, candidates = [], 0
    for ev in evidence.tasks:
        if ev.labeled or ev.pre_latest is None or ev.second is None:
            continue
        v = task_agreement(ev.pre_latest, ev.second, iou)
        candidates += v.candidate
        if v.accepted(threshold):
            out.append(Accepted(ev.task_id, v.score, v.matched, agreed(ev.pre_latest, v.match)))
    if out and spot_check > 0:
        rng = np.random.default_rng(seed)
        k = max(1, int(round(spot_check * len(out))))
        picked = set(rng.choice(len(out), size=min(k, len(out)), replace=False).tolist())
        out = [Accepted(a.task_id, a.score, a.regions, a.prediction, i in picked) for i, a in enumerate(out)]
    return out, candidates


def accept_fields(a: Accepted, bound: float | None, annotation_id: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"tandem_agreement": round(float(a.score), 6),
                           "tandem_bound": None if bound is None else round(float(bound), 6),
                           "tandem_auto": "spot-check" if a.spot_check else "auto-accepted",
                           "tandem_spot_check": int(a.spot_check)}
    if annotation_id is not None:
        out["tandem_auto_annotation"] = int(annotation_id)
    return out


def marked_results(a: Accepted, control, size: tuple[int, int] | None) -> list[dict[str, Any]]:
    """The agreed regions as Label Studio results, each carrying `AUTO_MARKER` in its meta."""
    from active_learning.queue import AUTO_MARKER
    from backend.convert.labelstudio import to_results

    regions = to_results(a.prediction, control, size)
    for r in regions:
        r["meta"] = {"text": [AUTO_MARKER]}
        r.pop("score", None)  # an annotation, not a prediction
    return regions


def record_path(home: Path, project_id: int) -> Path:
    return home / "auto-accept" / f"project-{project_id}.json"


def read_record(home: Path, project_id: int) -> dict[str, Any]:
    path = record_path(home, project_id)
    return json.loads(path.read_text()) if path.exists() else {"annotations": {}}


def write_record(home: Path, project_id: int, record: Mapping[str, Any]) -> None:
    path = record_path(home, project_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)


def _client(settings):
    from label_studio_sdk import LabelStudio

    if not settings.label_studio_url or not settings.label_studio_api_key:
        console.print("[red]error:[/] set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        raise typer.Exit(2)
    return LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key)


def no_second_opinion(evidence: ProjectEvidence) -> str | None:
    """Why auto-accept can never turn on, when no task of the project has a stored second opinion: no amount of
    labelling helps then, so say what does."""
    if any(ev.second is not None for ev in evidence.tasks):
        return None
    p = evidence.project_id
    return (f"auto-accept needs a second opinion, and no task of project {p} has one stored for control "
            f"'{evidence.control.name}' (on reviewed tasks, only one made before the review counts): serve one (`tandem serve --second-opinion MODEL`, or `tandem models bind "
            f"--project {p} --second-opinion MODEL`), then let it predict the tasks (`tandem select --project {p}` "
            "runs it on every task that lacks its prediction)")


def refuse_without_second_opinion(evidence: ProjectEvidence, queue) -> None:
    """Refuse, clearing what an earlier run wrote (as any refusal does: a guarantee that no longer holds must not
    stay on tasks)."""
    why = no_second_opinion(evidence)
    if why:
        cleared = queue.write_accepted({}, {e.task_id: e.data for e in evidence.tasks})["cleared"]
        queue.remove_auto_view()
        console.print(f"[red]refused:[/] {why}"
                      + (f". Auto-accept fields cleared from {cleared} task{'s' * (cleared != 1)}." if cleared else ""))
        raise typer.Exit(1)


def learned_versions(database_url: str, project: int) -> dict[str, float]:
    """Model version -> when Tandem made it from this project's labels (registered with a dataset; a version of
    no recorded project counts as this one's, to be safe)."""
    from backend.registry import Registry

    registry = Registry(database_url)
    try:
        return {v.version: v.created_at for v in registry.versions()
                if v.dataset and v.project_id in (None, project)}
    finally:
        registry.close()


def second_versions(database_url: str, project: int) -> frozenset[str]:
    """The versions of the model that is the project's second opinion now (its binding, else what served it)."""
    from backend.registry import Registry
    from backend.storage.projects import ProjectRepo

    state = ProjectRepo(database_url).get(project)
    spec = state and (state.second_opinion or state.served_second_opinion)
    if not spec:
        return frozenset()
    registry = Registry(database_url)
    try:
        return frozenset(v.version for v in registry.versions() if spec in (v.version, v.path))
    finally:
        registry.close()


def load_evidence(settings, project: int, control: str | None = None):
    """Read the project from Label Studio and the store; a failure is one clear line and exit 2."""
    from active_learning.queue import LabelStudioQueue
    from backend.storage.predictions import PredictionRepo

    queue = LabelStudioQueue(_client(settings), project)
    with reading_project(settings, project):
        tasks = queue.tasks()
        config = queue.label_config()
        rows = PredictionRepo(settings.database_url).for_project(project)
        return queue, gather(tasks, config, rows, project, control, learned_versions(settings.database_url, project),
                             second_versions(settings.database_url, project))


def undo(queue, home: Path, project: int, jobs=None) -> tuple[int, int, int, bool]:
    """Delete the annotations auto-accept created (recorded, and still marked), clear its fields and remove its
    view. Returns (deleted, kept because a person has since changed them, tasks whose fields were cleared,
    whether there was a view to remove). `jobs` (a JobStore): each deletion's webhook is expected there, so no
    server counts it as a person's correction."""
    from label_studio_sdk.core.api_error import ApiError

    from active_learning.queue import is_auto_accepted
    from backend.server.protocol import WebhookRequest

    record = read_record(home, project)
    deleted = kept = 0
    remaining = {}
    for task_id, annotation_id in record.get("annotations", {}).items():
        try:
            annotation = queue.client.annotations.get(id=int(annotation_id)).model_dump()
        except ApiError as exc:
            if exc.status_code == 404:  # deleted in Label Studio meanwhile: nothing to undo
                continue
            raise
        if is_auto_accepted(annotation):
            if jobs is not None:  # the key Label Studio's ANNOTATIONS_DELETED delivery will carry
                jobs.expect_delivery(WebhookRequest(action="ANNOTATIONS_DELETED", project=project,
                                                    annotations=[{"id": int(annotation_id)}]).event_key())
            queue.client.annotations.delete(id=int(annotation_id))
            deleted += 1
        else:
            kept += 1
            remaining[task_id] = annotation_id
    tasks = {t["id"]: t.get("data") or {} for t in queue.tasks()}
    cleared = queue.write_accepted({}, tasks)["cleared"]
    view = queue.remove_auto_view()
    write_record(home, project, {**record, "annotations": remaining, "undone_at": time.time()})
    return deleted, kept, cleared, view


@app.command()
def accept(
    project: Annotated[int, typer.Option("--project", "-p", help="Label Studio project id.")],
    create_annotations: Annotated[bool, typer.Option(
        help="Write the agreed regions as annotations (marked 'tandem auto-accept', undone by --undo).")] = False,
    undo_: Annotated[bool, typer.Option("--undo", help="Delete the annotations auto-accept created, clear its fields.")
                     ] = False,
    target: Annotated[float, typer.Option(help="Precision to guarantee for auto-accepted regions.")] = 0.98,
    delta: Annotated[float, typer.Option(help="Allowed probability that the guarantee fails.")] = 0.05,
    iou: Annotated[float, typer.Option(help="IoU at which two regions are the same region.")] = 0.5,
    spot_check: Annotated[float, typer.Option(help="Share of auto-accepted tasks marked for a human spot-check.")
                          ] = 0.05,
    control_name: Annotated[str | None, typer.Option("--control", help="The control to accept (default: the first "
                                                                       "Tandem fills).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the spot-check slice.")] = 0,
    home: Home = None,
) -> None:
    """Auto-accept the tasks both models agree on, with a precision guarantee calibrated on reviewed tasks."""
    from rich.table import Table

    from active_learning.calibration import calibrate, min_verified
    from active_learning.queue import AUTO_VIEW

    setup_logging("warning")
    settings = load_settings(home=home)
    if undo_:
        from active_learning.queue import LabelStudioQueue

        queue = LabelStudioQueue(_client(settings), project)
        from backend.training.jobs import JobStore

        deleted, kept, cleared, view = undo(queue, settings.home, project, JobStore(settings.database_url))
        console.print(f"undone: {deleted} auto-accepted annotation{'s' * (deleted != 1)} deleted"
                      + (f"; {kept} kept (changed by a person since)" if kept else "")
                      + f"; auto-accept fields cleared from {cleared} task{'s' * (cleared != 1)}"
                      + (f", view '{AUTO_VIEW}' removed" if view else f" (there was no view '{AUTO_VIEW}')"))
        return
    if not 0 < target < 1 or not 0 < delta < 1:
        raise typer.BadParameter("--target and --delta must be between 0 and 1")
    queue, evidence = load_evidence(settings, project, control_name)
    if note := evidence.renamed_note():
        console.print(f"[yellow]note:[/] {note}")
    refuse_without_second_opinion(evidence, queue)
    data = calibration_data(evidence, iou, min_verified(target, delta))
    cal = calibrate(data.scores, data.correct, target, delta)
    tasks = {e.task_id: e.data for e in evidence.tasks}
    record = read_record(settings.home, project)
    record["calibration"] = {"threshold": cal.threshold, "bound": cal.bound, "coverage": cal.coverage,
                             "n_verified": cal.n_verified, "needed": cal.needed, "reason": cal.reason,
                             "target": target, "delta": delta, "source": data.source, "at": time.time()}
    if not cal.on:  # a guarantee that no longer holds must not stay on tasks: clear earlier fields, drop the view
        cleared = queue.write_accepted({}, tasks)["cleared"]
        queue.remove_auto_view()
        write_record(settings.home, project, {**record, "calibration": {**record["calibration"], "accepted_tasks": 0,
                                                                         "accepted_regions": 0}})
        console.print(f"[red]refused:[/] {cal.reason}. Verified so far: {data.tasks} reviewed task"
                      f"{'s' * (data.tasks != 1)} with both models' predictions ({data.source}), "
                      f"{len(data.scores)} agreed region{'s' * (len(data.scores) != 1)}."
                      + (f" Auto-accept fields cleared from {cleared} task{'s' * (cleared != 1)}." if cleared else "")
                      + (" Earlier auto-accepted annotations stay until `tandem accept --undo`."
                         if record.get("annotations") else ""))
        raise typer.Exit(1)
    accepted, candidates = plan(evidence, cal.threshold, iou, spot_check, seed)
    created = reused = 0
    fields = {}
    by_id = {e.task_id: e for e in evidence.tasks}
    for a in accepted:
        ev = by_id[a.task_id]
        annotation_id = ev.auto_annotation()  # written by an earlier run: never a second one
        if annotation_id is not None:
            reused += 1
        elif create_annotations:
            result = marked_results(a, evidence.control, ev.size)
            annotation_id = queue.client.annotations.create(id=a.task_id, result=result, was_cancelled=False,
                                                            ground_truth=False).id
            created += 1
        if annotation_id is not None:
            record["annotations"][str(a.task_id)] = int(annotation_id)
        fields[a.task_id] = accept_fields(a, cal.bound, annotation_id)
    accepted_ids = {a.task_id for a in accepted}
    stale = sum(1 for e in evidence.tasks if e.task_id not in accepted_ids and e.auto_annotation() is not None)
    queue.write_accepted(fields, tasks)
    view = queue.ensure_auto_view()
    record["calibration"].update(accepted_tasks=len(accepted), accepted_regions=sum(a.regions for a in accepted))
    write_record(settings.home, project, record)

    table = Table(title=f"Auto-accept — project {project}, control '{evidence.control.name}'")
    table.add_column("")
    table.add_column("value")
    table.add_row("verified from", f"{data.source}: {data.tasks} reviewed task{'s' * (data.tasks != 1)} with both "
                                   f"models' predictions ({data.control_tasks} control picks), {len(data.scores)} "
                                   f"agreed region{'s' * (len(data.scores) != 1)}")
    table.add_row("threshold", "off" if cal.threshold is None else f"{cal.threshold:.3f}")
    table.add_row("false-accept bound", "—" if cal.bound is None else
                  f"≤ {cal.bound:.3f} at {1 - delta:.0%} confidence (precision ≥ {1 - cal.bound:.3f})")
    table.add_row("coverage (verified)", f"{cal.coverage:.0%} of agreed regions"
                  + (f", {cal.accepted / data.regions:.0%} of all final regions" if data.regions and cal.on else ""))
    table.add_row("auto-accepted now", f"{len(accepted)} of {candidates} candidate task{'s' * (candidates != 1)} "
                                       f"({sum(a.regions for a in accepted)} regions, "
                                       f"{sum(a.spot_check for a in accepted)} marked spot-check)")
    if create_annotations or reused:
        table.add_row("annotations", f"{created} created, {reused} kept from an earlier run, marked 'tandem auto-accept' "
                                     "(tandem accept --undo removes them)")
    if stale:
        table.add_row("no longer accepted", f"{stale} task{'s' * (stale != 1)} with an auto-accepted annotation now "
                                            "below the threshold (tandem accept --undo removes them)")
    stdout_console().print(table)
    console.print(cal.reason)
    console.print(f"Label Studio view: {AUTO_VIEW} (#{view})")


__all__ = ["Accepted", "CalibrationData", "ProjectEvidence", "TaskEvidence", "calibration_data", "gather", "plan"]
