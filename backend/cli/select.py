"""`tandem select`: rank a project's unlabeled tasks and write the review queue into Label Studio."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from backend.cli.common import Home, app, console, load_settings, reading_project, setup_logging, stdout_console


@app.command()
def select(
    project: Annotated[int, typer.Option("--project", "-p", help="Label Studio project id.")],
    budget: Annotated[int, typer.Option("--budget", "-n", help="How many tasks to queue.")] = 20,
    strategy: Annotated[str, typer.Option(help="random, uncertainty, disagreement or hybrid.")] = "hybrid",
    model: Annotated[str | None, typer.Option("--model", "-m", help="The CNN (YOLO weights or a registry version); default: the project's binding, else what "
                                                 "served it, else the model this TANDEM_HOME served last.")] = None,
    second_model: Annotated[
        str | None,
        typer.Option(help="The second opinion for disagreement: a VLM (hub id or save_pretrained folder) or YOLO weights."),
    ] = None,
    weight_uncertainty: Annotated[float, typer.Option(help="Hybrid weight of uncertainty.")] = 0.5,
    weight_disagreement: Annotated[float, typer.Option(help="Hybrid weight of disagreement.")] = 0.5,
    control: Annotated[float, typer.Option(help="Share of the budget picked at random as a control.")] = 0.1,
    pool_factor: Annotated[float, typer.Option(help="Diversity picks among the top pool-factor × budget.")] = 4.0,
    cold_start: Annotated[int, typer.Option(help="Below this many labeled tasks, pick typical images instead.")] = 0,
    aggregate: Annotated[
        str | None,
        typer.Option(help="Detection: rank an image by its worst box (max), its typical box (mean), or how much is "
                          "doubtful (capped_sum, the default: uncertainty summed over boxes, disagreement as a count "
                          "of boxes)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random control slice and of k-center's start.")] = 0,
    dry_run: Annotated[bool, typer.Option(help="Write CSV/JSON instead of touching Label Studio.")] = False,
    out: Annotated[Path, typer.Option(help="Folder for --dry-run files.")] = Path("tandem-selection"),
    home: Home = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda:0 … (default: CUDA when present).")] = None,
) -> None:
    """Rank a project's unlabeled tasks and queue the most useful ones for review in Label Studio."""
    import time

    from label_studio_sdk import LabelStudio
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from active_learning.pipeline import run_selection, write_dry_run, write_queue
    from active_learning.queue import LabelStudioQueue
    from active_learning.scoring import SELECT_AGGREGATE
    from active_learning.selection import SelectionConfig, Strategy
    from active_learning.uncertainty import AGGREGATES
    from backend.errors import ConfigError, TandemError
    from backend.media.fetch import MediaFetcher
    from backend.models.yolo import YoloAdapter
    from backend.predict import plan_for
    from backend.registry import Registry

    setup_logging("warning")
    settings = load_settings(home=home, device=device)
    if strategy not in {s.value for s in Strategy}:
        raise typer.BadParameter(f"--strategy must be one of {', '.join(s.value for s in Strategy)}")
    aggregate = aggregate or SELECT_AGGREGATE
    if aggregate not in AGGREGATES:
        raise typer.BadParameter(f"--aggregate must be one of {', '.join(AGGREGATES)}")
    if strategy == "disagreement" and not second_model:
        raise typer.BadParameter("--strategy disagreement needs --second-model: the VLM (hub id or folder) or the "
                                 "YOLO weights to disagree with")
    try:
        config = SelectionConfig(
            strategy=Strategy(strategy), budget=budget, control_fraction=control, pool_factor=pool_factor,
            cold_start_labels=cold_start, seed=seed,
            weights={"uncertainty": weight_uncertainty, "disagreement": weight_disagreement},
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if strategy == "hybrid" and weight_uncertainty <= 0 and not second_model:
        raise typer.BadParameter("hybrid with --weight-uncertainty 0 ranks by disagreement alone, which needs "
                                 "--second-model")
    if not settings.label_studio_url or not settings.label_studio_api_key:
        console.print("[red]error:[/] set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        raise typer.Exit(2)
    from backend.settings import CANDIDATE_CONF
    from backend.storage.predictions import PredictionRepo
    from backend.storage.projects import ProjectRepo
    from backend.storage.artifacts import localise
    from backend.storage.scores import ScoreRepo

    bound = ProjectRepo(settings.database_url).get(project)
    weights = model or (bound and (bound.model or bound.served_model))
    last = None
    if weights is None:
        last = Registry(settings.database_url).last_served()
        if last is None or not last.path:
            console.print("[red]error:[/] no --model given and this TANDEM_HOME has served none")
            raise typer.Exit(2)
        weights = localise(settings, last.path)
    second_given = second_model is not None
    needs_second = strategy in ("disagreement", "hybrid")  # random and uncertainty rank without it: never run it
    if second_model is None and needs_second and bound is not None and (
            bound.second_opinion or bound.served_second_opinion):
        second_model = bound.second_opinion or bound.served_second_opinion
        console.print(f"second opinion: [bold]{second_model}[/] (as served to project {project}; --second-model "
                      "picks another)")
    if registry_version := Registry(settings.database_url).get(str(weights)):
        weights = localise(settings, registry_version.path) if registry_version.path else weights
    with reading_project(settings, project):
        primary = YoloAdapter(weights, device=settings.device, conf=min(settings.conf, CANDIDATE_CONF))
        queue = LabelStudioQueue(LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key),
                                 project)
        tasks = queue.tasks()
        label_config = queue.label_config()
        # as /setup reads them: the environment's, overridden by the project's ML backend extra params
        settings = settings.model_copy(update={
            "label_map": {**settings.label_map, **queue.backend_extra("label_map")},
            "vlm_prompts": {**settings.vlm_prompts, **queue.backend_extra("prompts")}})
        # as /setup and `tandem train` refuse it: a detector's box doubt says nothing about a Choices project
        try:
            plan_for(primary, label_config, settings.label_map, settings.case_sensitive_labels)
        except ConfigError as exc:
            chosen = (f"--model {weights}" if model else
                      f"the model this TANDEM_HOME served last ({last.version}, {last.task}), as no --model was given"
                      if last else f"the model served to project {project} ({weights})")
            fix = ("fix the label_map (the ML backend's extra params, or TANDEM_LABEL_MAP), or pass --model WEIGHTS made "
                   "for this project" if settings.label_map else "pass --model WEIGHTS made for this project")
            raise ConfigError(f"{exc}. tandem select used {chosen}: {fix}") from exc
        try:
            second = _second_opinion(second_model, label_config, settings) if second_model else None
        except ConfigError as exc:
            if second_given:  # asked for by name: its refusal is the answer
                raise
            # the server's second opinion for the project cannot fill this config (it skips it too): rank without
            console.print(f"[yellow]warning:[/] the second opinion {second_model} cannot fill project {project}'s "
                          f"labeling config ({exc}); ranking without it")
            second = second_model = None

    if strategy == "hybrid" and not second_model:  # said once the project is read: not before a fatal error
        console.print("[yellow]warning:[/] no --second-model: hybrid ranks by uncertainty alone (no disagreement "
                      "scores, no 'Tandem: disagreements' view)")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=False) as bar:
            stages: dict[str, int] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in stages:
                    stages[stage] = bar.add_task(stage, total=total)
                bar.update(stages[stage], completed=done)

            outcome, table, ids = run_selection(
                tasks, label_config, MediaFetcher(settings.media()), primary, config, second=second,
                progress=progress, aggregate=aggregate, label_map=settings.label_map,
                case_sensitive=settings.case_sensitive_labels, store=PredictionRepo(settings.database_url),
                scores=ScoreRepo(settings.database_url), project_id=project, threshold=settings.conf,
                prompts=settings.vlm_prompts)
    except TandemError as exc:  # e.g. no class of the second model maps onto the project's labels
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    if dry_run:
        outcome.files = write_dry_run(outcome, table, ids, out)
    elif outcome.entries:
        try:
            write_queue(queue, outcome, tasks, run=time.strftime("%Y-%m-%dT%H:%M:%S"))
        except Exception as exc:  # Label Studio went away mid-write: keep the ranking, say so in one line
            from backend.labelstudio.errors import describe

            files = write_dry_run(outcome, table, ids, out)
            console.print(f"[red]error:[/] writing the queue to project {project} failed: "
                          f"{describe(exc, settings.label_studio_url)}; the ranking is saved in "
                          f"{', '.join(str(f) for f in files)} — run select again when Label Studio is back")
            raise typer.Exit(1) from exc

    shown = Table(title=f"Top picks — {outcome.mode}", show_lines=False)
    for col in ("rank", "task", "score", "uncertainty", "disagreement", "pick", "reason"):
        shown.add_column(col)
    for e in outcome.entries[:15]:
        d = "" if e.disagreement is None else f"{e.disagreement:.3f}"
        shown.add_row(str(e.rank), str(e.task_id), f"{e.score:.3f}", f"{e.uncertainty:.3f}", d,
                      "control" if e.control else "active", e.reason)
    stdout_console().print(shown)
    console.print(
        f"{len(outcome.entries)} {'selected (dry run: Label Studio untouched)' if dry_run else 'queued'} of "
        f"{outcome.candidates} unlabeled ({outcome.labeled} labeled) "
        f"in {outcome.seconds:.1f} s; {outcome.from_store} ranked from stored predictions, {outcome.predicted} "
        "predicted now" + (f" ({outcome.second_only} of them by the second opinion only: their CNN predictions "
                           "were stored)" if outcome.second_only else "")
        + (f"; {len(outcome.skipped)} skipped (unreadable images)" if outcome.skipped else "")
    )
    for task_id, why in list(outcome.skipped.items())[:10]:
        console.print(f"  [yellow]skipped task {task_id}:[/] {why}")
    if outcome.files:
        console.print("wrote " + ", ".join(str(f) for f in outcome.files))
    if outcome.views:
        console.print("Label Studio views: " + ", ".join(f"{t} (#{i})" for t, i in outcome.views.items()))
    if second is not None and (why := same_opinion(table)):
        console.print(f"[yellow]warning:[/] {why}")


