"""The classification arm of `al_simulation --human-seconds`: its accounting, through the real code path.

A tiny config (small pool, 2 rounds, a few epochs at 32 px) trains real YOLOv8n-cls models. A prefilled
calibration sample (200 verified agreed tasks, all right, score 0) turns auto-accept on from round 1, so the
checks below see accepted tasks: their precision must be judged against the truth, not against the models.
"""

from __future__ import annotations

import json
import math
from argparse import Namespace

import numpy as np
import pytest

from active_learning.effort import EffortModel
from backend.demo_rounds import RoundRecord, savings
from benchmarks.al_human_classify import (
    guarantee_reach,
    horizon_shares,
    slice_bound,
    human_seconds_classify_seed,
    second_opinion,
    summarise_classify,
)
from benchmarks.al_simulation import draw_split

ARGS = dict(pool=90, test=40, initial=20, budget=10, rounds=2, epochs0=3, epochs=1, imgsz=32, lr_finetune=0.002,
            imbalance=1.0)
PREFILL = ([0.0] * 200, [True] * 200)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    args = Namespace(**ARGS)
    work = tmp_path_factory.mktemp("classify-human")
    rounds: list[tuple[int, bool]] = []
    saved = human_seconds_classify_seed(args, 0, work, prefill=PREFILL, progress=lambda _: None,
                                        checkpoint=lambda s: rounds.append((s["rounds_done"], s["complete"])))
    assert rounds == [(1, False), (2, True)]  # written after every round, both arms in lock-step
    return args, saved


def _arm(saved, arm):
    return [RoundRecord(**r) for r in saved["records"] if r["arm"] == arm]


def test_random_arm_costs_budget_choices_per_round(run):
    args, saved = run
    effort = EffortModel()
    rows = _arm(saved, "random")
    assert [r.round for r in rows] == [0, 1, 2]
    for r in rows:
        assert r.labelled == r.human_tasks == r.round * args.budget
        assert r.human_seconds == pytest.approx(r.round * args.budget * effort.choose_class)
        assert r.actions["draw"] == r.round * args.budget and r.actions["verify"] == 0
        assert r.auto_tasks == 0
        assert 0.0 <= r.test_map50 <= 1.0  # top-1 accuracy on the test split


def test_tandem_seconds_equal_the_priced_actions(run):
    args, saved = run
    effort = EffortModel()
    rows = _arm(saved, "tandem")
    notes = saved["tandem_rounds"]
    for r in rows[1:]:
        priced = (r.actions["verify"] * effort.verify_class + r.actions["draw"] * effort.choose_class
                  + r.spot_checks * effort.verify_class)
        assert r.human_seconds == pytest.approx(priced)
        assert r.actions["verify"] + r.actions["draw"] == r.human_tasks  # each reviewed task: confirmed or chosen
        assert r.labelled == r.human_tasks + r.auto_tasks  # every pool label is a human's or auto-accepted
    per_round = [n["auto_accepted"] for n in notes]
    assert rows[-1].spot_checks == sum(math.ceil(EffortModel().spot_check * a) for a in per_round)
    assert [n["reviewed"] for n in notes] == [args.budget] * args.rounds
    assert rows[-1].human_tasks == args.budget * args.rounds
    # the shared round 0 costs nothing in either arm
    assert all(r.human_seconds == 0 for r in _arm(saved, "random")[:1] + rows[:1])


def test_auto_accepted_precision_is_against_truth(run):
    args, saved = run
    samples, _, pool_all = draw_split("classify", args, 0)
    notes = saved["tandem_rounds"]
    accepted = [(t, c) for n in notes for t, c in n["accepted"]]
    assert notes[0]["threshold"] == 0.0 and notes[0]["auto_accepted"] > 0, "the prefilled sample turns it on"
    rows = _arm(saved, "tandem")
    right = sum(int(samples[t].labels[0]) == c for t, c in accepted)
    assert rows[-1].auto_tasks == rows[-1].auto_boxes == len(accepted)
    assert rows[-1].auto_correct == right
    assert len({t for t, _ in accepted}) == len(accepted)  # no task accepted twice
    # round 1's accepted class is what both models said: the second opinion (fit on the initial labels) agrees
    initial = [int(i) for i in pool_all[: args.initial]]
    truth = {i: int(samples[i].labels[0]) for i in initial}
    first = [(t, c) for t, c in notes[0]["accepted"]]
    lr = second_opinion(samples, initial, truth, [t for t, _ in first])
    assert [int(np.argmax(p.probabilities)) for p in lr] == [c for _, c in first]
    s = savings(_arm(saved, "random") + rows)
    assert s.auto_accept_precision == pytest.approx(right / len(accepted))
    assert s.coverage == pytest.approx(len(accepted) / (len(accepted) + rows[-1].human_tasks))


def test_summary_reads_the_seed_files(run, tmp_path):
    _, saved = run
    text = summarise_classify({0: saved, 1: json.loads(json.dumps(saved))}, tmp_path, "t")
    assert "| 0 |" in text and "| 1 |" in text and "precision vs truth" in text
    assert (tmp_path / "al_t_human_seconds.png").exists()
    summary = json.loads((tmp_path / "al_t_human_summary.json").read_text())
    assert summary["0"]["auto_accepted_tasks"] == _arm(saved, "tandem")[-1].auto_tasks


