"""`tandem models`: list model versions, promote one, roll back to the parent."""

from __future__ import annotations

from typing import Annotated

import typer

from backend.cli.common import Home, app, console, stdout_console, stores

models_app = typer.Typer(help="Model versions: list, promote, rollback.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(home: Home = None) -> None:
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


def _require_loadable(found) -> None:
    """Never serve weights that do not load: a YOLO file through the YOLO adapter, a VLM (or LoRA) folder as
    the server would load it."""
    from backend.errors import TandemError

    try:
        if found.kind == "vlm":
            from backend.models.vlm.loader import load_vlm

            console.print(f"checking that {found.version} loads ({found.path})…")
            load_vlm(found.path, device="cpu")
        else:
            from backend.models.yolo import YoloAdapter

            YoloAdapter(found.path, device="cpu")
    except TandemError as exc:
        console.print(f"[red]error:[/] {found.version}: {exc}")
        raise typer.Exit(2) from exc


@models_app.command("promote")
def models_promote(version: str, home: Home = None) -> None:
    """Serve VERSION now, a CNN or a VLM version (a running server swaps within seconds)."""
    _, registry, _ = stores(home)
    found = registry.get(version)
    if found is None or not found.path:
        console.print(f"[red]error:[/] no version {version} (tandem models list shows them)")
        raise typer.Exit(2)
    _require_loadable(found)
    registry.set_status(version, "promoted")
    console.print(f"{version} promoted")


@models_app.command("rollback")
def models_rollback(
    vlm: Annotated[bool, typer.Option("--vlm", help="Roll back the VLM (its LoRA versions) instead of the CNN.")] = False,
    home: Home = None,
) -> None:
    """Serve the parent of the current CNN version (or, with --vlm, of the current VLM version) again."""
    _, registry, _ = stores(home)
    kind = "vlm" if vlm else "cnn"
    current = registry.current(kind)
    parent = registry.get(current.parent) if current and current.parent else None
    if parent is None or not parent.path:
        console.print(f"[red]error:[/] the current {kind.upper()} version "
                      f"{current.version if current else '(none)'} has no parent to roll back to")
        raise typer.Exit(2)
    _require_loadable(parent)
    registry.set_status(parent.version, "promoted")
    registry.set_status(current.version, "rolled back")  # not "rejected": the gate had promoted it
    console.print(f"rolled back from {current.version} to {parent.version}")
