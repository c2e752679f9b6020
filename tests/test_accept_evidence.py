"""Which stored predictions count as evidence against a human annotation (`backend.cli.accept.gather`).

A model Tandem trained after a person annotated a task may have learned that annotation: its agreement there is
train-set agreement, so calibrating on it would promise a precision the models do not have, and the telemetry
would credit it with edits no annotator saw. Built from plain Label Studio task dicts and stored rows; the
registry part uses a real SQLite registry.
"""

from __future__ import annotations

from backend.cli.accept import calibration_data, gather, learned_versions, plan
from backend.cli.report import project_edits
from backend.convert.labelstudio import from_results
from backend.core.prediction import Role
from backend.labeling.config import parse_label_config
from backend.registry import Registry
from backend.storage.predictions import PredictionRow

CFG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
       '<Choice value="cat"/><Choice value="dog"/></Choices></View>')
CONTROL = parse_label_config(CFG).controls[0]
T0 = 1_700_000_000.0  # the annotations' epoch seconds below are T0 + 10 and T0 + 30
OLD, TRAINED, VLM, VLM_LORA = "cnn-old", "cnn-retrained", "vlm", "vlm-lora"


def choice(label: str, score: float = 0.9) -> list[dict]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]},
             "score": score}]


def row(task_id: int, version: str, role: Role, label: str) -> PredictionRow:
    res = choice(label)
    return PredictionRow(task_id, version, "fp", 1, version, str(role), {"result": res, "model_version": version},
                         {"label": from_results(res, CONTROL)})


def task(task_id: int, human: str | None, at: float | None = None) -> dict:
    from datetime import UTC, datetime

    out: dict = {"id": task_id, "data": {"image": f"https://example.invalid/{task_id}.png"}, "annotations": []}
    if human is not None:
        when = datetime.fromtimestamp(T0 + at, UTC).isoformat().replace("+00:00", "Z")
        out["annotations"] = [{"id": 100 + task_id, "result": choice(human), "was_cancelled": False,
                               "created_at": when, "updated_at": when}]
    return out


# task 1, a person said "cat" at T0+10. The old CNN and the VLM both said "dog" (agreed, wrong: what the annotator
# was shown); the CNN retrained at T0+20 on the labels says "cat". Task 2 was annotated at T0+30, after the
# retrain: its prediction was made without that label. Task 3 has no annotation. Task 4's only second opinion
# comes from a VLM LoRA made at T0+20, after its annotation at T0+10.
TASKS = [task(1, "cat", 10), task(2, "dog", 30), task(3, None), task(4, "cat", 10)]
ROWS = [row(1, OLD, Role.PRE_ANNOTATION, "dog"), row(1, VLM, Role.SECOND_OPINION, "dog"),
        row(2, OLD, Role.PRE_ANNOTATION, "cat"), row(2, VLM, Role.SECOND_OPINION, "dog"),
        row(3, OLD, Role.PRE_ANNOTATION, "cat"), row(3, VLM, Role.SECOND_OPINION, "cat"),
        row(4, OLD, Role.PRE_ANNOTATION, "cat"), row(4, VLM_LORA, Role.SECOND_OPINION, "cat"),
        # newest last, as PredictionRepo.for_project returns them
        row(1, TRAINED, Role.PRE_ANNOTATION, "cat"), row(2, TRAINED, Role.PRE_ANNOTATION, "dog"),
        row(3, TRAINED, Role.PRE_ANNOTATION, "dog")]
LEARNED = {TRAINED: T0 + 20, VLM_LORA: T0 + 20}


def by_id(evidence) -> dict:
    return {ev.task_id: ev for ev in evidence.tasks}


def test_a_model_made_after_the_annotation_is_not_evidence_for_it():
    ev = by_id(gather(TASKS, CFG, ROWS, 1, learned_at=LEARNED))
    assert set(ev[1].shown) == {OLD} and ev[1].pre_version == OLD  # what the annotator was shown
    assert set(ev[2].shown) == {OLD, TRAINED} and ev[2].pre_version == TRAINED  # made before the label existed
    assert ev[3].pre_version == TRAINED  # unlabelled: the newest model pre-annotates it
    assert ev[4].second is None  # the LoRA that learned task 4 is its only second opinion
    data = calibration_data(gather(TASKS, CFG, ROWS, 1, learned_at=LEARNED), min_items=1)
    # task 1: agreed on "dog", a person said "cat" -> one wrong item; task 2: TRAINED "dog" vs VLM "dog", right
    assert sorted(data.correct.tolist()) == [False, True] and data.tasks == 2
    accepted, candidates = plan(gather(TASKS, CFG, ROWS, 1, learned_at=LEARNED), 0.5)
    assert candidates == 0 and accepted == []  # task 3: TRAINED "dog" vs VLM "cat"


