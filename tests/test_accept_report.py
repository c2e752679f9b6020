"""`tandem accept` and `tandem report` against a real Label Studio, on stored predictions of two models.

The project's stored predictions are written as serving stores them (`PredictionRepo`, typed per control, read
from Label Studio results): a CNN pre-annotation (two versions on some tasks) and a second opinion. Human
annotations are imported into Label Studio. Every expected number below is counted from how the groups are built.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from label_studio_sdk import LabelStudio
from PIL import Image
from scipy.stats import beta

from active_learning.effort import EffortModel
from active_learning.queue import AUTO_MARKER, AUTO_VIEW, CONTROL_PICK
from backend.convert.labelstudio import from_results
from backend.core.prediction import Role
from backend.labeling.config import parse_label_config
from backend.server.app import create_app
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.storage.predictions import PredictionRepo, PredictionRow
from tests.harness import ServerThread
from tests.test_server import RECT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

W, H = 320, 240
A, B, C = (20, 20, 80, 80), (150, 100, 210, 150), (240, 160, 290, 210)  # pixel boxes, far apart
A_SHIFTED = (28, 20, 88, 80)  # IoU with A 0.76: same object, moved (between the 0.5 match and 0.9 "unchanged")
CNN1, CNN2, VLM = "cnn-v1", "cnn-v2", "vlm-test"
REPO = Path(__file__).resolve().parents[1]


def region(label: str, box: tuple[float, float, float, float], score: float | None = None) -> dict:
    x0, y0, x1, y1 = box
    out = {"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": W,
           "original_height": H, "value": {"x": 100 * x0 / W, "y": 100 * y0 / H, "width": 100 * (x1 - x0) / W,
                                            "height": 100 * (y1 - y0) / H, "rotation": 0, "rectanglelabels": [label]}}
    if score is not None:
        out["score"] = score
    return out


# group -> (count, control pick, CNN v2 regions, second opinion regions, human regions or None, CNN v1 regions)
GROUPS = {
    # reviewed control picks: both models agree at 0.9, the human kept every box
    "good": (75, True, [("Square", A, .9), ("Circle", B, .9)], [("Square", A, .95), ("Circle", B, .95)],
             [("Square", A), ("Circle", B)], None),
    # reviewed control picks: agreement 0.6, the human replaced the circle by a triangle elsewhere
    "bad": (10, True, [("Square", A, .6), ("Circle", B, .6)], [("Square", A, .7), ("Circle", B, .7)],
            [("Square", A), ("Triangle", C)], None),
    # reviewed active picks: a class swap between the models (no candidate), the human relabelled
    "relabel": (4, False, [("Square", A, .95)], [("Circle", A, .95)], [("Circle", A)], None),
    # reviewed active picks: agreed, the human moved the box
    "moved": (3, False, [("Triangle", A, .95)], [("Triangle", A, .95)], [("Triangle", A_SHIFTED)], None),
    # unlabeled: agreed at 0.92 (above the threshold the calibration must find) -> auto-accepted
    "high": (6, False, [("Square", A, .92), ("Circle", B, .93)], [("Square", A, .95), ("Circle", B, .95)], None, None),
    # unlabeled: agreed at 0.6 -> a candidate below the threshold
    "low": (4, False, [("Square", A, .6), ("Circle", B, .6)], [("Square", A, .9), ("Circle", B, .9)], None, None),
    # unlabeled: class swap, or a box only the CNN sees -> no candidate whatever the confidence
    "swap": (3, False, [("Square", A, .95)], [("Circle", A, .95)], None, None),
    "only-cnn": (3, False, [("Square", A, .95), ("Circle", B, .95)], [("Square", A, .95)], None, None),
    # unlabeled: no second opinion stored
    "no-second": (2, False, [("Square", A, .95)], None, None, None),
}
FIRST_GOOD = 20  # phase 1: only these good tasks are reviewed (too few); they also carry an older CNN version
V1_REGIONS = [("Square", A, .8)]  # the older version saw the square only


def results(regions) -> list[dict]:
    return [region(r[0], r[1], r[2] if len(r) > 2 else None) for r in regions]


def task_json(group: str, i: int, pick: bool, human) -> dict:
    data = {"image": f"https://example.invalid/{group}-{i}.png", "case": f"{group}-{i}"}
    if pick:
        data["tandem_pick"] = CONTROL_PICK
    out: dict = {"data": data}
    if human is not None:
        out["annotations"] = [{"result": results(human), "was_cancelled": False}]
    return out


def stored_rows(project: int, task_id: int, control, v2, second, v1) -> tuple[list, list]:
    """(older rows, newer rows): the v1 pre-annotation is stored before v2, as a model that served earlier."""
    def row(version: str, role: Role, regions) -> PredictionRow:
        res = results(regions)
        item = {"result": res, "score": min(r["score"] for r in res), "model_version": version}
        return PredictionRow(task_id, version, "fp-test", project, version, str(role), item,
                             {"label": from_results(res, control)})

    older = [row(CNN1, Role.PRE_ANNOTATION, v1)] if v1 else []
    newer = [row(CNN2, Role.PRE_ANNOTATION, v2)] + ([row(VLM, Role.SECOND_OPINION, second)] if second else [])
    return older, newer


def tandem(label_studio, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "TANDEM_HOME": str(home), "COLUMNS": "200"}
    env.pop("TANDEM_EFFORT", None)
    return subprocess.run([sys.executable, "-m", "backend.cli", *args], capture_output=True, text=True, env=env,
                          check=False, timeout=300, cwd=REPO)


def said(proc: subprocess.CompletedProcess) -> str:
    return " ".join((proc.stdout + proc.stderr).split())


class Project:
    """A Label Studio project plus the store of one TANDEM_HOME, filled group by group."""

    def __init__(self, label_studio, home: Path) -> None:
        self.ls = label_studio
        self.client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
        self.id = self.client.projects.create(title="tandem accept e2e", label_config=RECT).id
        self.control = parse_label_config(RECT).controls[0]
        self.repo = PredictionRepo(Settings(home=home).database_url)
        self.ids: dict[str, list[int]] = {}

    def add(self, group: str, start: int = 0, stop: int | None = None) -> list[int]:
        count, pick, v2, second, human, v1 = GROUPS[group]
        index = range(start, count if stop is None else stop)
        self.client.projects.import_tasks(self.id, request=[task_json(group, i, pick, human) for i in index])
        by_case = {t.data["case"]: t.id for t in self.tasks()}
        ids = [by_case[f"{group}-{i}"] for i in index]
        older, newer = [], []
        for i, tid in zip(index, ids, strict=True):
            o, n = stored_rows(self.id, tid, self.control, v2, second,
                               V1_REGIONS if group == "good" and i < FIRST_GOOD else v1)
            older += o
            newer += n
        self.repo.put_many(older)
        self.repo.put_many(newer)
        self.ids.setdefault(group, []).extend(ids)
        return ids

    def tasks(self) -> list:
        return list(self.client.tasks.list(project=self.id, fields="all"))

    def annotations(self) -> dict[int, list]:
        return {t.id: list(t.annotations or []) for t in self.tasks()}

    def view(self, title: str):
        return next((v for v in self.client.views.list(project=self.id) if (v.data or {}).get("title") == title), None)

    def view_tasks(self, view_id: int) -> list[dict]:
        r = httpx.get(f"{self.ls.url}/api/tasks", params={"project": self.id, "view": view_id, "fields": "all",
                                                          "page_size": 200},
                      headers={"Authorization": f"Token {self.ls.token}"})
        r.raise_for_status()
        return r.json()["tasks"]


def min_verified(target: float, delta: float) -> int:
    """Zero errors in n pass the one-sided Clopper-Pearson test when (1 - (1 - target))^n <= delta (by hand)."""
    return math.ceil(math.log(delta) / math.log(target))


def test_accept_refuses_then_accepts_exactly_the_agreed_tasks_undo_reverts_and_report_counts(label_studio, tmp_path):
    home = tmp_path / "home"
    p = Project(label_studio, home)

    # -- phase 1: 20 reviewed tasks (40 agreed regions) are too few for precision 0.98 at 95 % confidence
    p.add("good", 0, FIRST_GOOD)
    for group in ("high", "low", "swap", "only-cnn", "no-second"):
        p.add(group)
    refused = tandem(label_studio, home, "accept", "--project", str(p.id), "--create-annotations")
    needed = min_verified(0.98, 0.05) - 2 * FIRST_GOOD
    assert refused.returncode == 1, said(refused)
    assert f"{2 * FIRST_GOOD} verified items, {needed} more needed" in said(refused), said(refused)
    assert "refused" in said(refused)
    assert all(not any(k.startswith("tandem_agreement") for k in t.data) for t in p.tasks())
    assert p.view(AUTO_VIEW) is None  # no empty tab that reads as "nothing agreed"
    assert sum(len(a) for a in p.annotations().values()) == FIRST_GOOD  # only the humans'

    # -- phase 2: enough reviewed control picks; the 0.6 group's errors stop the threshold at 0.9
    p.add("good", FIRST_GOOD)
    for group in ("bad", "relabel", "moved"):
        p.add(group)
    before = p.annotations()
    run = tandem(label_studio, home, "accept", "--project", str(p.id), "--create-annotations")
    assert run.returncode == 0, said(run)
    good_regions, bad_regions = 2 * GROUPS["good"][0], 2 * GROUPS["bad"][0]
    bound = beta.ppf(0.95, 1, good_regions)  # 0 errors of the 150 regions scoring 0.9
    assert bound <= 0.02 < beta.ppf(0.95, GROUPS["bad"][0] + 1, good_regions + bad_regions - GROUPS["bad"][0])
    text = said(run)
    assert f"0 of {good_regions} verified items wrong" in text and "agreement ≥ 0.9:" in text, text
    assert f"{len(p.ids['high'])} of {len(p.ids['high']) + len(p.ids['low'])} candidate tasks" in text, text

    tasks = {t.id: t for t in p.tasks()}
    accepted = {tid for tid, t in tasks.items() if "tandem_agreement" in t.data}
    assert accepted == set(p.ids["high"])  # agreed above the threshold; not the 0.6 ones, swaps, lone boxes
    spot = {tid for tid in accepted if tasks[tid].data["tandem_spot_check"] == 1}
    assert len(spot) == max(1, round(0.05 * len(accepted)))
    for tid in accepted:
        d = tasks[tid].data
        assert d["tandem_agreement"] == pytest.approx(0.92) and d["tandem_bound"] == pytest.approx(bound, abs=1e-6)
        assert d["tandem_auto"] == ("spot-check" if tid in spot else "auto-accepted")
        assert d["image"].endswith(f"{d['case']}.png")  # the task's own data is kept
    after = p.annotations()
    for tid, anns in after.items():
        if tid not in accepted:
            assert [a["id"] for a in anns] == [a["id"] for a in before[tid]]  # nobody else's annotations touched
            continue
        assert len(anns) == 1 and tasks[tid].data["tandem_auto_annotation"] == anns[0]["id"]
        res = anns[0]["result"]
        assert all(AUTO_MARKER in r["meta"]["text"] for r in res)
        got = sorted((r["value"]["rectanglelabels"][0], round(r["value"]["x"] * W / 100), round(r["value"]["y"] * H / 100))
                     for r in res)
        assert got == [("Circle", B[0], B[1]), ("Square", A[0], A[1])]  # the agreed regions, where both models saw them

    view = p.view(AUTO_VIEW)
    assert view is not None
    listed = p.view_tasks(view.id)
    assert {t["id"] for t in listed} == accepted and listed[0]["id"] in spot  # the spot-check slice first
    hidden = set(view.data["hiddenColumns"]["explore"])
    assert {"tasks:data.tandem_agreement", "tasks:data.tandem_bound", "tasks:data.image"}.isdisjoint(hidden)
    assert "tasks:data.case" in hidden and "tasks:created_at" in hidden

    # run again: the accepted tasks keep their fields and their one annotation (auto-accept's own is no "label")
    again = tandem(label_studio, home, "accept", "--project", str(p.id), "--create-annotations")
    assert again.returncode == 0, said(again)
    assert f"0 created, {len(accepted)} kept from an earlier run" in said(again)
    def ids_results(anns: dict[int, list]) -> dict[int, list]:
        return {tid: [(a["id"], a["result"]) for a in a_list] for tid, a_list in anns.items()}

    assert ids_results(p.annotations()) == ids_results(after)
    assert {t.id for t in p.tasks() if "tandem_agreement" in t.data} == accepted

    # -- tandem report: every count by hand from the groups
    out = tmp_path / "report"
    rep = tandem(label_studio, home, "report", "--project", str(p.id), "--out", str(out))
    assert rep.returncode == 0, said(rep)
    assert "(effort model: draw 35 s, verify 7 s, modify 15 s, delete 3 s per box;" in said(rep)
    assert "per choice" not in said(rep)  # a boxes project is priced in boxes only
    report = json.loads((out / "report.json").read_text())
    n = {g: GROUPS[g][0] for g in GROUPS}
    v2 = {"unchanged": 2 * n["good"] + n["bad"], "moved": n["moved"], "relabelled": n["relabel"],
          "deleted": n["bad"], "missed": n["bad"], "choices": 0, "choices_accepted": 0}
    v1 = {"unchanged": FIRST_GOOD, "moved": 0, "relabelled": 0, "deleted": 0, "missed": FIRST_GOOD, "choices": 0,
          "choices_accepted": 0}
    assert report["versions"][CNN2]["counts"] == v2 and report["versions"][CNN1]["counts"] == v1
    assert report["versions"][CNN2]["tasks"] == n["good"] + n["bad"] + n["relabel"] + n["moved"]
    assert report["versions"][CNN1]["tasks"] == FIRST_GOOD
    zero = dict.fromkeys(v2, 0)
    assert report["versions"][CNN2]["per_class"] == {
        "Square": {**zero, "unchanged": n["good"] + n["bad"], "relabelled": n["relabel"]},
        "Circle": {**zero, "unchanged": n["good"], "deleted": n["bad"]},
        "Triangle": {**zero, "moved": n["moved"], "missed": n["bad"]}}
    assert report["versions"][CNN1]["per_class"] == {"Square": {**zero, "unchanged": FIRST_GOOD},
                                                    "Circle": {**zero, "missed": FIRST_GOOD}}
    e = EffortModel()
    for version, c in ((CNN2, v2), (CNN1, v1)):
        modified = c["moved"] + c["relabelled"]
        scratch = (c["unchanged"] + modified + c["missed"]) * e.draw_box
        assisted = c["unchanged"] * e.verify_box + modified * e.modify_box + c["deleted"] * e.delete_box \
            + c["missed"] * e.draw_box
        got = report["versions"][version]
        assert (got["scratch_seconds"], got["assisted_seconds"]) == pytest.approx((scratch, assisted))
        assert got["saved_minutes"] == pytest.approx((scratch - assisted) / 60)
        assert got["rates"]["unchanged"] == pytest.approx(c["unchanged"] / (c["unchanged"] + modified + c["deleted"]))
    # the total counts each reviewed task once: the annotations came with the tasks, before any row was stored,
    # so each with its oldest pre-annotation (CNN1 on the first good tasks, where CNN2 kept 2 boxes each)
    shown = {k: v1[k] + v2[k] for k in v2}
    shown["unchanged"] -= 2 * FIRST_GOOD
    tot = report["total"]
    assert tot["counts"] == shown and tot["tasks"] == report["versions"][CNN2]["tasks"]
    assert tot["annotated_before_pre_annotation"] == tot["tasks"]
    modified = shown["moved"] + shown["relabelled"]
    assert tot["scratch_seconds"] == pytest.approx((shown["unchanged"] + modified + shown["missed"]) * e.draw_box)
    assert tot["saved_minutes"] < sum(report["versions"][v]["saved_minutes"] for v in (CNN1, CNN2))
    assert (f"on {tot['tasks']} reviewed tasks, each counted once with the version shown when first annotated; "
            f"{tot['tasks']} of them annotated before any pre-annotation was stored") in said(rep)
    auto = report["auto_accept"]
    assert auto["threshold"] == pytest.approx(0.9) and auto["bound"] == pytest.approx(bound, abs=1e-9)
    assert auto["coverage"] == pytest.approx(good_regions / (good_regions + bad_regions))
    assert auto["source"] == "control picks" and auto["n_verified"] == good_regions + bad_regions
    assert f"{report['total']['saved_minutes']:.1f} min saved" in said(rep)
    assert "target precision 0.98 at 95% confidence, as `tandem accept` last ran" in said(rep)
    # judged as auto-accept last ran: a run at another target is what the report then reads by default
    from backend.cli.accept import read_record, write_record

    record = read_record(home, p.id)
    write_record(home, p.id, {**record, "calibration": {**record["calibration"], "target": 0.9}})
    rep9 = tandem(label_studio, home, "report", "--project", str(p.id), "--out", str(tmp_path / "report9"))
    assert "target precision 0.9 at 95% confidence, as `tandem accept` last ran" in said(rep9), said(rep9)
    asked = tandem(label_studio, home, "report", "--project", str(p.id), "--out", str(tmp_path / "report98"),
                   "--target", "0.98")
    assert "target precision 0.98 at 95% confidence):" in said(asked), said(asked)  # asked for: not the last run's
    write_record(home, p.id, record)
    for name in ("edit_rates.png", "reliability.png", "precision_coverage.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 300
    assert json.loads((home / "reports" / f"project-{p.id}.json").read_text())["versions"] == report["versions"]
    app = create_app(Settings(home=home), ModelHolder(), training=False)  # /metrics reads the latest report
    with ServerThread(app) as srv:
        metrics = httpx.get(f"{srv.url}/metrics").text
    for version, c in ((CNN2, v2), (CNN1, v1)):
        for kind in ("unchanged", "moved", "relabelled", "deleted", "missed"):
            assert (f'tandem_preannotation_regions{{kind="{kind}",model_version="{version}",project="{p.id}"}} '
                    f'{float(c[kind])}') in metrics
        rate = report["versions"][version]["rates"]["unchanged"]
        assert f'tandem_preannotation_rate{{kind="unchanged",model_version="{version}",project="{p.id}"}} {rate}' \
            in metrics
        minutes = report["versions"][version]["saved_minutes"]
        assert f'tandem_minutes_saved{{model_version="{version}",project="{p.id}"}} {minutes}' in metrics
    assert f'tandem_auto_accept{{project="{p.id}",value="threshold"}} 0.9' in metrics
    # the project's total counts each task once (the versions' series share tasks)
    assert f'tandem_project_minutes_saved{{project="{p.id}"}} {report["total"]["saved_minutes"]}' in metrics

    # -- a person changes one auto-accepted annotation, and moves a box of another in the editor (which keeps
    # the region's meta, marker and all): --undo removes exactly the others
    changed_task, moved_task = sorted(accepted)[:2]
    changed, moved = after[changed_task][0], after[moved_task][0]
    p.client.annotations.update(id=changed["id"], result=results([("Square", A)]))
    # (saved again seconds after `accept` wrote it, as any edit in the editor is)
    shifted = [{**r, "value": {**r["value"], "x": r["value"]["x"] + 2}} for r in moved["result"]]
    assert all(AUTO_MARKER in r["meta"]["text"] for r in shifted)
    p.client.annotations.update(id=moved["id"], result=shifted)
    undone = tandem(label_studio, home, "accept", "--project", str(p.id), "--undo")
    assert undone.returncode == 0, said(undone)
    assert f"{len(accepted) - 2} auto-accepted annotations deleted; 2 kept (changed by a person since)" in said(undone)
    final = p.annotations()
    for tid, anns in final.items():
        expected = ([changed["id"]] if tid == changed_task else [moved["id"]] if tid == moved_task
                    else [a["id"] for a in before[tid]])
        assert [a["id"] for a in anns] == expected
    assert not any(k in t.data for t in p.tasks() for k in ("tandem_agreement", "tandem_auto", "tandem_bound"))
    assert p.view(AUTO_VIEW) is None
    assert f"auto-accept fields cleared from {len(accepted)} tasks, view '{AUTO_VIEW}' removed" in said(undone)
    again = tandem(label_studio, home, "accept", "--project", str(p.id), "--undo")  # nothing left to undo
    assert again.returncode == 0 and "0 auto-accepted annotations deleted; 2 kept (changed by a person since); " \
        f"auto-accept fields cleared from 0 tasks (there was no view '{AUTO_VIEW}')" in said(again), said(again)
    assert all(t.data.get("tandem_pick") == CONTROL_PICK for t in p.tasks() if t.id in p.ids["good"])


def test_report_plots_with_nothing_reviewed_yet_are_written_and_say_why_they_are_empty(tmp_path):
    """A new project: the three PNGs are still written (nothing crashes on empty arrays), each with a note."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from backend.cli.report import write_plots

    data = SimpleNamespace(scores=np.zeros(0), correct=np.zeros(0, bool), regions=0, source="no verified tasks")
    files = write_plots(tmp_path / "plots", {}, [], data)
    assert [f.name for f in files] == ["edit_rates.png", "reliability.png", "precision_coverage.png"]
    for f in files:
        with Image.open(f) as im:
            assert im.size[0] > 300 and len(set(im.convert("L").getdata())) > 2  # drawn, not a blank canvas


