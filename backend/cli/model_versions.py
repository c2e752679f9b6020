"""`tandem models`: list model versions, promote one, roll back to the parent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from backend.cli.common import app, console, stdout_console, stores

models_app = typer.Typer(help="Model versions: list, promote, rollback.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(home: Annotated[Path | None, typer.Option(envvar="TANDEM_HOME")] = None) -> None:
    """Every version: which one is served (▶), promoted or rejected, its score against its parent's."""
    from rich.table import Table

    _, registry, _ = stores(home)
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
    stdout_console().print(table)


@models_app.command("promote")
def models_promote(version: str, home: Annotated[Path | None, typer.Option(envvar="TANDEM_HOME")] = None) -> None:
    """Serve VERSION now (a running server swaps within seconds)."""
    from backend.errors import TandemError
    from backend.models.yolo import YoloAdapter

    _, registry, _ = stores(home)
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
    _, registry, _ = stores(home)
    current = registry.current()
    if current is None or not current.parent or registry.get(current.parent) is None:
        console.print("[red]error:[/] the current version has no parent to roll back to")
        raise typer.Exit(2)
    registry.set_status(current.parent, "promoted")
    registry.set_status(current.version, "rejected")
    console.print(f"rolled back from {current.version} to {current.parent}")
