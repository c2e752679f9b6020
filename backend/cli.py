"""`tandem` — the command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

app = typer.Typer(
    name="tandem",
    help=(
        "Tandem: a Label Studio ML backend with an active-learning loop.\n\n"
        "Serves pre-annotations from YOLOv8 and/or a vision-language model to Label Studio (RectangleLabels, "
        "PolygonLabels, Choices), queues the tasks most worth a review (`tandem select`) and retrains on the "
        "corrections (`tandem train`, `tandem jobs`, `tandem models`). Run `tandem serve` and add "
        "http://HOST:PORT as the project's model under Settings → Model; `tandem demo` shows the whole loop.\n\n"
        "Environment: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY (personal access token or legacy token), "
        "TANDEM_HOME (state, default ~/.tandem), BASIC_AUTH_USER/BASIC_AUTH_PASS, TANDEM_ALLOWED_HOSTS, "
        "TANDEM_LABEL_MAP (JSON {model class: label}), LOCAL_FILES_DOCUMENT_ROOT."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
console = Console(stderr=True)


def _stdout() -> Console:
    """Tables on stdout; piped output gets a wide console so columns are not cut to 80 characters."""
    import sys

    return Console() if sys.stdout.isatty() else Console(width=220)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(message)s", handlers=[RichHandler(console=console, show_path=False)]
    )
    if level.lower() != "debug":  # one line per HTTP request (every image download) drowns what matters
        logging.getLogger("httpx").setLevel(logging.WARNING)


def _require_free_port(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            probe.bind((host, port))
        except OSError as exc:
            console.print(f"[red]error:[/] cannot listen on {host}:{port}: {exc.strerror} — is another server "
                          "(another tandem serve?) using it? Pick another with --port")
            raise typer.Exit(2) from exc


@app.command()
def serve(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="YOLO weights path (detect, segment or classify), or an ultralytics name such as yolov8n.pt "
            "(downloaded only where a network exists). Default: the version promoted last in TANDEM_HOME (a "
            "retrain or `tandem models promote`), else a starter model trained on first start.",
            envvar="TANDEM_MODEL",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port Label Studio connects to.")] = 9090,
    home: Annotated[Path | None, typer.Option(help="State folder (env TANDEM_HOME).", envvar="TANDEM_HOME")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda:0 … (default: CUDA when present).")] = None,
    conf: Annotated[float | None, typer.Option(help="Minimum box confidence (env TANDEM_CONF, 0.25).")] = None,
    imgsz: Annotated[int | None, typer.Option(help="Inference image size (default: the model's training size).")] = None,
    engine: Annotated[
        str | None,
        typer.Option(help="auto (OpenVINO on CPU, exported once per version and parity-checked; the default), "
                     "openvino, int8 (OpenVINO INT8 for detection, calibrated on --calibration; fastest on CPUs "
                     "without bf16), torch. Retrained versions are served the same way.", envvar="TANDEM_ENGINE"),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(help="Folder of images like the ones you serve (16 or more), for --engine int8.",
                     envvar="TANDEM_INT8_CALIBRATION"),
    ] = None,
    starter_task: Annotated[
        str | None,
        typer.Option(help="Task of the starter model when --model is not given: detect (default), segment, classify "
                     "(for a Choices project)."),
    ] = None,
    vlm: Annotated[
        str | None,
        typer.Option(help="A vision-language model beside (or instead of) the CNN: a hub id such as "
                     "google/owlv2-base-patch16-ensemble, or a folder written by save_pretrained.", envvar="TANDEM_VLM"),
    ] = None,
    pre_annotator: Annotated[
        str | None,
        typer.Option(help="Whose predictions Label Studio receives: cnn or vlm (the other's are kept for "
                     "disagreement). Default: cnn, or vlm when only --vlm is given.", envvar="TANDEM_PRE_ANNOTATOR"),
    ] = None,
    vlm_threshold: Annotated[float | None, typer.Option(help="Minimum box score of a zero-shot detector.")] = None,
    predict_budget: Annotated[
        float | None, typer.Option(help="Seconds per /predict call before the rest go to the background (60).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "info",
) -> None:
    """Serve a model to Label Studio over the ML backend protocol."""
    import uvicorn

    from backend.errors import TandemError
    from backend.settings import Settings

    _logging(log_level)
    _require_free_port(host, port)  # before the heavy imports and minutes of model loading, not after
    try:
        settings = Settings.from_env(home=home, model=model, device=device, conf=conf, vlm=vlm, engine=engine, imgsz=imgsz,
                                     int8_calibration=calibration, predict_budget_s=predict_budget,
                                     pre_annotator=pre_annotator or ("vlm" if vlm and not model else None))
    except Exception as exc:
        raise typer.BadParameter(str(exc)) from exc
    serves_cnn = bool(settings.model) or not settings.vlm  # no --model and no --vlm: the starter CNN
    if serves_cnn and settings.engine == "int8" and not (settings.int8_calibration and settings.int8_calibration.is_dir()):
        console.print("[red]error:[/] --engine int8 needs --calibration DIR: a folder of 16 or more images like "
                      f"the ones you serve (got {settings.int8_calibration or 'none'})")
        raise typer.Exit(2)
    if settings.vlm:  # before torch and ultralytics are imported: an unavailable checkpoint fails in under a second
        from backend.models.vlm.source import resolve_source

        try:
            resolve_source(settings.vlm)
        except TandemError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from exc

    from backend.models.starter import RECIPES, train_starter_model
    from backend.server.app import create_app
    from backend.serving import ModelHolder
    if starter_task is not None and starter_task not in RECIPES:
        raise typer.BadParameter(f"--starter-task must be one of {', '.join(RECIPES)}")
    settings.home.mkdir(parents=True, exist_ok=True)

    vlm_holder = None
    if settings.vlm:
        from backend.models.vlm.loader import load_vlm

        options = {"threshold": vlm_threshold} if vlm_threshold is not None else {}
        vlm_holder = ModelHolder()

        def load():
            return load_vlm(settings.vlm, device=settings.device, **options)

        vlm_holder.load_in_background(load)
        console.print(f"Loading the VLM [bold]{settings.vlm}[/] in the background")

    holder = ModelHolder()
    weights = settings.model
    adapter = None
    if weights is None and settings.pre_annotator == "cnn":
        adapter = _resume_promoted(settings, starter_task)
        if adapter is None:
            starter_task = starter_task or "detect"
            recipe = RECIPES[starter_task]
            stored = settings.home / "models" / "starter" / recipe.weights_name
            console.print(f"[bold]No --model given:[/] using the starter YOLOv8n {starter_task} model in "
                          f"{settings.home} (generated shapes {', '.join(recipe.classes)}, {recipe.imgsz} px)")
            if not stored.is_file():
                console.print("Training it once — about 3–5 minutes on 2 CPU cores; later starts reuse it. "
                              "Serve your own weights with --model.")
            weights = str(train_starter_model(settings.home, starter_task))
    if adapter is None and weights is not None:
        # Fail at start, in under a second, on a missing file or an offline hub name.
        try:
            adapter = settings.load_cnn(weights)
        except TandemError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from exc
    if adapter is not None:
        holder = ModelHolder(adapter)
        console.print(
            f"CNN [bold]{adapter.version}[/] ({adapter.task.value}, {len(adapter.class_names)} classes, "
            f"{adapter.device}, {adapter.engine})"
        )
    console.print(f"Serving on http://{host}:{port}; Label Studio receives the [bold]{settings.pre_annotator}[/]'s "
                  "predictions" + (", the other's are kept for disagreement" if vlm_holder and adapter else ""))
    if not settings.label_studio_url:
        console.print("[yellow]LABEL_STUDIO_URL is not set:[/] images are fetched from the hostname Label Studio sends")
    app_ = create_app(settings, holder, vlm=vlm_holder)
    uvicorn.run(app_, host=host, port=port, log_level=log_level.lower())


def _resume_promoted(settings, task: str | None):
    """A restart serves what the loop promoted last, not the starter again (--starter-task narrows it to a task).

    Weights that no longer load are passed over, with a warning, for the promotion before them."""
    import time

    from backend.errors import TandemError
    from backend.registry import Registry

    for version in Registry(settings.db_path).promoted("cnn", task):
        try:
            adapter = settings.load_cnn(version.path)
        except TandemError as exc:
            console.print(f"[yellow]warning:[/] cannot resume {version.version}: {exc}")
            continue
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(version.promoted_at))
        console.print(f"[bold]No --model given:[/] resuming [bold]{version.version}[/] ({version.task}), the version "
                      f"promoted last ({when}); --model PATH serves other weights")
        return adapter
    return None


@app.command()
def select(
    project: Annotated[int, typer.Option("--project", "-p", help="Label Studio project id.")],
    budget: Annotated[int, typer.Option("--budget", "-n", help="How many tasks to queue.")] = 20,
    strategy: Annotated[str, typer.Option(help="random, uncertainty, disagreement or hybrid.")] = "hybrid",
    model: Annotated[str | None, typer.Option("--model", "-m", help="The CNN (YOLO weights); default: last served.")] = None,
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
    home: Annotated[Path | None, typer.Option(help="State folder (env TANDEM_HOME).", envvar="TANDEM_HOME")] = None,
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
    from backend.errors import TandemError
    from backend.media.fetch import MediaFetcher
    from backend.models.yolo import YoloAdapter
    from backend.predict import plan_for
    from backend.registry import Registry
    from backend.settings import Settings

    _logging("warning")
    settings = Settings.from_env(home=home, device=device)
    if strategy not in {s.value for s in Strategy}:
        raise typer.BadParameter(f"--strategy must be one of {', '.join(s.value for s in Strategy)}")
    aggregate = aggregate or SELECT_AGGREGATE
    if aggregate not in AGGREGATES:
        raise typer.BadParameter(f"--aggregate must be one of {', '.join(AGGREGATES)}")
    if strategy == "disagreement" and not second_model:
        raise typer.BadParameter("--strategy disagreement needs --second-model: the VLM (hub id or folder) or the "
                                 "YOLO weights to disagree with")
    if budget < 1:
        raise typer.BadParameter("--budget must be at least 1")
    if not settings.label_studio_url or not settings.label_studio_api_key:
        console.print("[red]error:[/] set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        raise typer.Exit(2)
    weights = model
    if weights is None:
        last = Registry(settings.db_path).last_served()
        if last is None or not last.path:
            console.print("[red]error:[/] no --model given and this TANDEM_HOME has served none")
            raise typer.Exit(2)
        weights = last.path
    try:
        primary = YoloAdapter(weights, device=settings.device, conf=min(settings.conf, 0.1))
        queue = LabelStudioQueue(LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key),
                                 project)
        tasks = queue.tasks()
        label_config = queue.label_config()
        # as /setup reads them: the environment's, overridden by the project's ML backend extra params
        settings = settings.model_copy(update={
            "label_map": {**settings.label_map, **queue.backend_extra("label_map")},
            "vlm_prompts": {**settings.vlm_prompts, **queue.backend_extra("prompts")}})
        # as /setup and `tandem train` refuse it: a detector's box doubt says nothing about a Choices project
        plan_for(primary, label_config, settings.label_map, settings.case_sensitive_labels)
        second = _second_opinion(second_model, label_config, settings) if second_model else None
    except TandemError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    except Exception as exc:  # HTTP errors from the SDK: unreachable Label Studio, wrong key, no such project
        from backend.labelstudio.errors import describe

        console.print(f"[red]error:[/] cannot read project {project}: {describe(exc, settings.label_studio_url)}")
        raise typer.Exit(2) from exc

    if strategy == "hybrid" and not second_model:  # said once the project is read: not before a fatal error
        console.print("[yellow]warning:[/] no --second-model: hybrid ranks by uncertainty alone (no disagreement "
                      "scores, no 'Tandem: disagreements' view)")
    config = SelectionConfig(
        strategy=Strategy(strategy), budget=budget, control_fraction=control, pool_factor=pool_factor,
        cold_start_labels=cold_start, seed=seed,
        weights={"uncertainty": weight_uncertainty, "disagreement": weight_disagreement},
    )
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
                case_sensitive=settings.case_sensitive_labels)
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
    _stdout().print(shown)
    console.print(
        f"{len(outcome.entries)} queued of {outcome.candidates} unlabeled ({outcome.labeled} labeled) "
        f"in {outcome.seconds:.1f} s" + (f"; {len(outcome.skipped)} skipped (unreadable images)" if outcome.skipped else "")
    )
    for task_id, why in list(outcome.skipped.items())[:10]:
        console.print(f"  [yellow]skipped task {task_id}:[/] {why}")
    if outcome.files:
        console.print("wrote " + ", ".join(str(f) for f in outcome.files))
    if outcome.views:
        console.print("Label Studio views: " + ", ".join(f"{t} (#{i})" for t, i in outcome.views.items()))


def _second_opinion(source: str, label_config: str, settings):
    """YOLO weights (.pt/.onnx/...) stay a YOLO adapter; anything else is a VLM bound to the config's labels."""
    from backend.models.yolo import YoloAdapter
    from backend.predict import plan_for

    if Path(source).suffix in (".pt", ".onnx", ".torchscript", ".engine") or source.endswith("_openvino_model"):
        return YoloAdapter(source, device=settings.device, conf=min(settings.conf, 0.1))
    from backend.models.vlm.loader import load_vlm

    vlm = load_vlm(source, device=settings.device)
    return plan_for(vlm, label_config, settings.label_map, settings.case_sensitive_labels,
                    settings.vlm_prompts).controls[0].adapter


