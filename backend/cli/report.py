"""`tandem report`: what the pre-annotations were worth — edit rates per model version and class, minutes
saved against labelling from scratch, and where auto-accept stands (threshold, bound, coverage)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from backend.cli.common import Home, app, console, load_settings, setup_logging, stdout_console


def effort_used(effort, counts, items) -> str:
    """The effort model's prices for what this report counted (boxes or polygons, choices)."""
    polygons = any(e.polygons for e in items)
    return effort.describe(regions=bool(counts.final or counts.predicted), choices=bool(counts.choices),
                           polygons=polygons)


def project_edits(evidence) -> list:
    """Every (model version's pre-annotation as shown, final human annotation) pair of the project's reviewed
    tasks."""
    from active_learning.telemetry import edits

    out = []
    for ev in evidence.tasks:
        if ev.human is None:
            continue
        for version, pred in ev.shown.items():  # what the annotator saw, not the faint candidates kept for scoring
            out.append(edits(pred, ev.human, ev.task_id, version, ev.human_when))
    return out


def seen_edits(evidence) -> tuple[list, int]:
    """One pair per reviewed task, for the totals: the pre-annotation the person was shown when first
    annotating it (the newest Label Studio had by then; else the newest stored before then), since every promotion re-predicts every task and counting
    each version's pair would count one person's work once per version. A task annotated before any
    pre-annotation was stored is counted with its oldest one (what it would have saved); how many such tasks
    there are is returned with the pairs."""
    from active_learning.telemetry import edits

    out, before = [], 0
    for ev in evidence.tasks:
        if ev.human is None or not ev.shown:
            continue
        # what Label Studio had when the person annotated (a prediction only `tandem select` stored was never
        # shown); where Label Studio's list says nothing of then (none, or only predictions made again after the
        # annotation, which replaced the ones shown), what Tandem stored before then
        had = [v for v in ev.shown if ev.in_label_studio.get(v, float("inf")) <= ev.human_first]
        earlier = [v for v in ev.shown if ev.shown_at.get(v, 0.0) <= ev.human_first
                   and (not ev.in_label_studio or v in ev.in_label_studio)]  # never one only `select` stored
        if had:
            version = max(had, key=lambda v: ev.in_label_studio[v])
        elif earlier:
            version = max(earlier, key=lambda v: ev.shown_at.get(v, 0.0))
        else:
            version, before = min(ev.shown, key=lambda v: ev.shown_at.get(v, 0.0)), before + 1
        out.append(edits(ev.shown[version], ev.human, ev.task_id, version, ev.human_when))
    return out, before


def per_class_rows(per_class) -> list[tuple[str, ...]]:
    """The per-class table, header first: region edits, or for a Choices control the times each class was the
    predicted choice and how often a person kept it."""
    def pct(v: float) -> str:
        return "—" if math.isnan(v) else f"{v:.0%}"

    if any(c.choices for c in per_class.values()):
        return [("class", "predicted", "accepted"), *(
            (name, str(c.choices), f"{c.choices_accepted} ({pct(c.rate('choice_accept'))})")
            for name, c in sorted(per_class.items()))]
    return [("class", "unchanged", "moved", "relabelled", "deleted", "missed"), *(
        (name, str(c.unchanged), str(c.moved), str(c.relabelled), str(c.deleted), str(c.missed))
        for name, c in sorted(per_class.items()))]


def summary_json(project: int, summaries, total, cal, data, effort, annotated_first: int = 0) -> dict[str, Any]:
    """`versions`: every reviewed task each version pre-annotated; `total`: each task once, with the version
    shown when it was first annotated (`annotated_first` of them had none stored before: their oldest)."""
    def counts(c):
        return {"unchanged": c.unchanged, "moved": c.moved, "relabelled": c.relabelled, "deleted": c.deleted,
                "missed": c.missed, "choices": c.choices, "choices_accepted": c.choices_accepted}

    def rates(c):
        return {k: (None if math.isnan(v) else v) for k, v in (
            ("unchanged", c.rate("unchanged")), ("modified", c.rate("modified")), ("deleted", c.rate("deleted")),
            ("missed", c.rate("missed")), ("choice_accept", c.rate("choice_accept")))}

    def one(s):
        return {"tasks": s.tasks, "counts": counts(s.counts), "rates": rates(s.counts),
                "per_class": {k: counts(v) for k, v in s.per_class.items()},
                "scratch_seconds": s.scratch_seconds, "assisted_seconds": s.assisted_seconds,
                "saved_minutes": s.saved_minutes}

    return {"project": project, "at": time.time(), "effort": effort.as_dict(),
            "versions": {v: one(s) for v, s in summaries.items()},
            "total": {**one(total), "annotated_before_pre_annotation": annotated_first},
            "auto_accept": {"threshold": cal.threshold, "bound": cal.bound, "coverage": cal.coverage,
                            "n_verified": cal.n_verified, "needed": cal.needed, "reason": cal.reason,
                            "source": data.source}}


