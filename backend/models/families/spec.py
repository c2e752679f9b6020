"""What a VLM family declares: the config.json model types it covers, how it is loaded, how it is asked,
how it writes boxes, where LoRA adapts it, and how a tiny random-weight checkpoint of it is built.

Only data and small functions: no torch or transformers import here, so the registry is cheap to read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from backend.models.vlm.grounding import BoxFormat


class LoaderKind(StrEnum):
    """Which transformers Auto* class loads it and which Tandem adapter runs it (`vlm/loader.py`)."""

    DETECTOR = "zero-shot detector"  # AutoModelForZeroShotObjectDetection -> ZeroShotDetector
    CLASSIFIER = "zero-shot classifier"  # AutoModelForZeroShotImageClassification -> ZeroShotClassifier
    GENERATIVE = "generative VLM"  # AutoModelForImageTextToText -> GenerativeVlm


class Asks(Protocol):
    """What a question builder reads from the adapter: its configured questions and options."""

    classify_question: str
    detect_question: str
    florence_task: str


# (adapter, the labels' prompts) -> the question text
Question = Callable[[Asks, Sequence[str]], str]


def chat_classify(vlm: Asks, prompts: Sequence[str]) -> str:
    return vlm.classify_question.format(options=", ".join(prompts))


def chat_detect(vlm: Asks, prompts: Sequence[str]) -> str:
    return vlm.detect_question.format(options=", ".join(prompts))


@dataclass(frozen=True)
class PromptStyle:
    """How a generative family is prompted: chat template or task prefix, and its answer framing."""

    chat: bool  # prompt rendered by the processor's chat template
    answer_prefix: str  # between the generation prompt and the answer, as the chat template renders it
    end_of_turn: str | None  # None: the tokenizer's eos
    # chat families: the one-turn prompt ({q} = the question) for a processor saved without a chat template,
    # identical to what the real checkpoint's template renders for one user turn with one image
    manual_prompt: str | None = None
    prompt_prefix: str = ""  # task-prefix families: text before the question (PaliGemma's "<image>")
    nested_images: bool = True  # processor wants one list of images per sample
    answer_as_suffix: bool = False  # the processor masks the prompt itself when given the answer as `suffix`
    classify: Question = chat_classify
    detect: Question = chat_detect


Builder = Callable[[Path], Path]  # folder -> the folder, holding a saved checkpoint


@dataclass(frozen=True)
class Family:
    """One VLM family. `tiny` names each tiny checkpoint recipe (tests/tiny_vlms.py `build(name, root)`)."""

    name: str
    model_types: tuple[str, ...]  # config.json model_type values it covers
    kind: LoaderKind
    tiny: Mapping[str, Builder]
    # generative families
    prompt: PromptStyle | None = None
    grounding: BoxFormat | None = None  # the box format it was trained to write; None: classification only
    lora_targets: str | None = None  # peft target_modules regex (re.fullmatch), rooted in the language model
    # zero-shot detectors
    threshold: float = 0.1  # default score threshold
    phrase_labels: bool = False  # boxes come with decoded phrases (Grounding DINO), mapped back onto the labels
    # its processor pads a batch's images to the largest and the backbone sees the padding (Grounding DINO's
    # Swin): only images of one size share a forward pass, so a batch answers as each image alone would
    same_size_batches: bool = False
    # zero-shot classifiers
    sigmoid: bool = False  # trained with independent sigmoids, on text padded to `text_length` tokens (SigLIP)
    text_length: int | None = None
    # a reason to refuse a checkpoint of this family (config.json as read, the source) or None
    refuse: Callable[[Mapping[str, Any], str], str | None] | None = None

    def __post_init__(self) -> None:
        if not self.model_types or not self.tiny:
            raise ValueError(f"family {self.name}: needs at least one model type and one tiny builder")
        if self.kind is LoaderKind.GENERATIVE and (self.prompt is None or not self.lora_targets):
            raise ValueError(f"family {self.name}: a generative family needs a prompt style and LoRA targets")
        if self.kind is not LoaderKind.GENERATIVE and (self.prompt or self.grounding or self.lora_targets):
            raise ValueError(f"family {self.name}: prompts, grounding and LoRA targets are for generative families")


LLM_LINEAR = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


def llm_targets(root: str = "language_model", modules: str = LLM_LINEAR) -> str:
    """A LoRA target regex for the linear layers under the language model only. peft matches a string with
    re.fullmatch against module names, and a plain list such as ["q_proj", "v_proj"] would also adapt the
    vision tower (CLIP and SigLIP use the same names; Qwen2.5-VL's vision MLP is gate/up/down_proj)."""
    return rf".*{root}.*\.({modules})"