def _stores(home: Path | None):
    from backend.registry import Registry
    from backend.settings import Settings
    from backend.training.jobs import JobStore

    settings = Settings.from_env(home=home)
    return settings, Registry(settings.db_path), JobStore(settings.db_path)


@app.command()
def train(
    project: Annotated[int, typer.Option("--project", "-p", help="Label Studio project id.")],
    runner: Annotated[str, typer.Option(help="local (a separate process here) or modal (an H100 on Modal).")] = "local",
    model: Annotated[str, typer.Option(help="yolo (fine-tune the CNN) or vlm (a LoRA adapter on the generative VLM).")
                     ] = "yolo",
    epochs: Annotated[int | None, typer.Option(help="Epochs (YOLO: env TANDEM_TRAIN_EPOCHS, 30; VLM LoRA: 3).")] = None,
    imgsz: Annotated[int | None, typer.Option(help="Training image size (default: the serving model's).")] = None,
    server: Annotated[
        str | None, typer.Option(help="A running Tandem (http://host:port): queue the job there instead of here.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job's log until it ends.")] = True,
    home: Annotated[Path | None, typer.Option(envvar="TANDEM_HOME")] = None,
) -> None:
    """Fine-tune on the project's corrected labels; the new version is promoted only if it is not worse."""
    import time

    from backend.training.runner import LocalRunner, log_path

    if runner not in ("local", "modal"):
        raise typer.BadParameter("--runner must be local or modal")
    if model not in ("yolo", "vlm"):
        raise typer.BadParameter("--model must be yolo or vlm")
    settings, _, store = _stores(home)
    defaults = settings.training_params() if model == "yolo" else {}  # YOLO's epochs are not LoRA's
    params = {**defaults, **{k: v for k, v in {"epochs": epochs, "imgsz": imgsz}.items() if v}}
    if server:
        import httpx

        auth = settings.basic_auth
        r = httpx.post(f"{server.rstrip('/')}/train", json={"project": project, "runner": runner, "model": model,
                                                           "params": params, "reason": "tandem train"}, auth=auth, timeout=30)
        if r.status_code >= 400:
            console.print(f"[red]error:[/] {r.status_code} {r.text}")
            raise typer.Exit(2)
        job_id = r.json()["id"]
        console.print(f"queued job {job_id} on {server}")
    else:
        active = store.active(project)
        if active:
            console.print(f"project {project} already has job {active[0].id} ({active[0].status.value})")
            job_id = active[0].id
        else:
            if runner == "modal":
                from infra.modal_runner import ModalUnavailable, require_modal_credentials

                try:
                    require_modal_credentials()
                except ModalUnavailable as exc:
                    console.print(f"[red]error:[/] {exc}")
                    raise typer.Exit(2) from exc
            job = store.create(project, model, runner, "tandem train", params)
            job_id = job.id
            LocalRunner(settings, store).start(job)
            console.print(f"job {job_id} started ({runner})")
    if not wait:
        return
    path, shown = log_path(settings.home, job_id), 0
    while True:
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()
            for line in lines[shown:]:
                console.print(line, markup=False, highlight=False)
            shown = len(lines)
        job = store.get(job_id)
        if job and not job.status.active:
            break
        time.sleep(1)
    color = "green" if job.status.value == "succeeded" else "red"
    console.print(f"[{color}]job {job_id} {job.status.value}[/]" + (f": {job.error.splitlines()[0]}" if job.error else ""))
    if job.version:
        console.print(f"version {job.version}: {'promoted' if job.promoted else 'not promoted'}")
    raise typer.Exit(0 if job.status.value == "succeeded" else 1)


