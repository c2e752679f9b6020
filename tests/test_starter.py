"""The offline starter: another seed is another model in its own file (an offline second opinion)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace

from backend.models.starter import RECIPES, StarterRecipe, starter_target, starter_weights_path, train_starter_model


def test_seed_zero_is_the_served_starter_and_other_seeds_have_their_own_file(tmp_path):
    assert starter_target(tmp_path, RECIPES["detect"]) == starter_weights_path(tmp_path, "detect")
    other = starter_target(tmp_path, replace(RECIPES["detect"], seed=3))
    assert other != starter_weights_path(tmp_path, "detect") and other.name == RECIPES["detect"].weights_name


def test_two_seeds_train_two_different_models(tmp_path):
    tiny = StarterRecipe("classify", epochs=1, imgsz=32, train_images=12, val_images=3, batch=4)
    digests = []
    for seed in (0, 1):
        path = train_starter_model(tmp_path, "classify", replace(tiny, seed=seed))
        assert path == starter_target(tmp_path, replace(tiny, seed=seed)) and path.is_file()
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] != digests[1]
    # trained once: a second call returns the file as it is
    again = train_starter_model(tmp_path, "classify", replace(tiny, seed=1))
    assert hashlib.sha256(again.read_bytes()).hexdigest() == digests[1]


def test_train_starter_refuses_an_unknown_task_by_name(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "train-starter", "--task", "detction",
                           "--home", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "detction" in proc.stderr and "classify" in proc.stderr