def test_without_the_registry_the_retrained_model_hides_the_error():
    """What calibrating on every stored row did: task 1's error disappears behind the retrained model's answer."""
    data = calibration_data(gather(TASKS, CFG, ROWS, 1), min_items=1)
    # task 1 (TRAINED "cat" vs VLM "dog") is no longer even agreed; tasks 2 and 4 (the LoRA's "cat") look right
    assert data.correct.tolist() == [True, True]
    strict = calibration_data(gather(TASKS, CFG, ROWS, 1, learned_at=LEARNED), min_items=1)
    assert (~strict.correct).sum() == 1


def test_the_report_counts_only_what_an_annotator_was_shown():
    pairs = {(e.task_id, e.model_version) for e in project_edits(gather(TASKS, CFG, ROWS, 1, learned_at=LEARNED))}
    assert pairs == {(1, OLD), (2, OLD), (2, TRAINED), (4, OLD)}
    everything = {(e.task_id, e.model_version) for e in project_edits(gather(TASKS, CFG, ROWS, 1))}
    assert (1, TRAINED) in everything


def test_the_totals_count_each_task_once_with_the_version_shown_when_first_annotated():
    """Every promotion re-predicts every task, so a reviewed task carries several versions' pre-annotations;
    the per-version rows keep them all, the totals take the one stored last before the person first
    annotated, or the oldest where every one was stored later (and say how many)."""
    from dataclasses import replace

    from backend.cli.report import seen_edits

    stored_at = {OLD: T0 + 5, VLM: T0 + 5, VLM_LORA: T0 + 25, TRAINED: T0 + 25}
    rows = [replace(r, created_at=stored_at[r.model_version]) for r in ROWS]
    seen, before = seen_edits(gather(TASKS, CFG, rows, 1, learned_at=LEARNED))
    # task 2 (annotated at T0+30) saw TRAINED, stored at T0+25; tasks 1 and 4 (T0+10) saw OLD
    assert sorted((e.task_id, e.model_version) for e in seen) == [(1, OLD), (2, TRAINED), (4, OLD)] and before == 0
    # Label Studio's own list wins: TRAINED was stored before task 2's annotation by `tandem select` only, so
    # Label Studio held OLD's prediction alone when the person annotated
    from datetime import UTC, datetime

    in_ls = [{**t, "predictions": [{"model_version": OLD, "created_at": datetime.fromtimestamp(T0 + 6, UTC)},
                                   {"model_version": TRAINED, "created_at": (datetime.fromtimestamp(T0 + 35, UTC)
                                                                             .isoformat())}]} for t in TASKS]
    seen, before = seen_edits(gather(in_ls, CFG, rows, 1, learned_at=LEARNED))
    assert sorted((e.task_id, e.model_version) for e in seen) == [(1, OLD), (2, OLD), (4, OLD)] and before == 0
    # re-predicted after every annotation (a promotion, `tandem predict`): Label Studio's list holds only the new
    # copies, which say nothing of what was shown then; what Tandem stored before each annotation does
    again = [{**t, "predictions": [{"model_version": v, "created_at": datetime.fromtimestamp(T0 + 50, UTC)}
                                   for v in (OLD, TRAINED)]} for t in TASKS]
    seen, before = seen_edits(gather(again, CFG, rows, 1, learned_at=LEARNED))
    assert sorted((e.task_id, e.model_version) for e in seen) == [(1, OLD), (2, TRAINED), (4, OLD)] and before == 0
    # ... but never a version Label Studio does not list at all (stored by `tandem select` only)
    only_old = [{**t, "predictions": [{"model_version": OLD, "created_at": datetime.fromtimestamp(T0 + 50, UTC)}]}
                for t in TASKS]
    seen, before = seen_edits(gather(only_old, CFG, rows, 1, learned_at=LEARNED))
    assert sorted((e.task_id, e.model_version) for e in seen) == [(1, OLD), (2, OLD), (4, OLD)] and before == 0
    late = [replace(r, created_at=T0 + 40 + i) for i, r in enumerate(ROWS)]  # all stored after every annotation
    seen, before = seen_edits(gather(TASKS, CFG, late, 1, learned_at=LEARNED))
    assert sorted((e.task_id, e.model_version) for e in seen) == [(1, OLD), (2, OLD), (4, OLD)] and before == 3


