"""The simulation's summary: the figures the active-learning issue is judged by come from here."""

from __future__ import annotations

import json

import pytest

from benchmarks.al_simulation import labels_to_reach, load_seed_files, summarise


def test_labels_to_reach_interpolates_between_rounds():
    # 0.80 lies a quarter of the way from 0.70 (at 80 labels) to 1.10 (at 120 labels)
    assert labels_to_reach([40, 80, 120], [0.5, 0.7, 1.1], 0.8) == pytest.approx(90.0)
    assert labels_to_reach([40, 80], [0.9, 0.95], 0.85) == 40.0
    assert labels_to_reach([40, 80], [0.5, 0.6], 0.7) is None


def _curves(labels, **scores):
    return {name: {"labels": labels, "score": s} for name, s in scores.items()}


def test_seed_files_and_their_parts_merge(tmp_path):
    for name, curves in [("al_t_seed0.json", _curves([40, 80], random=[0.5, 0.6])),
                         ("al_t_seed0_fixed.json", {"fixed": {"labels": [40, 40], "score": [0.5, 0.52]}}),
                         ("al_t_seed1.json", _curves([40, 80], random=[0.4, 0.7])),
                         ("al_other_seed0.json", _curves([40, 80], random=[0.0, 0.0]))]:
        seed = int(name.split("seed")[1][0])
        (tmp_path / name).write_text(json.dumps({"seed": seed, "seconds": 1.0, "curves": curves}))
    results = load_seed_files(tmp_path, "t")
    assert sorted(results) == [0, 1]
    assert sorted(results[0]) == ["fixed", "random"]
    assert results[1]["random"]["score"] == [0.4, 0.7]


def test_summary_reports_training_time(tmp_path):
    labels = [40, 80, 120]
    results = {
        0: {**_curves(labels, random=[0.5, 0.6, 0.8], hybrid=[0.5, 0.8, 0.9]),
            "fixed": {"labels": [40, 40, 40], "score": [0.5, 0.55, 0.6]}},
        1: {**_curves(labels, random=[0.5, 0.6, 0.8], hybrid=[0.5, 0.8, 0.9]),
            "fixed": {"labels": [40, 40, 40], "score": [0.5, 0.55, 0.6]}},
    }
    text = summarise("classify", results, tmp_path, "t")
    # hybrid reaches random's final 0.8 at 80 labels: 67% of random's 120
    assert "| hybrid | 80 | 67% |" in text
    # the control climbs 0.1 of random's 0.3: a third of random's climb is training time
    assert "from 0.500 to 0.600 in 2 rounds — 33% of random's climb (+0.300)" in text
    assert text.splitlines()[2] == "| labels | random | hybrid | initial 40 only |"
    assert (tmp_path / "al_t_learning_curve.png").stat().st_size > 0
    assert json.loads((tmp_path / "al_t_results.json").read_text())["0"]["fixed"]["score"][-1] == 0.6


def test_summary_without_control_says_nothing_about_training_time(tmp_path):
    results = {0: _curves([40, 80, 120], random=[0.5, 0.6, 0.8], hybrid=[0.5, 0.7, 0.8])}
    text = summarise("classify", results, tmp_path, "t")
    assert "Training time alone" not in text
    assert "| hybrid | 120 | 100% |" in text


def test_random_run_further_than_hybrid_is_read_off_each_curve(tmp_path):
    # random extended to 200 labels in another process; hybrid and the control stopped at 120
    results = {seed: {**_curves([40, 80, 120, 160, 200], random=[0.5, 0.6, 0.7, 0.75, 0.8]),
                      **_curves([40, 80, 120], hybrid=[0.5, 0.7, 0.9]),
                      "fixed": {"labels": [40, 40, 40], "score": [0.5, 0.52, 0.54]}} for seed in (0, 1)}
    text = summarise("classify", results, tmp_path, "t")
    # random's final 0.8 lies halfway from 0.7 (80) to 0.9 (120): 100 labels, 50% of random's 200
    assert "| hybrid | 100 | 50% | +0.150 ± 0.000 |" in text  # gain over the two rounds both ran: (0.1 + 0.2) / 2
    assert "| 200 | 0.800 ± 0.000 | – | – |" in text
    assert "hybrid to 120" in text
    # the control's 0.04 against random's 0.2 over the same 2 rounds
    assert "in 2 rounds — 20% of random's climb (+0.200)" in text
    # horizons 120/160/200: random 0.7/0.75/0.8, which hybrid reaches at 80 (its own round 1), 90 (a quarter of
    # the way from 80 to 120) and 100 labels
    assert "| hybrid | 67% | 56% | 50% |" in text


def test_summary_refuses_a_strategy_run_further_than_random(tmp_path):
    results = {0: {**_curves([40, 80], random=[0.5, 0.6]), **_curves([40, 80, 120], hybrid=[0.5, 0.7, 0.9])}}
    with pytest.raises(ValueError, match="hybrid ran more rounds than random"):
        summarise("classify", results, tmp_path, "t")


def test_seeds_with_different_rounds_are_refused(tmp_path):
    results = {0: _curves([40, 80, 120], random=[0.5, 0.6, 0.7]), 1: _curves([40, 80], random=[0.5, 0.6])}
    with pytest.raises(ValueError, match="different numbers of rounds"):
        summarise("classify", results, tmp_path, "t")
