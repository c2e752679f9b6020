"""`tandem serve`: a model served to Label Studio over the ML backend protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from backend.cli.common import Home, app, console, load_settings, setup_logging


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
    home: Home = None,
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
        typer.Option("--second-opinion", "--vlm",
                     help="The default second opinion, beside (or instead of) the CNN: a VLM hub id such as "
                     "google/owlv2-base-patch16-ensemble or a folder written by save_pretrained, or other YOLO "
                     "weights (a differently trained CNN). Projects may bind their own (tandem models bind).",
                     envvar="TANDEM_VLM"),
    ] = None,
    pre_annotator: Annotated[
        str | None,
        typer.Option(help="Whose predictions Label Studio receives: cnn or vlm (the other's are kept for "
                     "disagreement). Default: cnn, or vlm when only a VLM is given (no --model, no --starter-task).",
                     envvar="TANDEM_PRE_ANNOTATOR"),
    ] = None,
    vlm_threshold: Annotated[float | None, typer.Option(
        help="Minimum score of the VLM's boxes or masks: a zero-shot detector's (default: its family's, e.g. "
             "OWLv2 0.1) or SAM 3's (0.4). A task's stored prediction made under another threshold is predicted "
             "again when Label Studio asks for it.")] = None,
    predict_budget: Annotated[
        float | None, typer.Option(help="Seconds per /predict call before the rest go to the background (60).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "info",
) -> None:
    """Serve a model to Label Studio over the ML backend protocol."""
    import uvicorn

    from backend.errors import TandemError

    setup_logging(log_level)
    _require_free_port(host, port)  # before the heavy imports and minutes of model loading, not after
    from backend.server.projects import is_cnn_spec

    settings = load_settings(home=home, model=model, device=device, conf=conf, vlm=vlm, engine=engine, imgsz=imgsz,
                             int8_calibration=calibration, predict_budget_s=predict_budget,
                             pre_annotator=pre_annotator or default_pre_annotator(model, vlm, starter_task))
    serves_cnn = bool(settings.model) or settings.pre_annotator == "cnn"  # else a VLM alone: no CNN is loaded
    if serves_cnn and settings.engine == "int8" and not (settings.int8_calibration and settings.int8_calibration.is_dir()):
        console.print("[red]error:[/] --engine int8 needs --calibration DIR: a folder of 16 or more images like "
                      f"the ones you serve (got {settings.int8_calibration or 'none'})")
        raise typer.Exit(2)
    second_is_cnn = bool(settings.vlm) and is_cnn_spec(settings.vlm)
    if settings.vlm and not second_is_cnn:  # before torch is imported: an unavailable checkpoint fails in under 1 s
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
    if second_is_cnn:
        try:
            vlm_holder = ModelHolder(settings.load_cnn(settings.vlm))
        except TandemError as exc:
            console.print(f"[red]error:[/] second opinion: {exc}")
            raise typer.Exit(2) from exc
        console.print(f"Second opinion: the CNN [bold]{vlm_holder.adapter.version}[/]")
    elif settings.vlm:
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
                console.print(f"Training it once — {TRAINING_TIME[starter_task]} on 2 CPU cores; later starts reuse "
                              "it. Serve your own weights with --model.")
            weights = str(train_starter_model(settings.home, starter_task))
            try:
                adapter = _load_starter(settings, starter_task, Path(weights))
            except TandemError as exc:
                console.print(f"[red]error:[/] {exc}")
                raise typer.Exit(2) from exc
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


def default_pre_annotator(model: str | None, second: str | None, starter_task: str | None = None) -> str | None:
    """"vlm" when only a VLM (or an open-vocabulary YOLOE / YOLO-World, which names any label) is given: it
    pre-annotates alone. None (the settings' cnn) otherwise: other closed-set YOLO weights as the second opinion
    keep the starter, or the version promoted last, as the CNN beside them; so does an explicit --starter-task
    (`--starter-task segment --vlm sam3`: YOLO-seg pre-annotates, SAM 3 is the second opinion)."""
    from backend.models.open_vocab import is_open_vocab
    from backend.server.projects import is_cnn_spec

    alone = second and not model and not starter_task
    return "vlm" if alone and (not is_cnn_spec(second) or is_open_vocab(second)) else None


TRAINING_TIME = {"detect": "about 3–5 minutes", "segment": "about 4–7 minutes", "classify": "under a minute"}


def _load_starter(settings, task: str, weights: Path):
    """The starter is Tandem's own file, made from a recipe: one that no longer loads (a copy cut short, a full
    disk) is moved aside to `<name>.damaged` and trained again, instead of stopping the server."""
    from backend.errors import TandemError
    from backend.models.starter import train_starter_model

    try:
        return settings.load_cnn(str(weights))
    except TandemError as exc:
        try:  # the engine (an OpenVINO export, a device) may be what failed: the file is judged on its own
            settings.load_cnn(str(weights), engine="torch", device="cpu")
        except TandemError:
            pass
        else:
            raise exc from None
        aside = weights.with_name(weights.name + ".damaged")
        try:
            weights.replace(aside)
        except FileNotFoundError:  # another server on this home moved it first, and trains it
            pass
        why = str(exc).removeprefix(f"cannot load YOLO weights {weights}: ").splitlines()[0].split(" (")[0][:160]
        console.print(f"[yellow]warning:[/] the starter model {weights} does not load ({why}); it is kept as "
                      f"{aside.name} and trained again — {TRAINING_TIME[task]} on 2 CPU cores")
    return settings.load_cnn(str(train_starter_model(settings.home, task)))


def _resume_promoted(settings, task: str | None):
    """A restart serves what the loop promoted last, not the starter again (--starter-task narrows it to a task).

    Weights that no longer load are passed over, with a warning, for the promotion before them."""
    import time

    from backend.errors import TandemError
    from backend.registry import Registry
    from backend.storage.artifacts import localise

    for version in Registry(settings.database_url).promoted("cnn", task):
        try:
            adapter = settings.load_cnn(localise(settings, version.path))
        except TandemError as exc:
            console.print(f"[yellow]warning:[/] cannot resume {version.version}: {exc}")
            continue
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(version.promoted_at))
        console.print(f"[bold]No --model given:[/] resuming [bold]{version.version}[/] ({version.task}), the version "
                      f"promoted last ({when}); --model PATH serves other weights")
        return adapter
    return None
