"""LoRA fine-tuning of a generative VLM on corrected labels (peft), with no Tandem state: the worker calls it.

Only the language model is adapted: each family declares a `target_modules` regex rooted in its language
model (`Family.lora_targets` in backend/models/families/; see `spec.llm_targets` for why not a plain list).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from backend.models.vlm import ADAPTER_BASE_FILE
from backend.models.vlm.base import chunks
from backend.models.vlm.generative import GenerativeVlm
from backend.training.vlm_examples import Example

DEFAULTS = {"epochs": 3, "batch": 4, "lr": 2e-4, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "seed": 0}


@torch.no_grad()
def mean_loss(vlm: GenerativeVlm, examples: Sequence[Example], batch: int) -> float:
    """Token-weighted loss of the answers: the number the promotion gate compares."""
    vlm.model.eval()
    total = tokens = 0.0
    for part in chunks(examples, batch):
        inputs = vlm._to_device(vlm.teacher_forced(list(part)))
        n = float((inputs["labels"] != -100).sum())
        total += float(vlm.model(**inputs).loss) * n
        tokens += n
    return total / tokens if tokens else math.nan


def lora_fine_tune(
    vlm: GenerativeVlm,
    train: Sequence[Example],
    val: Sequence[Example],
    out_dir: Path,
    base_source: str,
    params: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    from peft import LoraConfig, get_peft_model

    p = {**DEFAULTS, **(params or {})}
    random.seed(p["seed"])
    torch.manual_seed(p["seed"])
    config = LoraConfig(r=int(p["lora_r"]), lora_alpha=int(p["lora_alpha"]), lora_dropout=float(p["lora_dropout"]),
                        target_modules=vlm.spec.lora_targets, bias="none")
    vlm.model = get_peft_model(vlm.model, config)
    trainable = [t for t in vlm.model.parameters() if t.requires_grad]
    n_trainable = sum(t.numel() for t in trainable)
    adapted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in vlm.model.named_modules() if n.endswith("lora_A")})
    log(f"LoRA r={p['lora_r']} on {len(adapted)} language-model modules: {n_trainable:,} trainable parameters")

    before = mean_loss(vlm, val, int(p["batch"]))
    log(f"validation loss before: {before:.4f} ({len(val)} examples)")
    optimizer = torch.optim.AdamW(trainable, lr=float(p["lr"]))
    order = list(train)
    t0 = time.perf_counter()
    history = []
    for epoch in range(int(p["epochs"])):
        random.shuffle(order)
        vlm.model.train()
        losses = []
        for step, part in enumerate(chunks(order, int(p["batch"])), start=1):
            loss = vlm.model(**vlm._to_device(vlm.teacher_forced(list(part)))).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            log(f"epoch {epoch + 1}/{p['epochs']} step {step}: loss {losses[-1]:.4f}")
        history.append(sum(losses) / len(losses))
    after = mean_loss(vlm, val, int(p["batch"]))
    seconds = time.perf_counter() - t0
    log(f"validation loss after: {after:.4f} ({seconds:.1f} s of training)")

    out_dir = Path(out_dir)
    vlm.model.save_pretrained(out_dir)
    (out_dir / ADAPTER_BASE_FILE).write_text(json.dumps({"base": base_source, "model_type": vlm.model_type}))
    return {"adapter": str(out_dir), "val_loss_before": before, "val_loss_after": after, "train_loss": history,
            "seconds": seconds, "trainable_parameters": n_trainable, "adapted_modules": len(adapted)}
