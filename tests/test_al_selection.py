import numpy as np
import pytest

from active_learning.diversity import k_center_greedy, typical_per_cluster, typicality
from active_learning.scoring import score_outputs
from active_learning.selection import SelectionConfig, Strategy, select
from backend.models.base import ModelOutput


def brute_k_center(x, budget, labeled):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    lab = labeled / np.linalg.norm(labeled, axis=1, keepdims=True)
    centers, picked = list(lab), []
    for _ in range(budget):
        d = np.array([min(np.sum((p - c) ** 2) for c in centers) for p in x])
        d[picked] = -1
        i = int(np.argmax(d))
        picked.append(i)
        centers.append(x[i])
    return picked


def test_k_center_matches_brute_force():
    rng = np.random.default_rng(0)
    x, labeled = rng.normal(size=(60, 5)), rng.normal(size=(4, 5))
    assert list(k_center_greedy(x, 7, labeled)) == brute_k_center(x, 7, labeled)


def test_k_center_spreads_over_clusters():
    rng = np.random.default_rng(1)
    centers = np.eye(4) * 10
    x = np.concatenate([c + rng.normal(scale=0.1, size=(50, 4)) for c in centers])
    picks = k_center_greedy(x, 4)
    assert sorted(set(picks // 50)) == [0, 1, 2, 3]


def test_typicality_prefers_dense_points_and_cold_start_covers_clusters():
    rng = np.random.default_rng(2)
    dense = rng.normal(scale=0.05, size=(40, 3)) + [1, 0, 0]
    outlier = np.array([[0, 0, 1.0]])
    x = np.concatenate([dense, outlier])
    t = typicality(x, k=5)
    assert t[-1] < t[:-1].min()
    blobs = np.concatenate([rng.normal(scale=0.05, size=(30, 3)) + c for c in np.eye(3)])
    picks = typical_per_cluster(blobs, 3, seed=0)
    assert sorted(picks // 30) == [0, 1, 2]


def test_strategies_rank_by_their_signal_and_control_slice_is_marked():
    n = 100
    u = np.linspace(0, 1, n)
    d = u[::-1].copy()
    by_u = select(SelectionConfig(Strategy.UNCERTAINTY, budget=10, control_fraction=0.0), u, d)
    assert set(by_u.indices) == set(range(90, 100)) and by_u.mode == "uncertainty"
    by_d = select(SelectionConfig(Strategy.DISAGREEMENT, budget=10, control_fraction=0.0), u, d)
    assert set(by_d.indices) == set(range(10))
    hybrid = select(SelectionConfig(Strategy.HYBRID, budget=10, control_fraction=0.2,
                                    weights={"uncertainty": 1.0, "disagreement": 0.0}), u, d)
    assert hybrid.control.sum() == 2 and len(hybrid.indices) == 10 and len(set(hybrid.indices)) == 10
    assert set(hybrid.indices[~hybrid.control]) == set(range(92, 100))
    fallback = select(SelectionConfig(Strategy.DISAGREEMENT, budget=5), u, None)
    assert "no second model" in fallback.mode
    rand = select(SelectionConfig(Strategy.RANDOM, budget=10, seed=3), u, d)
    assert rand.control.sum() == 0 and len(set(rand.indices)) == 10


def test_pool_then_diversity_stays_inside_the_pool():
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(200, 8))
    u = rng.random(200)
    sel = select(SelectionConfig(Strategy.UNCERTAINTY, budget=10, pool_factor=3, control_fraction=0), u, embeddings=emb)
    pool = set(np.argsort(-u)[:30])
    assert set(sel.indices) <= pool and sel.mode == "uncertainty+k-center"
    assert list(u[sel.indices]) == sorted(u[sel.indices], reverse=True)  # queue order = score order


def test_cold_start_uses_typicality():
    rng = np.random.default_rng(5)
    sel = select(SelectionConfig(Strategy.HYBRID, budget=4, cold_start_labels=10, control_fraction=0),
                 rng.random(50), rng.random(50), rng.normal(size=(50, 4)), num_labeled=3)
    assert sel.mode == "typicality (cold start)" and len(sel.indices) == 4


def test_classifier_outputs_score_by_margin_and_js():
    p = [ModelOutput(probabilities=np.array(v)) for v in ([0.9, 0.1], [0.5, 0.5])]
    q = [ModelOutput(probabilities=np.array(v)) for v in ([0.9, 0.1], [0.0, 1.0])]
    table = score_outputs(p, ["cat", "dog"], q, ["CAT", "Dog"], model_names=("yolo", "clip"))
    np.testing.assert_allclose(table.uncertainty, [0.2, 1.0])
    assert table.disagreement[0] == pytest.approx(0) and table.disagreement[1] > 0.3
    # the doubt (1.0) outweighs the disagreement, so it leads
    assert table.reasons[1] == "yolo unsure: cat 0.50, then dog 0.50; yolo says cat (0.50), clip says dog (1.00)"



def test_detector_that_sees_nothing_still_ranks_its_near_misses():
    import supervision as sv

    def out(peak, conf=()):
        n = len(conf)
        det = sv.Detections(xyxy=np.tile([10.0, 10, 50, 50], (n, 1)).reshape(n, 4), confidence=np.array(conf, float),
                            class_id=np.zeros(n, int), data={"class_name": np.array(["cat"] * n, dtype=object)})
        return ModelOutput(detections=det, candidate_peak=peak)

    table = score_outputs([out(0.2), out(0.01), out(None), out(0.95, [0.95]), out(0.86)], ["cat"])
    assert table.uncertainty[0] > table.uncertainty[1] > table.uncertainty[2] == 0
    assert table.reasons[0] == "CNN sees nothing (best candidate 0.20)"
    assert table.reasons[2] == "CNN boxes: 0" and table.reasons[3] == "CNN boxes: 1"
    # a confident candidate and no box: a class the project leaves out (a label map dropping it), not "nothing"
    assert table.reasons[4] == ("CNN sees none of the project's labels (its best candidate, 0.86, is of a class the "
                                "labeling config or label map leaves out)")


@pytest.mark.parametrize("n", [10, 25, 40])
def test_a_small_project_still_queues_by_score(n):
    """Where pool_factor × budget covers every task, diversity must not pass the top scorers over."""
    rng = np.random.default_rng(3)
    unc = rng.uniform(0, 0.1, n)
    unc[rng.choice(n, 5, replace=False)] = 1.0
    sel = select(SelectionConfig(strategy=Strategy.UNCERTAINTY, budget=8, control_fraction=0.0, seed=1),
                 uncertainty=unc, embeddings=rng.normal(size=(n, 16)))
    top_half = set(np.argsort(-unc)[: max(8, n // 2)].tolist())
    assert set(sel.indices.tolist()) <= top_half
    assert len(sel.indices) == min(8, n)


@pytest.mark.parametrize("options, words", [
    (dict(budget=0), "budget must be at least 1"),
    (dict(control_fraction=1.5), "control must be between 0 and 1"),  # it queued more than the budget
    (dict(control_fraction=-0.5), "control must be between 0 and 1"),
    (dict(pool_factor=0.5), "pool factor must be at least 1"),
    (dict(cold_start_labels=-1), "cold start must be 0 or more"),
    (dict(weights={"uncertainty": -1.0, "disagreement": 0.5}), "weights must be 0 or more"),
    (dict(weights={"uncertainty": 0.0, "disagreement": 0.0}), "hybrid needs a weight above 0"),
])
def test_a_selection_config_that_would_fail_late_is_refused_when_made(options, words):
    with pytest.raises(ValueError, match=words):
        SelectionConfig(**{"strategy": Strategy.HYBRID, **options})
    SelectionConfig(strategy=Strategy.HYBRID, control_fraction=1.0, pool_factor=1.0)  # the edges are fine


RECT = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="Square"/><Label value="Circle"/><Label value="Triangle"/></RectangleLabels></View>"""


def _model_output(rng, class_names, base=None):
    """A detector's output in its own classes: 0-4 boxes (or `base` jittered, some dropped, some relabelled),
    class vectors, a candidate peak unless the model reports none."""
    import supervision as sv

    from backend.core.prediction import CLASS_NAME, CLASS_SCORES, Prediction

    c = len(class_names)
    if base is None:
        k = int(rng.integers(0, 5))
        xy = rng.uniform(0, 500, (k, 2))
        xyxy, cls = np.hstack([xy, xy + rng.uniform(10, 100, (k, 2))]), rng.integers(0, c, k)
    else:
        keep = rng.random(len(base.detections)) > 0.2
        xyxy = (base.detections.xyxy + rng.normal(0, 3, (len(keep), 4)))[keep]
        cls = np.where(rng.random(len(keep)) < 0.15, rng.integers(0, c, len(keep)), base.detections.class_id)[keep]
    k = len(cls)
    conf = rng.uniform(0.05, 1, k)
    scores = rng.dirichlet(np.ones(c), k) * (1 - conf)[:, None]
    scores[np.arange(k), cls] = conf
    det = sv.Detections(xyxy=xyxy.reshape(k, 4), confidence=conf, class_id=cls.astype(int),
                        data={CLASS_NAME: np.array([class_names[i] for i in cls], dtype=object), CLASS_SCORES: scores})
    return Prediction(detections=det, candidate_peak=None if rng.random() < 0.2 else float(rng.uniform(0.01, 0.3)))


def test_selection_from_stored_predictions_equals_the_decoded_prediction_path(tmp_path, detect_weights):
    """`run_selection` on stored predictions (scored column-wise, reasons built only for the picks) picks the same
    tasks with the same scores and sentences as scoring every task's decoded Predictions and selecting from
    those; a second run reads the stored scores and picks the same again; a dry run's scores.csv names every
    candidate's reason."""
    import csv

    from active_learning.pipeline import reason_names, run_selection, write_dry_run
    from active_learning.stored_scores import score_pairs
    from active_learning.uncertainty import NEAR
    from backend.core.prediction import Role
    from backend.media.fetch import MediaFetcher, MediaSettings
    from backend.models.yolo import YoloAdapter
    from backend.predict import plan_for, task_key
    from backend.storage.predictions import PredictionRepo, PredictionRow
    from backend.storage.scores import ScoreRepo

    primary = YoloAdapter(detect_weights, device="cpu")
    second = YoloAdapter(detect_weights, device="cpu", name="second")
    plan1, plan2 = (plan_for(m, RECT, min_confidence=NEAR[0]) for m in (primary, second))
    assert plan1.version != plan2.version
    db = f"sqlite:///{tmp_path / 'tandem.db'}"
    store, scores = PredictionRepo(db), ScoreRepo(db)
    rng = np.random.default_rng(7)
    n = 2500  # more than one scoring chunk (2,000)
    tasks = [{"id": i, "data": {"image": f"/data/local-files/?d=gone/img{i}.png"}} for i in range(n)]
    firsts = [_model_output(rng, primary.class_names) for _ in tasks]
    seconds = [_model_output(rng, second.class_names, base=a if rng.random() > 0.1 else None) for a in firsts]
    embeddings = rng.normal(size=(n, 8)).astype(np.float32)
    rows = []
    for plan, outs, role, emb in ((plan1, firsts, Role.PRE_ANNOTATION, embeddings),
                                  (plan2, seconds, Role.SECOND_OPINION, None)):
        planned = plan.controls[0]
        typed = planned.in_labels(outs, plan.version, role)
        if emb is not None:
            typed = [p.with_meta(embedding=v) for p, v in zip(typed, emb, strict=True)]
        for task, p in zip(tasks, typed, strict=True):
            key = task_key(task, plan)
            rows.append(PredictionRow(*key, 1, plan.name, str(role), {"result": [], "model_version": plan.version},
                                      {planned.control.name: p}))
    store.put_many(rows)

    # before: every task's stored predictions decoded as Predictions, scored at once, and selected from
    keys1 = [task_key(t, plan1) for t in tasks]
    keys2 = [task_key(t, plan2) for t in tasks]
    got1, got2 = store.get_controls(keys1), store.get_controls(keys2)
    names = reason_names(primary, second)
    before = score_pairs([k[0] for k in keys1], [got1[k]["label"] for k in keys1], [got2[k]["label"] for k in keys2],
                         names, "capped_sum", NEAR[0])
    u = np.array([s.uncertainty for s in before])
    d = np.array([s.disagreement for s in before])
    config = SelectionConfig(Strategy.HYBRID, budget=40, seed=3)
    expected_sel = select(config, u, d, embeddings, None, num_labeled=0)
    expected = [(int(i), float(expected_sel.acquisition[i]), float(u[i]), float(d[i]),
                 ("control: random pick; " if c else "") + before[i].reason)
                for i, c in zip(expected_sel.indices, expected_sel.control, strict=True)]
    assert all(s.reason for s in before) and expected_sel.control.any() and "k-center" in expected_sel.mode

    fetcher = MediaFetcher(MediaSettings(local_files_root=tmp_path / "no-images"))
    for run in ("scored from stored predictions", "read back from stored scores"):
        outcome, table, ids = run_selection(tasks, RECT, fetcher, primary, config, second=second, store=store,
                                            scores=scores, project_id=1)
        assert ids == list(range(n)) and outcome.from_store == n and outcome.predicted == 0, run
        assert outcome.mode == expected_sel.mode, run
        got = [(e.task_id, e.score, e.uncertainty, e.disagreement, e.reason) for e in outcome.entries]
        assert got == expected, run
        np.testing.assert_array_equal(table.uncertainty, u)
        np.testing.assert_array_equal(table.disagreement, d)
    # scores stored by the ranking pass carry no sentence until picked; the picks' were built and stored
    stored = scores.get_many(_setup(plan1, plan2), {k[0]: k[2] for k in keys1})
    picked = {e.task_id for e in outcome.entries}
    assert all(stored[t].reason == before[t].reason for t in picked)
    assert sum(stored[t].reason == "" for t in stored) == n - len(picked)
    files = write_dry_run(outcome, table, ids, tmp_path / "dry")
    with (tmp_path / "dry" / "scores.csv").open() as fh:
        reasons = [r["reason"] for r in csv.DictReader(fh)]
    assert files and reasons == [s.reason for s in before]
    # five tasks nothing was stored for (their images are gone: predicting them fails): every progress bar a
    # user sees ends full, and the prediction bar says how many came from the store
    reports: list[tuple[str, int, int]] = []
    more = tasks + [{"id": n + k, "data": {"image": f"/data/local-files/?d=gone/new{k}.png"}} for k in range(5)]
    # one of them has the CNN's prediction stored, not the second opinion's (a new second model): the bar says so
    store.put_many([PredictionRow(*task_key(more[n], plan1), 1, plan1.name, str(Role.PRE_ANNOTATION),
                                  {"result": [], "model_version": plan1.version}, {"label": rows[0].controls["label"]})])
    outcome, _, ids = run_selection(more, RECT, fetcher, primary, config, second=second, store=store, scores=scores,
                                    project_id=1, progress=lambda *r: reports.append(r))
    assert ids == list(range(n)) and outcome.from_store == n and sorted(outcome.skipped) == list(range(n, n + 5))
    assert outcome.second_only == 0  # its image is gone: it was not ranked, so the summary does not count it
    # now its image is there: only the second opinion runs on it, and the summary says so
    from backend.datasets.shapes import generate_samples

    (tmp_path / "no-images" / "gone").mkdir(parents=True)
    generate_samples(1, seed=3)[0][0].save(tmp_path / "no-images" / "gone" / "new0.png")
    outcome, _, ids = run_selection(more, RECT, fetcher, primary, config, second=second, store=store, scores=scores,
                                    project_id=1, progress=lambda *r: None)
    assert n in ids and outcome.predicted == 1 and outcome.second_only == 1
    last = {stage: (done, total) for stage, done, total in reports}
    assert last == {"looked up in the store": (n + 5, n + 5),
                    f"predict 5 not stored ({n} from the store; 1 of them lack only the second opinion)": (5, 5)}
    store.close()


def _setup(plan1, plan2):
    from active_learning.scoring import SELECT_AGGREGATE
    from active_learning.uncertainty import NEAR
    from backend.storage.scores import ScoreSetup

    return ScoreSetup(plan1.version, plan2.version, plan1.fingerprint, plan1.controls[0].control.name,
                      SELECT_AGGREGATE, NEAR[0])


def test_a_second_opinion_that_never_disagrees_is_flagged():
    """Two identical models (a starter trained twice is bit-identical) give disagreement 0 everywhere: said."""
    import supervision as sv

    from backend.cli.select import same_opinion

    def out(conf):
        det = sv.Detections(xyxy=np.array([[10.0, 10, 50, 50]]), confidence=np.array([conf]),
                            class_id=np.zeros(1, int), data={"class_name": np.array(["cat"], dtype=object)})
        return ModelOutput(detections=det, candidate_peak=conf)

    firsts = [out(0.3 + i / 100) for i in range(25)]
    same = score_outputs(firsts, ["cat"], firsts, ["cat"])
    assert "agreed exactly with the CNN on all 25 tasks" in same_opinion(same)
    other = score_outputs(firsts, ["cat"], [out(0.9)] * 25, ["cat"])
    assert other.disagreement.max() > 0 and same_opinion(other) is None
    assert same_opinion(score_outputs(firsts[:5], ["cat"], firsts[:5], ["cat"])) is None  # too few to say
    assert same_opinion(score_outputs(firsts, ["cat"])) is None  # no second model
