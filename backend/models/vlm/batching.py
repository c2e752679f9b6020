"""How many images or sequences go through a VLM in one forward pass.

On CUDA the answer comes from free GPU memory (`torch.cuda.mem_get_info`) and what one item costs: its
key/value cache over all layers, one layer's activations and the float32 logits that are scored. On a
CPU there is no memory to read that means anything for speed, so a fixed sane default is used: big batches
on a few cores only add padding and latency.

The estimate is deliberately coarse (transient buffers, the allocator's fragmentation and the vision tower
are not modelled), so only `GPU_SHARE` of the free memory is planned for.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

GPU_SHARE = 0.5  # of the free GPU memory planned for one forward pass
CPU_IMAGES = 8  # images per forward pass on a CPU
CPU_SEQUENCES = 16  # teacher-forced sequences per forward pass on a CPU
MAX_ITEMS = 256  # never more in one pass, however much memory is free


@dataclass(frozen=True)
class TextCost:
    """Bytes per token of a language model: its KV cache (all layers) and one layer's activations."""

    kv_per_token: int
    activation_per_token: int
    vocab: int

    def sequence_bytes(self, tokens: int, scored: int) -> int:
        """One sequence of `tokens` tokens whose last `scored` positions' logits are kept (float32)."""
        return tokens * (self.kv_per_token + self.activation_per_token) + scored * self.vocab * 4


def text_cost(model) -> TextCost:
    """Read from the language model's config (the text config of a VLM); missing fields get typical values."""
    config = model.config
    text = getattr(config, "get_text_config", lambda **_: config)(decoder=True) or config
    get = lambda *names, default: next((getattr(text, n) for n in names if getattr(text, n, None)), default)  # noqa: E731
    hidden = int(get("hidden_size", "d_model", default=1024))
    layers = int(get("num_hidden_layers", "decoder_layers", "num_layers", default=24))
    heads = int(get("num_attention_heads", "decoder_attention_heads", default=16))
    kv_heads = int(get("num_key_value_heads", default=heads))
    head_dim = int(get("head_dim", default=hidden // max(heads, 1)))
    inter = int(get("intermediate_size", "decoder_ffn_dim", default=4 * hidden))
    vocab = int(get("vocab_size", default=32_000))
    itemsize = getattr(getattr(model, "dtype", None), "itemsize", 4)
    kv = 2 * layers * kv_heads * head_dim * itemsize
    activation = (4 * hidden + 3 * inter) * itemsize
    return TextCost(kv_per_token=kv, activation_per_token=activation, vocab=vocab)


def free_gpu_bytes(device: str) -> int | None:
    """Free memory on a CUDA device (what the caching allocator holds but does not use counts as free)."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def fit(device: str, item_bytes: int, cpu_default: int, cap: int = MAX_ITEMS, free: int | None = None) -> int:
    """Items per forward pass: from free GPU memory on CUDA (`free` overrides the reading, for tests), else
    `cpu_default`. Always at least 1 and at most `cap`."""
    free = free if free is not None else free_gpu_bytes(device)
    if free is None:
        return max(1, min(cap, cpu_default))
    return max(1, min(cap, int(free * GPU_SHARE) // max(int(item_bytes), 1)))


def accepts(fn, name: str) -> bool:
    """Whether `fn` takes keyword `name` (a model's forward, before passing it an optional argument)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def peak_bytes(device: str, fn):
    """(fn(), the CUDA memory it used at its peak above what was allocated before); bytes is None on a CPU.

    Sizes the batches of models whose cost is not a formula of their config (vision encoders, detectors):
    the first image runs alone and its peak sets how many fit in one pass."""
    if not str(device).startswith("cuda"):
        return fn(), None
    import torch

    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, max(int(torch.cuda.max_memory_allocated(device) - before), 1)


def same_size_groups(sizes: list[tuple[int, int]]) -> list[list[int]]:
    """Indices grouped by image size, in first-seen order (each group keeps the images' order)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(size, []).append(i)
    return list(groups.values())
