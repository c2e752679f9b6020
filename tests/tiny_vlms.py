"""Tiny random-weight checkpoints of every VLM family Tandem supports, for the tests.

The recipes live with the families (`Family.tiny` in backend/models/families/<family>.py, shared helpers in
backend/models/families/synthetic.py); this module keeps the tests' `build(name, root)` and adds `teach`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from backend.models.families import TINY_BUILDERS as BUILDERS  # name -> builder(folder)
from backend.models.families.synthetic import build as _build

__all__ = ["BUILDERS", "build", "teach"]


def build(name: str, root: Path) -> Path:
    """Build once per root (the folder is reused when it already holds a checkpoint)."""
    return _build(name, root)


def teach(model, examples, steps: int = 300, lr: float = 1e-2, target_loss: float = 0.01) -> tuple[float, float]:
    """Fine-tune every weight of a tiny generative VLM adapter on (image, question, answer) examples until it
    writes the answers; returns the first and last loss. Makes random weights say something checkable."""
    batch = model._to_device(model.teacher_forced(examples))
    optimizer = torch.optim.AdamW(model.model.parameters(), lr=lr)
    model.model.train()
    first = last = None
    for _ in range(steps):
        loss = model.model(**batch).loss
        first = loss.item() if first is None else first
        last = loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if last < target_loss:
            break
    model.model.eval()
    return first, last
