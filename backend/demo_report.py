"""The demo's report folder: PNG plots a person would rather look at than read, and a short README."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from backend.core.prediction import CLASS_NAME  # noqa: E402


def _learning_curve(out: Path, s) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([0, s.budget], [s.test_map50_before, s.test_map50_after], marker="o", label="held-out test mAP50")
    ax.plot([0, s.budget], [s.frozen_fitness_before, s.frozen_fitness_after], marker="s", linestyle="--",
            label="frozen val mAP50-95 (gate)")
    ax.set_xlabel("corrected labels")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.set_title(f"Before / after one review round ({'promoted' if s.promoted else 'not promoted'})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = out / "learning_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _histogram(out: Path, s) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    bins = [i / 20 for i in range(21)]
    ax.hist(s.disagreement_before, bins=bins, alpha=0.6, label="before (weak CNN)")
    ax.hist(s.disagreement_after, bins=bins, alpha=0.6, label="after (fine-tuned CNN)")
    ax.set_xlabel("CNN vs second-opinion disagreement")
    ax.set_ylabel("images")
    ax.set_title("Disagreement across the project")
    ax.legend()
    fig.tight_layout()
    path = out / "disagreement_histogram.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _examples(out: Path, examples, cnn, second) -> Path:
    fig, axes = plt.subplots(1, max(len(examples), 1), figsize=(4 * max(len(examples), 1), 3.4))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, (truth, image) in zip(axes, examples, strict=False):
        ax.imshow(image)
        for color, model, above in (("red", cnn, True), ("deepskyblue", second, False)):
            det = model.predict([image])[0].detections
            for (x1, y1, x2, y2), name, conf in zip(det.xyxy, det.data[CLASS_NAME], det.confidence, strict=True):
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color, linewidth=1.6))
                # the CNN's label above its box, the second opinion's below: boxes that agree do not overprint
                ax.text(x1, y1 - 2 if above else y2 + 2, f"{name} {conf:.2f}", color=color, fontsize=7,
                        va="bottom" if above else "top",
                        bbox={"facecolor": "white", "alpha": 0.7, "pad": 0.5, "linewidth": 0})
        for obj in truth.objects:
            x1, y1, x2, y2 = obj.box
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", linewidth=1, linestyle="--"))
        ax.set_axis_off()
    fig.suptitle("Top of the queue: CNN (red), second opinion (blue), ground truth (green, dashed)", fontsize=9)
    fig.tight_layout()
    path = out / "queue_examples.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def quality_vs_seconds(out: Path, rounds: list[dict], name: str = "quality_vs_human_seconds.png") -> Path:
    """Held-out mAP50 against cumulative human seconds, one line per arm: the saving is the horizontal gap."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, style in (("random", dict(color="grey", marker="o")), ("tandem", dict(color="tab:blue", marker="s"))):
        rows = sorted((r for r in rounds if r["arm"] == arm), key=lambda r: r["round"])
        if not rows:
            continue
        label = "random labelling, drawn from scratch" if arm == "random" else "Tandem: auto-accept + queue + retrain"
        ax.plot([r["human_seconds"] / 60 for r in rows], [r["test_map50"] for r in rows], label=label, **style)
        for r in rows[1:]:
            ax.annotate(f"r{r['round']}", (r["human_seconds"] / 60, r["test_map50"]), fontsize=7,
                        textcoords="offset points", xytext=(3, -9))
    ax.set_xlabel("simulated human minutes (effort model)")
    ax.set_ylabel("held-out test mAP50")
    ax.set_ylim(0, 1.02)
    ax.set_title("Quality against human time, per round")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def savings_text(savings: dict) -> str:
    """The savings in a few lines (README and console), every figure from the run."""
    if not savings:
        return ""
    reach = savings["tandem_seconds_to_random_final"]
    prec = savings["auto_accept_precision"]
    acts = lambda a: ", ".join(f"{k} {v}" for k, v in a.items())  # noqa: E731
    lines = [
        f"- random labelling: {savings['random_seconds'] / 60:.1f} human minutes ({acts(savings['random_actions'])}) "
        f"for held-out mAP50 {savings['random_final_map50']:.3f}",
        f"- Tandem: {savings['tandem_seconds'] / 60:.1f} human minutes ({acts(savings['tandem_actions'])}, "
        f"{savings['spot_checks']} spot-checks) for mAP50 {savings['tandem_final_map50']:.3f}",
        ("- Tandem reached random's final mAP50 after " f"{reach / 60:.1f} minutes: "
         f"{savings['share_of_random_seconds']:.0%} of random's time, {savings['seconds_saved'] / 60:.1f} minutes saved")
        if reach is not None else (
            "- Tandem did not reach random's final mAP50 in these rounds"
            if savings["random_final_map50"] > savings.get("start_map50", -1) else
            f"- random labelling ended where it started (mAP50 {savings['random_final_map50']:.3f}): no level to compare"),
        (f"- to reach mAP50 {savings['common_map50']:.3f} (the lower final): random "
         f"{savings['random_seconds_to_common'] / 60:.1f} minutes, Tandem {savings['tandem_seconds_to_common'] / 60:.1f}"
         f" ({savings['share_at_common']:.0%} of random's, "
         f"{(savings['random_seconds_to_common'] - savings['tandem_seconds_to_common']) / 60:.1f} minutes saved)") if savings.get("share_at_common") is not None else
        "- no quality level above the starting CNN's that both arms reached: no saving at equal quality claimed",
        f"- auto-accepted: {savings['auto_accepted_tasks']} tasks, {savings['auto_accepted_boxes']} boxes "
        f"({savings['coverage']:.0%} of the boxes Tandem labelled); precision against ground truth "
        + (f"{prec:.3f}" if prec is not None else "n/a (nothing auto-accepted: too few verified boxes to calibrate)"),
    ]
    return "\n".join(lines)


def write_report(out: Path, summary, examples, cnn, second) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [_learning_curve(out, summary), _histogram(out, summary), _examples(out, examples, cnn, second)]
    rounds, saved = getattr(summary, "rounds", []), getattr(summary, "savings", {})
    if rounds:
        paths.append(quality_vs_seconds(out, rounds))
    active = summary.queued_active or 1
    control = summary.queued_control or 1
    (out / "README.md").write_text(
        f"# Tandem demo report\n\n"
        f"- CNN {summary.cnn_version} → {summary.new_version} ({'promoted' if summary.promoted else 'not promoted'})\n"
        f"- held-out test mAP50: {summary.test_map50_before:.3f} → {summary.test_map50_after:.3f}\n"
        f"- frozen validation mAP50-95 (the promotion gate): {summary.frozen_fitness_before:.3f} → "
        f"{summary.frozen_fitness_after:.3f}\n"
        f"- queued tasks that really needed a correction: active picks {summary.active_needed_correction}/"
        f"{summary.queued_active} ({summary.active_needed_correction / active:.0%}), random control "
        f"{summary.control_needed_correction}/{summary.queued_control} "
        f"({summary.control_needed_correction / control:.0%})\n\n"
        + (f"## What Tandem saved ({len({r['round'] for r in rounds}) - 1} rounds beside random labelling)\n\n"
           f"{savings_text(saved)}\n\n" if rounds else "")
        + "\n".join(f"![{p.stem}]({p.name})" for p in paths) + "\n"
    )
    return paths