def test_learned_versions_reads_the_registry(tmp_path):
    registry = Registry(tmp_path / "tandem.db")
    registry.record_served("yolov8n-hub", "yolov8n", "detect", "yolov8n.pt")  # not trained here
    registry.add_candidate("bound-spec", "bound", "detect", "w.pt", None, "", {}, project_id=1)  # no dataset
    registry.add_candidate("ft-1", "ft", "detect", "ft1.pt", "yolov8n-hub", "snap-a", {}, project_id=1)
    registry.add_candidate("ft-other", "ft", "detect", "ft2.pt", "yolov8n-hub", "snap-b", {}, project_id=2)
    registry.add_candidate("ft-old", "ft", "detect", "ft3.pt", "yolov8n-hub", "snap-c", {})  # no project recorded
    made = {v.version: v.created_at for v in registry.versions()}
    learned = learned_versions(str(tmp_path / "tandem.db"), 1)
    assert learned == {"ft-1": made["ft-1"], "ft-old": made["ft-old"]}


RECT_CFG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
            '<Label value="cat"/><Label value="dog"/></RectangleLabels></View>')


def box(label: str, xyxy: tuple[float, float, float, float], score: float | None = None) -> dict:
    x0, y0, x1, y1 = xyxy
    out = {"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": 200,
           "original_height": 100, "value": {"x": x0 / 2, "y": y0, "width": (x1 - x0) / 2, "height": y1 - y0,
                                             "rotation": 0, "rectanglelabels": [label]}}
    if score is not None:
        out["score"] = score
    return out


def test_the_report_counts_only_the_boxes_annotators_were_shown():
    """The stored typed prediction keeps a faint candidate (0.2, below the serving threshold) that the item's
    result, what Label Studio showed, does not: the person cannot have deleted it."""
    control = parse_label_config(RECT_CFG).controls[0]
    shown_box, faint_box = box("cat", (10, 10, 60, 60), 0.9), box("dog", (120, 20, 180, 80), 0.2)
    typed = from_results([shown_box, faint_box], control)
    stored = PredictionRow(1, OLD, "fp", 1, OLD, str(Role.PRE_ANNOTATION),
                           {"result": [shown_box], "model_version": OLD}, {"label": typed})
    when = "2023-11-14T22:13:30Z"
    tasks = [{"id": 1, "data": {"image": "https://example.invalid/1.png"},
              "annotations": [{"id": 7, "result": [box("cat", (10, 10, 60, 60))], "was_cancelled": False,
                               "created_at": when, "updated_at": when}]}]
    evidence = gather(tasks, RECT_CFG, [stored], 1)
    assert len(typed.detections) == 2  # the typed prediction, as stored for scoring
    assert len(evidence.tasks[0].pre_latest.detections) == 1  # what agreement and calibration compare
    (e,) = project_edits(evidence)
    assert (e.counts.unchanged, e.counts.deleted, e.counts.missed) == (1, 0, 0)


def test_agreement_reads_the_shown_regions_and_coverage_counts_final_regions():
    """Both models see a cat; only the CNN has a faint dog candidate (0.2, never shown), which must not make the
    cat 'seen by one model only'. A person kept the cat and drew a bird: two final regions, one agreed."""
    from active_learning.agreement import task_agreement

    cfg = RECT_CFG.replace('<Label value="dog"/>', '<Label value="dog"/><Label value="bird"/>')
    control = parse_label_config(cfg).controls[0]
    cat, faint = box("cat", (10, 10, 60, 60), 0.9), box("dog", (120, 20, 180, 80), 0.2)
    cnn = PredictionRow(1, OLD, "fp", 1, OLD, str(Role.PRE_ANNOTATION), {"result": [cat], "model_version": OLD},
                        {"label": from_results([cat, faint], control)})
    vlm = PredictionRow(1, VLM, "fp", 1, VLM, str(Role.SECOND_OPINION),
                        {"result": [box("cat", (12, 10, 60, 60), 0.8)], "model_version": VLM},
                        {"label": from_results([box("cat", (12, 10, 60, 60), 0.8)], control)})
    when = "2023-11-14T22:13:30Z"
    tasks = [{"id": 1, "data": {"image": "https://example.invalid/1.png"},
              "annotations": [{"id": 7, "result": [box("cat", (10, 10, 60, 60)), box("bird", (100, 60, 140, 95))],
                               "was_cancelled": False, "created_at": when, "updated_at": when}]}]
    (ev,) = gather(tasks, cfg, [cnn, vlm], 1).tasks
    assert task_agreement(ev.pre_latest, ev.second).candidate  # the faint dog would have blocked it
    assert not task_agreement(cnn.controls["label"], ev.second).candidate
    data = calibration_data(gather(tasks, cfg, [cnn, vlm], 1), min_items=1)
    assert data.correct.tolist() == [True] and data.regions == 2  # the person's two final regions