def test_summary_reads_seeds_to_the_rounds_all_finished(run, tmp_path):
    _, saved = run
    short = {**saved, "records": [r for r in saved["records"] if r["round"] <= 1],
             "tandem_rounds": saved["tandem_rounds"][:1]}
    text = summarise_classify({0: saved, 1: short}, tmp_path, "t")
    assert "- rounds: 1 (finished per seed: 0: 2, 1: 1)" in text
    summary = json.loads((tmp_path / "al_t_human_summary.json").read_text())
    assert summary["0"]["rounds"] == summary["1"]["rounds"] == 1


def test_horizon_shares_divide_tandem_seconds_by_randoms():
    def rec(arm, r, seconds, acc):
        return dict(arm=arm, round=r, labelled=0, human_tasks=0, human_seconds=seconds, actions={}, test_map50=acc)

    records = [rec("random", 0, 0, 0.5), rec("random", 1, 100, 0.5), rec("random", 2, 200, 0.7),
               rec("random", 3, 300, 0.95), rec("tandem", 0, 0, 0.5), rec("tandem", 1, 50, 0.6),
               rec("tandem", 2, 80, 0.9)]
    # r1: no better than the start; r2: 0.7 is reached at 50 + (0.1/0.3)·30 = 60 s of random's 200; r3: never
    assert horizon_shares(records) == ["start", "30%", "–"]


def test_tandem_arm_goes_on_retraining_once_the_pool_is_labelled(tmp_path):
    """Auto-accept can take every task left at once; the rounds after that cost nothing and still retrain."""
    from backend.core.prediction import Prediction
    from benchmarks.al_human_classify import ClassifyConfig, tandem_arm
    from benchmarks.digits_data import classification_set

    samples = classification_set(0)
    initial, pool = list(range(100)), list(range(100, 130))
    index = {id(samples[i].image): i for i in pool}
    fits: list[int] = []

    def predict(_weights, images):  # a CNN that is always right: its top-1 is the truth, at 0.9
        out = []
        for image in images:
            probs = np.full(10, 0.1 / 9)
            probs[int(samples[index[id(image)]].labels[0])] = 0.9
            out.append(Prediction(probabilities=probs, class_names=tuple(str(c) for c in range(10))))
        return out

    config = ClassifyConfig(rounds=4, budget=10, seed=0)
    rows = list(tandem_arm(samples, initial, pool, [], "w0", tmp_path, config,
                           lambda _d, w, r: fits.append(r) or w, lambda _w, _d: 0.5, predict,
                           prefill=([0.0] * 200, [True] * 200)))
    assert fits == [1, 2, 3, 4]  # every round retrains
    assert rows[0][1]["auto_accepted"] > 0
    last, note = rows[-1]
    assert last.labelled == len(pool) == last.auto_tasks + last.human_tasks
    assert note["pool_unlabelled"] == 0 and note["reviewed"] == 0 and note["auto_accepted"] == 0
    assert last.human_seconds == rows[-2][0].human_seconds  # nothing left to pay for
    assert last.auto_correct == last.auto_tasks  # the CNN is always right, so every agreed class is


def test_guarantee_reach_finds_the_first_round_the_sample_could_pass():
    def rec(arm, r, seconds, acc=0.9):
        return dict(arm=arm, round=r, human_seconds=seconds, test_map50=acc)

    def note(r, sample, wrong):
        return dict(round=r, calibration_sample=sample, calibration_errors=wrong)

    records = [rec("random", r, 100 * r) for r in range(5)] + [rec("tandem", r, 70 * r, 0.8 + r / 100)
                                                               for r in range(5)]
    notes = [note(1, 40, 1), note(2, 120, 2), note(3, 160, 2), note(4, 220, 2)]
    g = guarantee_reach(records, notes, 149, share=0.30)
    # random's final: 400 s, so 30% is 120 s; round 1 (70 s) is the last within it; the sample first holds 149 after
    # round 3, at 210 s = 52% of 400
    assert (g["round"], g["seconds"], g["sample"], g["errors"]) == (3, 210, 160, 2)
    assert g["share"] == pytest.approx(210 / 400)
    assert (g["within_round"], g["within_sample"], g["within_errors"]) == (1, 40, 1)
    assert g["within_top1"] == pytest.approx(0.81)
    assert guarantee_reach(records, notes, 500)["round"] is None


def test_slice_bound_prices_a_slice_that_replaces_a_round():
    def rec(arm, r, seconds):
        return dict(arm=arm, round=r, human_seconds=seconds, test_map50=0.9)

    records = [rec("random", r, 100 * r) for r in range(5)] + [rec("tandem", r, 70 * r) for r in range(5)]
    notes = [dict(round=1, agreed=100, agreed_correct=90), dict(round=2, agreed=300, agreed_correct=297)]
    (b,) = slice_bound(records, notes, 149, spot_check=0.05, verify_seconds=2.0)  # round 1: fewer than 149 agreed
    # round 2: round 1's 70 s, 149 verifications (298 s), 5% of the other 151 spot-checked: ceil(7.55) = 8 (16 s)
    assert (b["round"], b["seconds"]) == (2, 70 + 298 + 16)
    assert b["share"] == pytest.approx(384 / 400)
    assert b["error_rate"] == pytest.approx(0.01) and b["p_pass"] == pytest.approx(0.99 ** 149)