def _tick(version: str) -> str:
    """A version name on two lines at its last dash ("shapes-yolov8n-detect" / "23cddc8e"): a long name under
    a tick otherwise runs into its neighbours or the axis label."""
    head, _, tail = version.rpartition("-")
    return f"{head}\n{tail}" if head and len(version) > 14 else version


def write_plots(out: Path, summaries, items, data, cal=None, target: float | None = None) -> list[Path]:
    """Edit rates by model version (in the order they served), a reliability diagram, precision vs coverage
    (with the target precision and, when auto-accept is on, the threshold it chose)."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from active_learning.telemetry import precision_coverage, reliability

    out.mkdir(parents=True, exist_ok=True)
    files = []
    versions = sorted(summaries.values(), key=lambda s: s.first)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(versions) + 2), 4.5))
    kinds = ("unchanged", "modified", "deleted", "missed")
    x = range(len(versions))
    for k in kinds:
        ax.plot(x, [s.counts.rate(k) for s in versions], marker="o", label=k)
    if not versions:
        ax.text(0.5, 0.5, "no reviewed task with a stored pre-annotation yet", ha="center", va="center",
                transform=ax.transAxes, fontsize=9, color="grey")
    ax.set_xticks(list(x), [_tick(s.model_version) for s in versions], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of predicted regions (missed: of final)")
    ax.set_title("Edit rates by model version (oldest first)")
    ax.legend()
    fig.tight_layout()
    files.append(out / "edit_rates.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    centres, share, count = reliability(items)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    ok = count > 0
    ax.plot(centres[ok], share[ok], marker="o", label="accepted unchanged")
    for c, s, n in zip(centres[ok], share[ok], count[ok], strict=True):
        ax.annotate(str(int(n)), (c, s), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("pre-annotation confidence")
    ax.set_ylabel("share accepted unchanged")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_title("Reliability: confidence vs acceptance")
    if not ok.any():
        ax.text(0.5, 0.5, "no reviewed pre-annotated region yet", ha="center", va="center", transform=ax.transAxes,
                fontsize=9, color="grey")
    ax.legend()
    fig.tight_layout()
    files.append(out / "reliability.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    coverage, precision = precision_coverage(data.scores, data.correct, max(data.regions, len(data.scores)))
    fig, ax = plt.subplots(figsize=(6, 4))
    if target is not None:
        ax.axhline(target, ls="--", color="grey", lw=1, label=f"target precision {target:g}")
    if len(coverage):
        ax.plot(coverage, precision, marker=".", label="realised on verified regions")
        if cal is not None and cal.threshold is not None:
            scores, correct = np.asarray(data.scores, float), np.asarray(data.correct, bool)
            kept = scores >= cal.threshold
            at = (kept.sum() / max(data.regions, len(scores)), correct[kept].mean() if kept.any() else 0.0)
            ax.plot(*at, "o", color="tab:red", ms=8,
                    label=f"chosen: agreement ≥ {cal.threshold:.3g} (precision ≥ {1 - cal.bound:.3f} at {1 - cal.delta:.0%})")
    else:  # an empty frame reads as a bug: say why it is empty
        ax.text(0.5, 0.5, "no verified task where both models answered yet:\nnothing to plot (tandem accept "
                "says how many it needs)", ha="center", va="center", transform=ax.transAxes, fontsize=9,
                color="grey")
    off = (None if cal is None or cal.threshold is not None or not len(coverage) else
           "auto-accept is off: " + ("too few verified regions" if cal.needed else "no threshold meets the target"))
    ax.set_xlabel("coverage (share of final regions auto-accepted)")
    ax.set_ylabel("precision of auto-accepted regions")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)  # a curve at precision 1.0 stays off the frame
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower left", title=off, title_fontsize=8)  # the note in the legend: never under it
    ax.set_title(f"Auto-accept on verified tasks ({data.source})")
    fig.tight_layout()
    files.append(out / "precision_coverage.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    return files


def reports_dir(home: Path) -> Path:
    """Where the latest report of each project is kept as JSON; /metrics reads it."""
    from backend.server.metrics import reports_dir as folder

    return folder(home)


@app.command()
def report(
    project: Annotated[int, typer.Option("--project", "-p", help="Label Studio project id.")],
    out: Annotated[Path | None, typer.Option(help="Folder for the PNGs and report.json "
                                                  "(default tandem-report-PROJECT).")] = None,
    target: Annotated[float | None, typer.Option(help="Auto-accept precision target (default: the last `tandem "
                                                     "accept` run's on this project, else 0.98).")] = None,
    delta: Annotated[float | None, typer.Option(help="Auto-accept confidence 1 - delta (default: the last `tandem "
                                                    "accept` run's, else 0.05).")] = None,
    iou: Annotated[float, typer.Option(help="IoU at which two regions are the same region.")] = 0.5,
    control_name: Annotated[str | None, typer.Option("--control", help="The control to report on.")] = None,
    home: Home = None,
) -> None:
    """Edit rates of the pre-annotations per model version and class, human minutes saved, auto-accept status."""
    from rich.table import Table

    from active_learning.calibration import calibrate, min_verified
    from active_learning.effort import EffortModel
    from active_learning.telemetry import summarise, total
    from backend.cli.accept import calibration_data, load_evidence, no_second_opinion

    setup_logging("warning")
    settings = load_settings(home=home)
    from backend.cli.accept import read_record

    last = read_record(settings.home, project).get("calibration") or {}  # judged as auto-accept was last run
    target = target if target is not None else float(last.get("target") or 0.98)
    delta = delta if delta is not None else float(last.get("delta") or 0.05)
    try:
        effort = EffortModel.from_env()
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    _, evidence = load_evidence(settings, project, control_name)
    items = project_edits(evidence)
    summaries = summarise(items, effort)
    seen, annotated_first = seen_edits(evidence)
    everything = total(summarise(seen, effort))
    data = calibration_data(evidence, iou, min_verified(target, delta))
    cal = calibrate(data.scores, data.correct, target, delta)

    def pct(v: float) -> str:
        return "—" if math.isnan(v) else f"{v:.0%}"

    table = Table(title=f"Pre-annotation quality — project {project}, control '{evidence.control.name}'",
                  caption="a version's row: every reviewed task it pre-annotated, shown or not (a promotion "
                          "re-predicts every task); the total: each task once, with the version shown")
    for col in ("model version", "tasks", "regions shown", "unchanged", "modified (moved/relabelled)", "deleted",
                "missed", "choices accepted", "minutes saved"):
        table.add_column(col, justify="right" if col != "model version" else "left")
    everything.model_version = "total (as shown)"
    for s in [*sorted(summaries.values(), key=lambda s: s.first), everything]:
        c = s.counts
        table.add_row(s.model_version, str(s.tasks), str(c.predicted), f"{c.unchanged} ({pct(c.rate('unchanged'))})",
                      f"{c.modified} ({c.moved}/{c.relabelled})", f"{c.deleted} ({pct(c.rate('deleted'))})",
                      f"{c.missed} ({pct(c.rate('missed'))})",
                      f"{c.choices_accepted} of {c.choices}" if c.choices else "—", f"{s.saved_minutes:.1f}")
    stdout_console().print(table)
    if everything.per_class:
        per = Table(title="Per class (each task once, as shown)")
        header, *rows = per_class_rows(everything.per_class)
        for col in header:
            per.add_column(col, justify="right" if col != "class" else "left")
        for row in rows:
            per.add_row(*row)
        stdout_console().print(per)
    if note := evidence.renamed_note():
        console.print(f"[yellow]note:[/] {note}")
    before = (f"; {annotated_first} of them annotated before any pre-annotation was stored, counted with their "
              "oldest: what it would have saved" if annotated_first else "")
    console.print(f"Human time: {everything.assisted_seconds / 60:.1f} min with pre-annotations vs "
                  f"{everything.scratch_seconds / 60:.1f} min from scratch on {everything.tasks} reviewed "
                  f"task{'s' * (everything.tasks != 1)}, each counted once with the version shown when first "
                  f"annotated{before}: [bold]{everything.saved_minutes:.1f} min saved[/] "
                  f"(effort model: {effort_used(effort, everything.counts, seen)}; TANDEM_EFFORT changes them)")
    missing = no_second_opinion(evidence)
    judged = (f"target precision {target:g} at {1 - delta:.0%} confidence"
              + (", as `tandem accept` last ran" if last.get("target") == target and last.get("delta") == delta
                 else ""))
    console.print(f"Auto-accept: {missing}" if missing else f"Auto-accept ({data.source}; {judged}): {cal.reason}")

    folder = out or Path(f"tandem-report-{project}")
    files = write_plots(folder, summaries, items, data, cal, target)
    payload = summary_json(project, summaries, everything, cal, data, effort, annotated_first)
    payload["total"]["left_out_renamed_labels"] = len(evidence.renamed)
    (folder / "report.json").write_text(json.dumps(payload, indent=2))
    reports = reports_dir(settings.home)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"project-{project}.json").write_text(json.dumps(payload, indent=2))
    console.print("wrote " + ", ".join(str(f) for f in [*files, folder / "report.json"]))


__all__ = ["per_class_rows", "project_edits", "reports_dir", "summary_json", "write_plots"]
