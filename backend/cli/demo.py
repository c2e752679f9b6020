"""`tandem demo` (the whole loop, offline, in one command) and `tandem train-starter` (its model, alone)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from backend.cli.common import Home, app, console, load_settings, setup_logging, stdout_console


def port_is_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@app.command()
def demo(
    images: Annotated[int, typer.Option(help="Generated images in the demo project.")] = 60,
    budget: Annotated[int, typer.Option(help="Tasks queued for review (20% of them random controls).")] = 20,
    epochs: Annotated[int, typer.Option(help="Fine-tune epochs.")] = 30,
    out: Annotated[Path, typer.Option(help="Report folder (PNG plots, summary.json).")] = Path("tandem-demo-report"),
    home: Annotated[Path | None, typer.Option(help="State for the demo (default TANDEM_HOME/demo).")] = None,
    rounds: Annotated[int, typer.Option(help="Offline rounds of Tandem's loop beside random labelling (0: none).")] = 3,
    round_images: Annotated[int, typer.Option(help="Generated images the rounds label from.")] = 150,
    round_budget: Annotated[int, typer.Option(help="Tasks a human reviews per round, in each arm.")] = 20,
    round_epochs: Annotated[int, typer.Option(help="Fine-tune epochs per round.")] = 10,
    label_studio_port: Annotated[int | None, typer.Option(help="Port of the demo's Label Studio on 127.0.0.1 "
                                                                "(default: a free one).")] = None,
    port: Annotated[int | None, typer.Option(help="Port of the demo's Tandem server on 127.0.0.1 (default: a free "
                                                  "one).")] = None,
) -> None:
    """The whole loop in one command, offline: Label Studio, pre-annotation, review queue, retrain, re-score; then
    rounds of auto-accept + queue + retrain beside random labelling, with the human seconds each arm cost."""
    import os
    import time

    os.environ.setdefault("YOLO_VERBOSE", "False")  # ultralytics' own logs would drown the demo's
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from backend.demo import RoundsPlan, run_demo

    setup_logging("warning")
    for option, number in (("--label-studio-port", label_studio_port), ("--port", port)):
        if number is not None and not port_is_free(number):
            raise typer.BadParameter(f"port {number} on 127.0.0.1 is in use; pick another, or leave {option} out "
                                     "for a free one")
    base = home or load_settings().home / "demo"
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        overall = bar.add_task("[bold]Tandem demo", total=10 + rounds * 2 * bool(rounds))
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

        plan = RoundsPlan(rounds=rounds, images=round_images, budget=round_budget, epochs=round_epochs)
        s = run_demo(base, out, images=images, budget=budget, epochs=epochs, step=step, progress=progress,
                     plan=plan if rounds > 0 else None, label_studio_port=label_studio_port, port=port)
        bar.update(overall, completed=bar.tasks[0].total)
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
    if s.rounds:
        print_rounds(s.rounds, s.savings)


def print_rounds(rounds: list[dict], savings: dict) -> None:
    """Per round and arm: human actions and seconds, auto-accepts, held-out quality; then the savings."""
    from rich.table import Table

    from backend.demo_report import savings_text

    table = Table(title="Rounds: Tandem's loop vs random labelling (simulated annotator, effort model seconds)")
    for col in ("arm", "round", "labelled", "human tasks", "verify/modify/delete/draw", "auto-accepted tasks (boxes)",
                "auto precision", "human min", "held-out mAP50"):
        table.add_column(col, justify="right" if col not in ("arm",) else "left")
    for r in sorted(rounds, key=lambda r: (r["arm"] != "random", r["round"])):
        a = r["actions"]
        prec = f"{r['auto_correct'] / r['auto_boxes']:.3f}" if r["auto_boxes"] else "-"
        table.add_row(r["arm"], str(r["round"]), str(r["labelled"]), str(r["human_tasks"]),
                      f"{a['verify']}/{a['modify']}/{a['delete']}/{a['draw']}",
                      f"{r['auto_tasks']} ({r['auto_boxes']})" if r["arm"] == "tandem" else "-", prec,
                      f"{r['human_seconds'] / 60:.1f}", f"{r['test_map50']:.3f}")
    out = stdout_console()
    out.print(table)
    out.print("[bold]What Tandem saved[/]")
    out.print(savings_text(savings), markup=False)


@app.command("train-starter")
def train_starter(
    task: Annotated[str, typer.Option(help="detect, segment or classify.")] = "detect",
    seed: Annotated[int, typer.Option(
        min=0, help="Another seed draws other images and trains another model (its own file): an offline "
                    "second opinion for `tandem serve --second-opinion`. 0 is the served starter.")] = 0,
    home: Home = None,
) -> None:
    """Train the offline starter model on the generated shapes dataset and print its path."""
    from dataclasses import replace

    from backend.models.starter import RECIPES, train_starter_model

    if task not in RECIPES:
        raise typer.BadParameter(f"{task!r}: choose one of {', '.join(RECIPES)}", param_hint="--task")
    settings = load_settings(home=home)
    with contextlib.redirect_stdout(sys.stderr):  # ultralytics' log and bars: stdout is the path, for $(...)
        path = train_starter_model(settings.home, task, replace(RECIPES[task], seed=seed))
    typer.echo(path)
