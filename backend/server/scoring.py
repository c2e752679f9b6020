"""Scores at serve time: when both models have answered a task, its uncertainty, disagreement and reason are
computed from the stored predictions and stored, so `tandem select` ranks without predicting again.

Runs on the prediction store's writer thread, right after each batch of rows is written: whichever model
answers last triggers the score. The setup (aggregate, the serving threshold) is the one `tandem select`
uses by default, so its scores are reused as they are.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

from active_learning.pipeline import reason_names
from active_learning.scoring import SELECT_AGGREGATE
from active_learning.stored_scores import score_stored_keys
from backend.errors import ConfigError
from backend.predict import plan_for
from backend.server.projects import ProjectServing
from backend.settings import Settings
from backend.storage.predictions import PredictionRepo, PredictionRow
from backend.storage.scores import ScoreRepo, ScoreSetup

log = logging.getLogger("tandem.scoring")


class ServeTimeScorer:
    def __init__(self, settings: Settings, predictions: PredictionRepo, scores: ScoreRepo,
                 serving: ProjectServing) -> None:
        self.settings, self.predictions, self.scores, self.serving = settings, predictions, scores, serving

    def on_stored(self, rows: Sequence[PredictionRow]) -> int:
        """Score the tasks of these rows whose predictions from both current models are stored; returns how many."""
        by_project: dict[int, list[PredictionRow]] = defaultdict(list)
        for row in rows:
            if row.project_id is not None:
                by_project[row.project_id].append(row)
        scored = 0
        for pid, project_rows in by_project.items():
            project = self.serving.state(pid)
            if project is None or not project.label_config:
                continue
            served = self.serving.models(pid, project)
            cnn, other = served.cnn, served.second
            if cnn is None:
                continue
            settings = self.settings
            try:
                plan = plan_for(cnn, project.label_config, {**settings.label_map, **project.label_map},
                                settings.case_sensitive_labels, {**settings.vlm_prompts, **project.prompts},
                                min_confidence=settings.conf)
            except ConfigError:
                continue  # the CNN cannot fill this project: nothing to rank by
            setup = ScoreSetup(cnn.version, other.version if other is not None else "", plan.fingerprint,
                               plan.controls[0].control.name, SELECT_AGGREGATE, settings.conf)
            fps = {r.task_id: r.fingerprint for r in project_rows}
            first = {t: (t, cnn.version, fp) for t, fp in fps.items()}
            second = {t: (t, other.version, fp) for t, fp in fps.items()} if other is not None else None
            found = score_stored_keys(self.predictions, self.scores, setup, pid, first, second,
                                      reason_names(cnn, other))
            scored += len(found)
        return scored
