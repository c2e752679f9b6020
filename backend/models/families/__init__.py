"""The VLM family registry: one module per family, one line per family below.

Everything Tandem knows about a family lives in its module (`spec.Family`): the config.json model types it
covers, the loader kind, the prompt style, the box format, the LoRA target modules and the tiny-checkpoint
recipe. To add a family: write `families/<name>.py` with a `FAMILY = Family(...)`, and add it to `FAMILIES`.
"""

from __future__ import annotations

from backend.models.families import (
    clip,
    florence2,
    grounding_dino,
    llava,
    owlv2,
    paligemma,
    qwen2_5_vl,
    qwen3_vl,
    siglip,
    smolvlm,
)
from backend.models.families.spec import Builder, Family, LoaderKind, PromptStyle

FAMILIES: tuple[Family, ...] = (
    owlv2.FAMILY,
    grounding_dino.FAMILY,
    clip.FAMILY,
    siglip.FAMILY,
    llava.FAMILY,
    qwen2_5_vl.FAMILY,
    qwen3_vl.FAMILY,
    smolvlm.FAMILY,
    paligemma.FAMILY,
    florence2.FAMILY,
)


def _index() -> tuple[dict[str, Family], dict[str, Builder]]:
    by_type: dict[str, Family] = {}
    tiny: dict[str, Builder] = {}
    for family in FAMILIES:
        for model_type in family.model_types:
            if model_type in by_type:
                raise ValueError(f"model type {model_type!r} is in {by_type[model_type].name} and {family.name}")
            by_type[model_type] = family
        for name, builder in family.tiny.items():
            if name in tiny:
                raise ValueError(f"two families build a tiny checkpoint named {name!r}")
            tiny[name] = builder
    return by_type, tiny


BY_MODEL_TYPE, TINY_BUILDERS = _index()
SUPPORTED: list[str] = sorted(BY_MODEL_TYPE)  # every config.json model_type Tandem loads as a VLM


def family_for(model_type: str) -> Family | None:
    return BY_MODEL_TYPE.get(model_type)


__all__ = ["BY_MODEL_TYPE", "FAMILIES", "SUPPORTED", "TINY_BUILDERS", "Family", "LoaderKind", "PromptStyle",
           "family_for"]