jobs_app = typer.Typer(help="Training jobs: list, show, logs, cancel.", no_args_is_help=True)
models_app = typer.Typer(help="Model versions: list, promote, rollback.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")


@jobs_app.command("list")
def jobs_list(project: Annotated[int | None, typer.Option("--project", "-p")] = None,
              home: Annotated[Path | None, typer.Option(envvar="TANDEM_HOME")] = None) -> None:
    """Every training job (or one project's): status, the version it made, whether it was promoted, why it failed."""
    from rich.table import Table

    _, _, store = _stores(home)
    table = Table(title="Tandem jobs")
    for col in ("id", "project", "status", "runner", "reason", "version", "promoted", "error"):
        table.add_column(col)
    for j in store.list(project):
        table.add_row(str(j.id), str(j.project_id), j.status.value, j.runner, j.reason, j.version or "",
                      "" if j.promoted is None else str(j.promoted), (j.error or "").splitlines()[0] if j.error else "")
    _stdout().print(table)


@jobs_app.command("show")
def jobs_show(job_id: int, home: Annotated[Path | None, typer.Option(envvar="TANDEM_HOME")] = None) -> None:
    """One job in full: parameters, timings, metrics of candidate and serving model."""
    import json
    import time

    _, _, store = _stores(home)
    job = store.get(job_id)
    if job is None:
        console.print(f"[red]error:[/] no job {job_id}")
        raise typer.Exit(2)
    shown = job.public()
    for key in ("created_at", "started_at", "finished_at"):  # epoch floats say nothing to a person
        if shown.get(key):
            shown[key] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(shown[key]))
    typer.echo(json.dumps(shown, indent=2, default=str))