def test_without_any_second_opinion_auto_accept_says_what_is_missing():
    """No number of reviewed tasks turns auto-accept on without a second opinion: the refusal names that, not
    '149 more needed'."""
    from backend.cli.accept import no_second_opinion

    only_cnn = [r for r in ROWS if r.role == str(Role.PRE_ANNOTATION)]
    why = no_second_opinion(gather(TASKS, CFG, only_cnn, 1))
    assert why is not None and "needs a second opinion" in why and "project 1" in why and "'label'" in why
    assert "--second-opinion" in why
    assert no_second_opinion(gather(TASKS, CFG, ROWS, 1)) is None


def test_the_per_class_table_of_a_choices_project_counts_choices():
    """It used to print region columns, all 0, for a Choices control."""
    from active_learning.effort import EffortModel
    from active_learning.telemetry import summarise, total
    from backend.cli.report import per_class_rows

    edits = project_edits(gather(TASKS, CFG, ROWS, 1, learned_at=LEARNED))
    everything = total(summarise(edits, EffortModel()))
    # predicted cat on tasks 2 and 4 (old CNN), kept on 4; dog on task 1 (old) and 2 (retrained), kept on 2
    assert per_class_rows(everything.per_class) == [("class", "predicted", "accepted"), ("cat", "2", "1 (50%)"),
                                                    ("dog", "2", "1 (50%)")]


def test_a_vlm_that_pre_annotated_before_a_cnn_was_bound_counts_as_the_second_opinion(tmp_path):
    """CLIP pre-annotated project 2 alone (rows stored as "pre-annotation"); then a CNN was bound beside it and
    CLIP became the second opinion. `tandem select` ranked with its stored rows; accept and report said there was
    no second opinion. The project's second opinion now is read from its state and the registry."""
    from backend.cli.accept import second_versions
    from backend.storage.projects import ProjectRepo

    rows = [row(5, VLM, Role.PRE_ANNOTATION, "dog"), row(5, OLD, Role.PRE_ANNOTATION, "dog")]
    assert by_id(gather([task(5, "dog", 10)], CFG, rows, 2))[5].second is None  # by role alone: none
    db = str(tmp_path / "tandem.db")
    registry = Registry(db)
    registry.record_served(VLM, "clip", "vlm:classify", "/models/clip")
    registry.record_served(OLD, "cnn", "classify", "/models/cnn.pt")
    assert second_versions(db, 2) == frozenset()  # no state for project 2 yet
    ProjectRepo(db).update(2, model="/models/cnn.pt", served_second_opinion="/models/clip")
    assert second_versions(db, 2) == {VLM}
    ev = by_id(gather([task(5, "dog", 10)], CFG, rows, 2, second_versions=second_versions(db, 2)))[5]
    assert ev.second is not None and set(ev.shown) == {OLD}


def test_a_task_annotated_with_a_label_renamed_since_is_left_out_and_said():
    """A label renamed in Label Studio after annotating ("cat" -> "kitty"): the old regions are not the new
    label's, so reading them would count the shown "cat" as deleted and no region as kept. The task is left out
    of the telemetry and the calibration, and the note names the label."""
    renamed_cfg = CFG.replace('"cat"', '"kitty"')
    evidence = gather(TASKS, renamed_cfg, ROWS, 1, learned_at=LEARNED)
    assert evidence.renamed == {1: ["cat"], 4: ["cat"]}
    assert by_id(evidence)[1].human is None and by_id(evidence)[4].human is None
    assert by_id(evidence)[2].human is not None  # "dog" is still a label
    assert {e.task_id for e in project_edits(evidence)} == {2}
    assert calibration_data(evidence, min_items=1).tasks == 1
    note = evidence.renamed_note()
    assert note.startswith("2 reviewed tasks left out: their annotations use \"cat\", which control 'label' no")
    assert gather(TASKS, CFG, ROWS, 1).renamed_note() == ""
