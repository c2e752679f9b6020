"""`--vlm ID_OR_PATH` -> an open-vocabulary adapter, through the same transformers Auto* classes the real
checkpoints use. The family is read from config.json's model_type, so a local folder and a hub id load
the same way."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from backend.errors import ModelLoadError
from backend.models.families import SUPPORTED, Family, LoaderKind, family_for
from backend.models.vlm import ADAPTER_BASE_FILE
from backend.models.vlm.base import OpenVocabularyModel, checkpoint_version
from backend.models.vlm.generative import GenerativeVlm
from backend.models.vlm.source import pick_device, resolve_source
from backend.models.vlm.zero_shot import ZeroShotClassifier, ZeroShotDetector

log = logging.getLogger("tandem.vlm")

# loader kind -> (the transformers Auto* class that loads it, the adapter that runs it)
LOADERS: dict[LoaderKind, tuple[str, type[OpenVocabularyModel]]] = {
    LoaderKind.DETECTOR: ("AutoModelForZeroShotObjectDetection", ZeroShotDetector),
    LoaderKind.CLASSIFIER: ("AutoModelForZeroShotImageClassification", ZeroShotClassifier),
    LoaderKind.GENERATIVE: ("AutoModelForImageTextToText", GenerativeVlm),
}


def _load_sam3(source: str, **kwargs: Any) -> OpenVocabularyModel:
    from backend.models.sam3 import load_sam3

    return load_sam3(source, **kwargs)  # type: ignore[return-value]  # a promptable Model like the others


# config.json model_type -> a loader of its own (an architecture no Auto* class above runs)
OWN_LOADERS: dict[str, Any] = {"sam3": _load_sam3}


def _family_of(source: str, config: dict[str, Any]) -> Family:
    model_type = config.get("model_type", "")
    family = family_for(model_type)
    if family is None:
        raise ModelLoadError(f"{source}: model type {model_type!r} is not supported (supported: {', '.join(SUPPORTED)})")
    reason = family.refuse(config, source) if family.refuse else None
    if reason:
        raise ModelLoadError(reason)
    return family


def display_name(source: str, path: Path) -> str:
    if Path(source).expanduser().exists():
        return path.name
    return source.split("/")[-1]


def _load_lora(source: str, path: Path, device: str | None, options: dict[str, Any]) -> OpenVocabularyModel:
    """A LoRA version Tandem trained: its base (itself possibly an adapter) with this adapter merged in."""
    from peft import PeftModel

    base_source = json.loads((path / ADAPTER_BASE_FILE).read_text())["base"]
    vlm = load_vlm(base_source, device=device, **options)
    try:
        vlm.model = PeftModel.from_pretrained(vlm.model, path).merge_and_unload().eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"could not apply the LoRA adapter {path} to {base_source}: {exc}") from exc
    vlm.name = path.name
    vlm.version = checkpoint_version(path, path.name, config="adapter_config.json")
    vlm.source = str(path)
    return vlm


def _from_pretrained(auto, path: Path, dtype):
    """With PyTorch's scaled-dot-product attention (fused kernels on CUDA) where the architecture supports it;
    the others (Grounding DINO's deformable attention) load with their own."""
    try:
        return auto.from_pretrained(path, dtype=dtype, local_files_only=True, attn_implementation="sdpa")
    except ValueError as exc:
        if "sdpa" not in str(exc).lower() and "scaled_dot_product" not in str(exc).lower():
            raise
        # transformers' reason is a paragraph (an issue link, an example for another model): its class is enough
        log.info("%s: %s has no SDPA attention; loading it with its own", path, str(exc).split(" ", 1)[0])
        return auto.from_pretrained(path, dtype=dtype, local_files_only=True)


def load_vlm(source: str, device: str | None = None, revision: str | None = None, **options: Any) -> OpenVocabularyModel:
    """Options go to the adapter (threshold, iou, template, classify_question, max_new_tokens, ...)."""
    folder = Path(source).expanduser()
    if (folder / "adapter_config.json").is_file() and (folder / ADAPTER_BASE_FILE).is_file():
        return _load_lora(source, folder, device, options)
    path = resolve_source(source, revision)
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") in OWN_LOADERS:  # a family with its own loader (SAM 3's masks)
        return OWN_LOADERS[config["model_type"]](source, device=device, revision=revision, **options)
    family = _family_of(source, config)
    model_type = config["model_type"]
    device, dtype = pick_device(device)

    import transformers

    auto_name, adapter = LOADERS[family.kind]
    auto = getattr(transformers, auto_name)
    try:
        model = _from_pretrained(auto, path, dtype).to(device)
        processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:  # missing weights, wrong files, a missing optional package
        raise ModelLoadError(f"could not load {source}: {exc}") from exc
    name = display_name(source, path)
    model_adapter = adapter(model, processor, name, checkpoint_version(path, name), device, **options)
    model_adapter.source = str(path)
    log.info("loaded %s (%s, %s) on %s in %s", model_adapter.version, model_type, family.kind, device, dtype)
    return model_adapter