@jobs_app.command("logs")
def jobs_logs(job_id: int, lines: int = 200, home: Annotated[Path | None, typer.Option(envvar="TANDEM_HOME")] = None) -> None:
    """The last LINES lines of a job's log (ultralytics' epochs, the export, the promotion verdict)."""
    from backend.training.runner import log_path, tail

    settings, _, store = _stores(home)
    if store.get(job_id) is None:
        console.print(f"[red]error:[/] no job {job_id} (tandem jobs list shows them)")
        raise typer.Exit(2)
    typer.echo(tail(log_path(settings.home, job_id), lines))


@jobs_app.command("cancel")
def jobs_cancel(job_id: int, home: Annotated[Path | None, typer.Option(envvar="TANDEM_HOME")] = None) -> None:
    """Stop a queued or running job; the served model stays as it is."""
    import os
    import signal

    from backend.training.jobs import JobStatus

    _, _, store = _stores(home)
    job = store.get(job_id)
    if job is None or not job.status.active:
        console.print(f"[red]error:[/] job {job_id} is not queued or running")
        raise typer.Exit(2)
    store.finish(job_id, JobStatus.CANCELLED, error="cancelled from the CLI")
    if job.pid:
        try:
            os.killpg(job.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    console.print(f"job {job_id} cancelled")


@models_app.command("list")
def models_list(home: Annotated[Path | None, typer.Option(envvar="TANDEM_HOME")] = None) -> None:
    """Every version: which one is served (▶), promoted or rejected, its score against its parent's."""
    from rich.table import Table

    _, registry, _ = _stores(home)
    current = registry.current()
    table = Table(title="Tandem model versions")
    for col in ("", "version", "task", "status", "fitness", "serving fitness", "parent", "dataset", "created"):
        table.add_column(col)
    import time as _t

    def score(metrics: dict) -> str:  # YOLO: fitness (mAP50-95 / top-1) on the frozen split; VLM LoRA: its loss
        if "fitness" in metrics:
            return f"{metrics['fitness']:.4f}"
        return f"loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""

    for v in registry.versions():
        cand, serv = v.metrics.get("candidate", {}), v.metrics.get("serving", {})
        table.add_row("▶" if current and v.version == current.version else "", v.version, v.task, v.status,
                      score(cand), score(serv),
                      v.parent or "", v.dataset or "", _t.strftime("%Y-%m-%d %H:%M", _t.localtime(v.created_at)))
    _stdout().print(table)


@models_app.command("promote")
def models_promote(version: str, home: Annotated[Path | None, typer.Option(envvar="TANDEM_HOME")] = None) -> None:
    """Serve VERSION now (a running server swaps within seconds)."""
    from backend.errors import TandemError
    from backend.models.yolo import YoloAdapter

    _, registry, _ = _stores(home)
    found = registry.get(version)
    if found is None or not found.path:
        console.print(f"[red]error:[/] no version {version}")
        raise typer.Exit(2)
    try:
        YoloAdapter(found.path, device="cpu")  # never promote weights that do not load
    except TandemError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    registry.set_status(version, "promoted")
    console.print(f"{version} promoted")


@models_app.command("rollback")
def models_rollback(home: Annotated[Path | None, typer.Option(envvar="TANDEM_HOME")] = None) -> None:
    """Serve the parent of the current version again."""
    _, registry, _ = _stores(home)
    current = registry.current()
    if current is None or not current.parent or registry.get(current.parent) is None:
        console.print("[red]error:[/] the current version has no parent to roll back to")
        raise typer.Exit(2)
    registry.set_status(current.parent, "promoted")
    registry.set_status(current.version, "rejected")
    console.print(f"rolled back from {current.version} to {current.parent}")


@app.command()
def demo(
    images: Annotated[int, typer.Option(help="Generated images in the demo project.")] = 60,
    budget: Annotated[int, typer.Option(help="Tasks queued for review (20% of them random controls).")] = 20,
    epochs: Annotated[int, typer.Option(help="Fine-tune epochs.")] = 30,
    out: Annotated[Path, typer.Option(help="Report folder (PNG plots, summary.json).")] = Path("tandem-demo-report"),
    home: Annotated[Path | None, typer.Option(help="State for the demo (default TANDEM_HOME/demo).")] = None,
) -> None:
    """The whole loop in one command, offline: Label Studio, pre-annotation, review queue, retrain, re-score."""
    import os
    import time

    os.environ.setdefault("YOLO_VERBOSE", "False")  # ultralytics' own logs would drown the demo's
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from backend.demo import run_demo
    from backend.settings import Settings

    _logging("warning")
    base = home or Settings.from_env().home / "demo"
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        overall = bar.add_task("[bold]Tandem demo", total=9)
        stages: dict[str, int] = {}

        def step(text: str) -> None:
            bar.console.print(f"[bold cyan]▶[/] [dim]{time.perf_counter() - started:5.0f}s[/] {text}")
            bar.advance(overall)

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in stages:
                stages[stage] = bar.add_task(f"  {stage}", total=total)
            bar.update(stages[stage], completed=done)
            if done >= total:
                bar.remove_task(stages.pop(stage))

        s = run_demo(base, out, images=images, budget=budget, epochs=epochs, step=step, progress=progress)
        bar.update(overall, completed=9)
    table = Table(title="Tandem demo", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("CNN", f"{s.cnn_version} → {s.new_version} ({'promoted' if s.promoted else 'not promoted'})")
    table.add_row("second opinion", f"{s.second_version} (a differently trained YOLOv8n; no VLM weights offline)")
    table.add_row("held-out test mAP50", f"{s.test_map50_before:.3f} → {s.test_map50_after:.3f}")
    table.add_row("frozen val mAP50-95 (gate)", f"{s.frozen_fitness_before:.3f} → {s.frozen_fitness_after:.3f}")
    table.add_row("queued, needed a correction", f"active {s.active_needed_correction}/{s.queued_active}, "
                  f"random control {s.control_needed_correction}/{s.queued_control}")
    mean = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
    table.add_row("mean disagreement", f"{mean(s.disagreement_before):.3f} → {mean(s.disagreement_after):.3f}")
    table.add_row("time", f"{s.seconds['total']:.0f} s (" + ", ".join(f"{k} {v:.0f}s" for k, v in s.seconds.items()
                                                                   if k != "total") + ")")
    table.add_row("report", s.report)
    _stdout().print(table)


@app.command("train-starter")
def train_starter(
    task: Annotated[str, typer.Option(help="detect, segment or classify.")] = "detect",
    home: Annotated[Path | None, typer.Option(envvar="TANDEM_HOME")] = None,
) -> None:
    """Train the offline starter model on the generated shapes dataset and print its path."""
    from backend.models.starter import train_starter_model
    from backend.settings import Settings

    settings = Settings.from_env(home=home)
    typer.echo(train_starter_model(settings.home, task))


if __name__ == "__main__":
    app()