def test_the_precision_coverage_plot_marks_the_chosen_threshold_only_when_auto_accept_is_on(tmp_path):
    """The target precision is drawn as a line and the threshold `calibrate` chose as a red point; with
    auto-accept off there is no point (and the plot says why)."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from active_learning.calibration import calibrate
    from backend.cli.report import _tick, write_plots

    rng = np.random.default_rng(0)
    scores = rng.random(400)
    correct = (scores > 0.3) | (rng.random(400) < 0.5)  # errors only below 0.3
    data = SimpleNamespace(scores=scores, correct=correct, regions=400, source="control picks")

    def red_pixels(cal) -> int:
        (path,) = [f for f in write_plots(tmp_path / str(cal.on), {}, [], data, cal, 0.98)
                   if f.name == "precision_coverage.png"]
        with Image.open(path) as im:
            px = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
        return int((np.abs(px - [214, 39, 40]).sum(axis=1) < 30).sum())  # matplotlib's tab:red

    on, off = calibrate(scores, correct, 0.98, 0.05), calibrate(scores[:50], correct[:50], 0.98, 0.05)
    assert on.on and not off.on
    assert red_pixels(on) > 20 and red_pixels(off) == 0
    assert _tick("shapes-yolov8n-detect-23cddc8e") == "shapes-yolov8n-detect\n23cddc8e" and _tick("v1") == "v1"
