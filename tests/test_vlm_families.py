"""The VLM family registry is complete: every model type Tandem loads has one family, every family declares
what its loader kind needs (prompts, box format and LoRA targets for generative families), a tiny checkpoint
recipe that the per-family adapter tests run, and adding a family is one module plus one registry line."""

from __future__ import annotations

import json
import pkgutil
import re
from importlib import import_module

import pytest
from transformers.models.auto import configuration_auto, modeling_auto

import backend.models.families as families
from backend.models.families import FAMILIES, SUPPORTED, TINY_BUILDERS, LoaderKind, family_for
from backend.models.families.spec import PromptStyle
from backend.models.vlm import loader
from backend.models.vlm.grounding import BoxFormat
from tests.test_vlm_adapters import FAMILIES as ADAPTER_TESTS

# every model type Tandem loaded before the registry existed (loader.SUPPORTED, from four tables)
BEFORE = {"owlv2", "owlvit", "grounding-dino", "mm-grounding-dino", "clip", "siglip", "siglip2", "metaclip_2",
          "chinese_clip", "altclip", "align", "llava", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
          "paligemma", "florence2"}
AUTO_CLASS_TYPES = {  # the model types each loader kind's transformers Auto* class loads
    LoaderKind.DETECTOR: modeling_auto.MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES,
    LoaderKind.CLASSIFIER: modeling_auto.MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    LoaderKind.GENERATIVE: modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
}
GENERATIVE = [f for f in FAMILIES if f.kind is LoaderKind.GENERATIVE]


def test_every_supported_model_type_has_exactly_one_family():
    assert BEFORE <= set(SUPPORTED)
    assert loader.SUPPORTED == SUPPORTED  # the loader accepts exactly the registry
    claimed = [t for f in FAMILIES for t in f.model_types]
    assert len(claimed) == len(set(claimed)) == len(SUPPORTED)
    for model_type in SUPPORTED:
        assert model_type in family_for(model_type).model_types


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_declares_what_its_loader_needs(family):
    assert isinstance(family.kind, LoaderKind) and family.kind in loader.LOADERS
    for model_type in family.model_types:  # real transformers model types, loadable by the kind's Auto* class
        assert model_type in configuration_auto.CONFIG_MAPPING_NAMES
        assert model_type in AUTO_CLASS_TYPES[family.kind], (family.name, model_type)
    assert family.tiny and all(callable(b) for b in family.tiny.values())
    if family.kind is LoaderKind.GENERATIVE:
        assert isinstance(family.prompt, PromptStyle)
        assert family.lora_targets and re.compile(family.lora_targets)
        assert family.grounding is None or isinstance(family.grounding, BoxFormat)
        if family.prompt.chat:  # processors saved without a chat template still get the family's prompt
            assert family.prompt.manual_prompt and "{q}" in family.prompt.manual_prompt
    else:
        assert family.prompt is None and family.grounding is None and family.lora_targets is None


def test_every_family_module_is_registered():
    """One new module plus one line in FAMILIES: a module that declares a FAMILY but is not listed fails here."""
    helpers = {"spec", "synthetic"}
    modules = [m.name for m in pkgutil.iter_modules(families.__path__) if m.name not in helpers]
    declared = [import_module(f"backend.models.families.{m}").FAMILY for m in modules]
    assert sorted(f.name for f in declared) == sorted(f.name for f in FAMILIES)
    assert sorted(modules) == sorted(f.name for f in FAMILIES)  # a family's module is named after it


def test_every_tiny_checkpoint_is_run_by_the_adapter_tests():
    assert set(TINY_BUILDERS) == set(ADAPTER_TESTS)


@pytest.mark.parametrize("name", sorted(TINY_BUILDERS))
def test_each_tiny_checkpoint_is_of_its_own_family(tiny_vlm, name):
    model_type = json.loads((tiny_vlm(name) / "config.json").read_text())["model_type"]
    family = family_for(model_type)
    assert family is not None and name in family.tiny


@pytest.mark.parametrize("family", GENERATIVE, ids=lambda f: f.name)
def test_lora_targets_are_the_language_models_linear_layers_only(tiny_vlm, family):
    """peft matches a string target with re.fullmatch on module names: the regex must hit the language
    model's projections and nothing in the vision tower (whose layers share their names)."""
    import torch
    from transformers import AutoModelForImageTextToText

    for name in family.tiny:
        model = AutoModelForImageTextToText.from_pretrained(tiny_vlm(name))
        hits = [(n, m) for n, m in model.named_modules() if re.fullmatch(family.lora_targets, n)]
        assert len(hits) >= 4, (name, [n for n, _ in hits])
        assert all(isinstance(m, torch.nn.Linear) for _, m in hits)
        assert not any("vision" in n or "visual" in n for n, _ in hits)
        vision_linear = [n for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and ("vision" in n or "visual" in n)]
        assert vision_linear  # there was something to leave out