def same_opinion(table, at_least: int = 20) -> str | None:
    """A second opinion that never disagrees is no second opinion: the same weights under another file (a
    starter trained twice is bit-identical), or a copy. Said when it agreed exactly on every one of `at_least`
    or more tasks."""
    import numpy as np

    if table is None or table.disagreement is None:
        return None
    d = np.asarray(table.disagreement, float)
    d = d[np.isfinite(d)]
    if len(d) < at_least or d.max() > 0:
        return None
    return (f"the second opinion agreed exactly with the CNN on all {len(d)} tasks. If it is the same weights under "
            "another file, it adds nothing to rank by: disagreement needs a model trained differently (other data, "
            "seed or architecture), or a VLM")


def _second_opinion(source: str, label_config: str, settings):
    """YOLO weights (.pt/.onnx/...) stay a YOLO adapter; anything else is a VLM bound to the config's labels."""
    from backend.models.yolo import YoloAdapter
    from backend.predict import plan_for

    from backend.settings import CANDIDATE_CONF

    if Path(source).suffix in (".pt", ".onnx", ".torchscript", ".engine") or source.endswith("_openvino_model"):
        yolo = YoloAdapter(source, device=settings.device, conf=min(settings.conf, CANDIDATE_CONF))
        plan_for(yolo, label_config, settings.label_map, settings.case_sensitive_labels)  # ConfigError if it cannot
        return yolo
    from backend.models.vlm.loader import load_vlm

    vlm = load_vlm(source, device=settings.device)
    return plan_for(vlm, label_config, settings.label_map, settings.case_sensitive_labels,
                    settings.vlm_prompts).controls[0].adapter
