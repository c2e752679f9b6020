"""`tandem demo` (the whole loop, offline, in one command) and `tandem train-starter` (its model, alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from backend.cli.common import Home, app, console, load_settings, setup_logging, stdout_console


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

    setup_logging("warning")
    base = home or load_settings().home / "demo"
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
    mean = lambda v: sum(v) / len(v) if v else 0.0
    table.add_row("mean disagreement", f"{mean(s.disagreement_before):.3f} → {mean(s.disagreement_after):.3f}")
    table.add_row("time", f"{s.seconds['total']:.0f} s (" + ", ".join(f"{k} {v:.0f}s" for k, v in s.seconds.items()
                                                                   if k != "total") + ")")
    table.add_row("report", s.report)
    stdout_console().print(table)


@app.command("train-starter")
def train_starter(
    task: Annotated[str, typer.Option(help="detect, segment or classify.")] = "detect",
    home: Home = None,
) -> None:
    """Train the offline starter model on the generated shapes dataset and print its path."""
    from backend.models.starter import train_starter_model

    settings = load_settings(home=home)
    typer.echo(train_starter_model(settings.home, task))
