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
        "Serves YOLOv8 pre-annotations to Label Studio (RectangleLabels, PolygonLabels, Choices). "
        "Run `tandem serve` and add http://HOST:PORT as the project's model under Settings → Model.\n\n"
        "Environment: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY (personal access token or legacy token), "
        "TANDEM_HOME (state, default ~/.tandem), BASIC_AUTH_USER/BASIC_AUTH_PASS, TANDEM_ALLOWED_HOSTS, "
        "TANDEM_LABEL_MAP (JSON {model class: label}), LOCAL_FILES_DOCUMENT_ROOT."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
console = Console(stderr=True)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(message)s", handlers=[RichHandler(console=console, show_path=False)]
    )


@app.command()
def serve(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="YOLO weights path (detect, segment or classify), or an ultralytics name such as yolov8n.pt "
            "(downloaded only where a network exists). Default: a starter model trained on first start.",
            envvar="TANDEM_MODEL",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port Label Studio connects to.")] = 9090,
    home: Annotated[Path | None, typer.Option(help="State folder (env TANDEM_HOME).", envvar="TANDEM_HOME")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda:0 … (default: CUDA when present).")] = None,
    conf: Annotated[float | None, typer.Option(help="Minimum box confidence (env TANDEM_CONF, 0.25).")] = None,
    starter_task: Annotated[
        str, typer.Option(help="Task of the starter model when --model is not given: detect, segment, classify.")
    ] = "detect",
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "info",
) -> None:
    """Serve a model to Label Studio over the ML backend protocol."""
    import uvicorn

    from backend.errors import TandemError
    from backend.models.starter import RECIPES, train_starter_model
    from backend.models.yolo import YoloAdapter
    from backend.server.app import create_app
    from backend.serving import ModelHolder
    from backend.settings import Settings

    _logging(log_level)
    try:
        settings = Settings.from_env(home=home, model=model, device=device, conf=conf)
    except Exception as exc:
        raise typer.BadParameter(str(exc)) from exc
    if starter_task not in RECIPES:
        raise typer.BadParameter(f"--starter-task must be one of {', '.join(RECIPES)}")
    settings.home.mkdir(parents=True, exist_ok=True)

    weights = settings.model
    if weights is None:
        console.print(f"[bold]No --model given:[/] using the starter YOLOv8n {starter_task} model in {settings.home}")
        weights = str(train_starter_model(settings.home, starter_task))

    # Fail at start, in under a second, on a missing file or an offline hub name.
    try:
        adapter = YoloAdapter(weights, device=settings.device, conf=settings.conf)
    except TandemError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    console.print(
        f"Serving [bold]{adapter.version}[/] ({adapter.task.value}, {len(adapter.class_names)} classes, "
        f"{adapter.device}) on http://{host}:{port}"
    )
    if not settings.label_studio_url:
        console.print("[yellow]LABEL_STUDIO_URL is not set:[/] images are fetched from the hostname Label Studio sends")
    uvicorn.run(create_app(settings, ModelHolder(adapter)), host=host, port=port, log_level=log_level.lower())


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
