"""Where a VLM's weights come from: a local directory or a Hugging Face hub id — and a fast, clear
error when neither is available.

huggingface_hub retries an unreachable hub with backoff for minutes (about 147 s on this machine for one
uncached id). Tandem never lets it: a cached snapshot is used as is, HF_HUB_OFFLINE=1 is honoured, and
otherwise the hub is probed once with a sub-second timeout before any download starts.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from backend.errors import ModelLoadError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PROBE_TIMEOUT_S = 0.5


def hub_offline() -> bool:
    """The same switch huggingface_hub reads (it reads it at import; Tandem reads it per call)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the hub; DNS is bounded too (it runs in a thread we stop waiting for)."""
    url = urlparse(endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    ok = threading.Event()

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.set()
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return ok.is_set()


def resolve_source(source: str, revision: str | None = None) -> Path:
    """A directory holding config.json, or ModelLoadError saying what to do instead."""
    if "minigpt" in source.lower():
        raise ModelLoadError(
            "MiniGPT-v2 is not part of transformers (it ships as its own repository with custom code); use "
            "Qwen/Qwen2.5-VL-3B-Instruct, which grounds objects and answers questions in one model"
        )
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: pass a folder written by save_pretrained or a hub id")
        return path
    if not HUB_ID.match(source):
        raise ModelLoadError(f"no such model folder {source!r} (and it is not a hub id like 'google/owlv2-base-patch16')")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    hint = (f"download it on a connected machine (`hf download {source}`) and copy the HF cache, "
            "or pass the folder it was saved to")
    if hub_offline():
        raise ModelLoadError(f"{source} is not in the Hugging Face cache and HF_HUB_OFFLINE=1: {hint}")
    if not hub_reachable():
        raise ModelLoadError(f"{source} is not in the Hugging Face cache and the hub cannot be reached: {hint}")
    try:
        return Path(snapshot_download(source, revision=revision))
    except Exception as exc:  # gated repo, wrong id, disk full: the hub's own message is the useful part
        raise ModelLoadError(f"could not download {source}: {exc}") from exc


def pick_device(requested: str | None = None) -> tuple[str, "object"]:
    """CUDA with bf16 where present, CPU with fp32 otherwise.

    fp32 is the safe CPU default (exact, and fast on any CPU). On CPUs with AVX512-BF16 or AMX, bf16 measured
    2.2-2.6x faster for the 2-4 B models (benchmarks/results/vlm_latency.md); making it selectable is open.
    """
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} requested but CUDA is not available")
    cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if cuda_bf16 else (torch.float16 if device.startswith("cuda") else torch.float32)
    return device, dtype
