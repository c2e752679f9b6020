"""A tiny random-weight SAM 3 for the tests (the real transformers classes at toy sizes, built offline by
`backend.models.sam3.build_tiny`), a scene with known instance masks, and `teach`: a few optimizer steps on one
image so the tiny model's masks can be checked against the truth (random weights prove little about quality)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from backend.models.sam3 import Sam3Segmenter, build_tiny


def tiny_sam3(root: Path) -> Path:
    """The checkpoint folder, built once per root from a fixed seed."""
    import torch

    out = Path(root) / "tiny_sam3"
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        build_tiny(out)
    return out


def scene(width: int = 128, height: int = 96, box=(30, 20, 78, 68), seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """A noisy dark image with one bright square; returns the image and its (H, W) truth mask."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    truth = np.zeros((height, width), bool)
    x0, y0, x1, y1 = box
    truth[y0:y1, x0:x1] = True
    pixels[truth] = (230, 200, 40)
    return Image.fromarray(pixels), truth


def teach(segmenter: Sam3Segmenter, image: Image.Image, truth: np.ndarray, present: str, absent: str,
          steps: int = 80, lr: float = 3e-3) -> None:
    """Teach the model on one image: for prompt `present`, query 0 is the object (its mask = `truth`, its score
    high), every other query is background; for prompt `absent`, nothing is there (presence low)."""
    import torch
    import torch.nn.functional as F

    model = segmenter.model
    batch = segmenter.processor.image_processor(images=[image], return_tensors="pt")
    pixels = batch["pixel_values"].to(segmenter.device, model.dtype)
    text = segmenter._text([present, absent])
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        out = segmenter.forward(pixels, text)
        h, w = out.pred_masks.shape[-2:]
        target = F.interpolate(torch.as_tensor(truth, dtype=torch.float32)[None, None], size=(h, w),
                               mode="bilinear", align_corners=False)[0, 0].gt(0.5).float()
        logits = out.pred_logits  # (2, Q): row 0 = present prompt, row 1 = absent
        want = torch.zeros_like(logits)
        want[0, 0] = 1.0
        mask_logits = out.pred_masks[0, 0]
        prob = mask_logits.sigmoid()
        dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
        loss = (F.binary_cross_entropy_with_logits(logits, want)
                + F.binary_cross_entropy_with_logits(out.presence_logits.reshape(-1), torch.tensor([1.0, 0.0]))
                + F.binary_cross_entropy_with_logits(mask_logits, target) + dice)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
