"""`tandem demo` end to end (small sizes): its own Label Studio, the whole loop, a report folder."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from PIL import Image

from backend.datasets.shapes import generate_samples
from backend.demo import RoundsPlan, ground_truth_result, needs_correction, run_demo
from backend.demo_rounds import RoundRecord, savings
from backend.dev.local_label_studio import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]


def test_needs_correction_judges_pre_annotations():
    _, truth = generate_samples(1, seed=2)[0]
    perfect = ground_truth_result(truth)
    assert not needs_correction(perfect, truth)
    wrong_label = [dict(r, value={**r["value"], "rectanglelabels": ["Nope"]}) for r in perfect]
    assert needs_correction(wrong_label, truth)
    assert needs_correction(perfect[:-1], truth) or len(perfect) == 0
    shifted = [dict(r, value={**r["value"], "x": r["value"]["x"] + 30}) for r in perfect]
    assert needs_correction(shifted, truth)


def test_demo_runs_the_whole_loop(tmp_path):
    steps = []
    ls_port, port = free_port(), free_port()
    while port == ls_port:
        port = free_port()
    s = run_demo(tmp_path / "home", tmp_path / "report", images=30, budget=10, epochs=4, step=steps.append,
                 plan=RoundsPlan(rounds=1, images=24, budget=6, epochs=1, test_images=10),
                 label_studio_port=ls_port, port=port)
    assert len(steps) >= 8 and s.cnn_version and s.second_version and s.new_version
    said = "\n".join(steps)  # where to watch it, on the ports asked for
    assert f"Label Studio at http://127.0.0.1:{ls_port}: log in as" in said and f"http://127.0.0.1:{port}" in said
    assert s.queued_active + s.queued_control == 10 and s.queued_control == 2
    assert 0 <= s.active_needed_correction <= s.queued_active
    assert len(s.disagreement_before) == 30 and len(s.disagreement_after) == 20  # queued tasks were annotated
    assert 0 <= s.test_map50_before <= 1 and 0 <= s.test_map50_after <= 1
    for name in ("learning_curve.png", "disagreement_histogram.png", "queue_examples.png", "summary.json", "README.md"):
        assert (tmp_path / "report" / name).is_file(), name
    assert Image.open(tmp_path / "report" / "learning_curve.png").size[0] > 300
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["new_version"] == s.new_version
    # the rounds beside random labelling: the savings are the run's own records, summed and read off
    assert {(r["arm"], r["round"]) for r in s.rounds} == {(a, k) for a in ("random", "tandem") for k in (0, 1)}
    assert s.savings == asdict(savings([RoundRecord(**r) for r in s.rounds]))
    last_random = next(r for r in s.rounds if r["arm"] == "random" and r["round"] == 1)
    assert s.savings["random_seconds"] == last_random["human_seconds"] == last_random["actions"]["draw"] * 35.0
    assert (tmp_path / "report" / "quality_vs_human_seconds.png").is_file()
    assert "What Tandem saved" in (tmp_path / "report" / "README.md").read_text()
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["savings"] == s.savings
