"""Generative VLMs (LLaVA-1.5, Qwen2.5-VL, Qwen3-VL, Florence-2, PaliGemma, SmolVLM/Idefics3).

Classification is not "generate a word and hope it is a label": every candidate label's log-likelihood
`log p(label + end-of-turn | image, question)` is scored with teacher forcing, all candidates of a batch of
images in one forward pass, and the softmax over candidates is the distribution. The end-of-turn token
keeps "cat" from winning for "caterpillar"; multi-token labels are summed.

Grounding is generated in each family's own format, parsed into boxes (`grounding.py`), and each box
gets a pseudo-confidence: the geometric mean of the probabilities of the tokens that wrote it — never
a constant.

How each family is asked and how it writes boxes is declared in its module under `backend.models.families`
(`Family.prompt`, `Family.grounding`); nothing here branches on the model type.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from backend.models.base import ModelOutput, ModelTask
from backend.models.families import LoaderKind
from backend.models.vlm.base import OpenVocabularyModel, Vocabulary, chunks, make_detections
from backend.models.vlm.grounding import (
    BoxFormat,
    GroundedBox,
    format_boxes,
    match_phrase,
    parse_boxes,
    span_confidence,
    token_offsets,
)

CLASSIFY_QUESTION = "Which one of these is shown in the image: {options}? Answer with one of them."
DETECT_QUESTION = ("Locate every instance of these categories in the image: {options}. "
                   "Report the bbox coordinates in JSON format.")


class GenerativeVlm(OpenVocabularyModel):
    family = LoaderKind.GENERATIVE.value

    def __init__(self, model, processor, name, version, device, *, classify_question: str = CLASSIFY_QUESTION,
                 detect_question: str = DETECT_QUESTION, florence_task: str = "<CAPTION_TO_PHRASE_GROUNDING>",
                 max_new_tokens: int = 256, max_sequences: int = 16, min_confidence: float = 0.0) -> None:
        super().__init__(model, processor, name, version, device)
        if self.spec.prompt is None:
            raise ValueError(f"no prompt style for model type {self.model_type!r}")
        self.style = self.spec.prompt
        self.box_format: BoxFormat | None = self.spec.grounding
        self.tasks = frozenset({ModelTask.CLASSIFY} | ({ModelTask.DETECT} if self.box_format else set()))
        self.classify_question, self.detect_question = classify_question, detect_question
        self.florence_task, self.max_new_tokens = florence_task, max_new_tokens
        self.max_sequences, self.min_confidence = max_sequences, min_confidence
        self.tokenizer = processor.tokenizer
        self.encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))

    # ---------------------------------------------------------------- prompts
    def prompt(self, question: str) -> str:
        if not self.style.chat:
            return self.style.prompt_prefix + question
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if self.style.manual_prompt is None:
            raise ValueError(f"{self.name} has no chat template and {self.spec.name} no hand-rendered prompt")
        return self.style.manual_prompt.format(q=question)

    def _end_of_turn(self) -> str:
        return self.style.end_of_turn or self.tokenizer.eos_token or ""

    def _encode(self, texts: list[str], images: list[Image.Image], **kwargs):
        imgs = [[im] for im in images] if self.style.nested_images else images
        return self.processor(text=texts, images=imgs, return_tensors="pt", padding="longest", **kwargs)

    # ---------------------------------------------------------------- questions and teacher forcing
    def question(self, task: ModelTask, vocabulary: Vocabulary) -> str:
        """The family's own way of asking (PaliGemma task prefixes, Florence-2 task tokens, chat otherwise)."""
        ask = self.style.classify if task is ModelTask.CLASSIFY else self.style.detect
        return ask(self, vocabulary.prompts)

    def teacher_forced(self, examples: list[tuple[Image.Image, str, str]]):
        """(image, question, answer) -> a batch whose `labels` cover only the answer and its end of turn.

        Used to score candidate labels and to fine-tune (LoRA): both need exactly the answer's likelihood.
        """
        images = [im for im, _, _ in examples]
        prompts = [self.prompt(q) for _, q, _ in examples]
        answers = [a for _, _, a in examples]
        if self.style.answer_as_suffix:  # the processor masks the prefix itself when given `suffix` (PaliGemma)
            return self._encode(prompts, images, suffix=answers)
        if self.encoder_decoder:
            batch = self._encode(prompts, images)
            target = self.tokenizer(answers, padding="longest", return_tensors="pt")
            batch["labels"] = target.input_ids.masked_fill(target.attention_mask == 0, -100)
            return batch
        prompt_len: dict[tuple[int, str], int] = {}
        for im, p in zip(images, prompts, strict=True):
            if (id(im), p) not in prompt_len:
                prompt_len[(id(im), p)] = self._encode([p], [im])["input_ids"].shape[1]
        full = [p + self.style.answer_prefix + a + self._end_of_turn() for p, a in zip(prompts, answers, strict=True)]
        self.tokenizer.padding_side = "right"
        batch = self._encode(full, images)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for i, (im, p) in enumerate(zip(images, prompts, strict=True)):
            labels[i, : prompt_len[(id(im), p)]] = -100
        batch["labels"] = labels
        return batch

    # ---------------------------------------------------------------- classification
    def label_logprobs(self, image: Image.Image, prompts: tuple[str, ...], question: str,
                       reuse_prompt: bool = True) -> np.ndarray:
        """log p(answer | image, question) for each candidate, summed over its tokens.

        Decoder-only chat models run the image and question once and score every candidate from that one
        KV cache (one prefill instead of K); the others, or a prompt/answer token boundary that does not
        line up, take the plain batch of K teacher-forced sequences.
        """
        if reuse_prompt and self.style.chat:
            cached = self._logprobs_from_cache(image, prompts, question)
            if cached is not None:
                return cached
        parts = []
        for answers in chunks(list(prompts), self.max_sequences):
            batch = self._to_device(self.teacher_forced([(image, question, a) for a in answers]))
            labels = batch.pop("labels")
            if self.encoder_decoder:
                logits = self.model(**batch, labels=labels).logits
                target = labels
            else:
                logits = self.model(**batch).logits[:, :-1]
                target = labels[:, 1:]
            logp = torch.log_softmax(logits.float(), dim=-1)
            mask = target != -100
            token_lp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            parts.append(token_lp.sum(-1).cpu().numpy())
        return np.concatenate(parts).astype(np.float64)

    def _logprobs_from_cache(self, image: Image.Image, answers: tuple[str, ...], question: str) -> np.ndarray | None:
        prompt = self.prompt(question)
        self.tokenizer.padding_side = "right"
        head = self._to_device(self._encode([prompt], [image]))
        n = head["input_ids"].shape[1]
        full = self._encode([prompt + self.style.answer_prefix + a + self._end_of_turn() for a in answers],
                            [image] * len(answers))
        ids, mask = full["input_ids"].to(self.device), full["attention_mask"].to(self.device)
        if ids.shape[1] <= n or not torch.equal(ids[:, :n], head["input_ids"].expand(len(answers), -1)):
            return None  # the tokenizer merged across the boundary: score the plain way
        out = self.model(**head, use_cache=True)
        cache = out.past_key_values
        if not hasattr(cache, "batch_repeat_interleave"):
            return None
        cache.batch_repeat_interleave(len(answers))
        tail, tail_mask = ids[:, n:], mask[:, n:]
        positions = torch.arange(n, ids.shape[1], device=ids.device)
        extra = {}
        deltas = getattr(getattr(self.model, "model", None), "rope_deltas", None)
        if deltas is not None:  # Qwen's 3-axis rotary positions: text after the image is shifted by rope_deltas
            extra["position_ids"] = (positions + deltas.reshape(-1)[0]).expand(3, len(answers), -1)
        rest = self.model(input_ids=tail, attention_mask=torch.cat([head["attention_mask"].expand(len(answers), -1),
                                                                    tail_mask], dim=1),
                          past_key_values=cache, cache_position=positions, **extra)
        logits = torch.cat([out.logits[:, -1:].expand(len(answers), -1, -1), rest.logits[:, :-1]], dim=1)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tail.unsqueeze(-1)).squeeze(-1)
        return (logp * tail_mask).sum(-1).cpu().numpy().astype(np.float64)

    def _classify(self, images, vocabulary: Vocabulary) -> list[ModelOutput]:
        question = self.question(ModelTask.CLASSIFY, vocabulary)
        out = []
        for image in images:
            lp = self.label_logprobs(image, vocabulary.prompts, question)
            p = np.exp(lp - lp.max())
            out.append(ModelOutput(probabilities=p / p.sum()))
        return out

    # ---------------------------------------------------------------- grounding
    def _parse(self, text: str, image: Image.Image, coord_size: tuple[float, float] | None) -> list[GroundedBox]:
        w, h = image.size
        return parse_boxes(self.box_format, text, w, h, coord_size)

    def _qwen_coord_size(self, batch, i: int) -> tuple[float, float] | None:
        """Qwen2.5-VL writes pixels of the image *as resized by its processor* (multiples of 28)."""
        if self.box_format is not BoxFormat.QWEN_PIXELS:
            return None
        _, gh, gw = (int(v) for v in batch["image_grid_thw"][i])
        patch = self.processor.image_processor.patch_size
        return (gw * patch, gh * patch)

    def grounding_answer(self, image: Image.Image, boxes, labels) -> str:
        """The text this family should write for these pixel boxes: the fine-tuning target."""
        if self.box_format is None:
            raise ValueError(f"{self.model_type} is not trained to ground boxes")
        coord_size = None
        if self.box_format is BoxFormat.QWEN_PIXELS:
            coord_size = self._qwen_coord_size(self.processor.image_processor(images=[image], return_tensors="pt"), 0)
        return format_boxes(self.box_format, boxes, labels, image.width, image.height, coord_size)

    def _detect(self, images, vocabulary: Vocabulary) -> list[ModelOutput]:
        prompt = self.prompt(self.question(ModelTask.DETECT, vocabulary))
        self.tokenizer.padding_side = "left"  # batched generation continues from the right edge
        out = []
        for chunk in chunks(images, self.max_sequences):
            batch = self._encode([prompt] * len(chunk), chunk)
            inputs = self._to_device(batch)
            inputs.pop("labels", None)  # PaliGemma's processor always adds them
            gen = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                      output_scores=True, return_dict_in_generate=True)
            new = gen.sequences if self.encoder_decoder else gen.sequences[:, inputs["input_ids"].shape[1]:]
            logprobs = self.model.compute_transition_scores(gen.sequences, gen.scores, normalize_logits=True)
            logprobs = logprobs.float().cpu().numpy()
            if self.encoder_decoder:  # sequences start with the decoder start token, which has no score
                new = new[:, new.shape[1] - logprobs.shape[1]:]
            for i, image in enumerate(chunk):
                ids = new[i].tolist()
                prefixes = [self.tokenizer.decode(ids[: k + 1], skip_special_tokens=False) for k in range(len(ids))]
                text = prefixes[-1] if prefixes else ""
                offsets = token_offsets(prefixes)
                boxes = self._parse(text, image, self._qwen_coord_size(batch, i))
                out.append(ModelOutput(detections=self._to_detections(boxes, offsets, logprobs[i], vocabulary)))
        return out

    def _to_detections(self, boxes: list[GroundedBox], offsets, logprobs, vocabulary: Vocabulary):
        rows = []
        for box in boxes:
            idx = match_phrase(box.label, vocabulary.prompts)
            if idx is None and len(vocabulary.prompts) == 1 and not box.label:
                idx = 0  # a one-label prompt whose answer omits the label still names that label
            conf = span_confidence(offsets, np.nan_to_num(logprobs, neginf=-50.0), box.span)
            x0, y0, x1, y1 = box.xyxy
            if idx is not None and x1 > x0 and y1 > y0 and conf >= self.min_confidence:
                rows.append((box.xyxy, conf, idx))
        return make_detections([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], vocabulary.names)

    def _predict(self, images, task: ModelTask, vocabulary: Vocabulary) -> list[ModelOutput]:
        if task is ModelTask.CLASSIFY:
            return self._classify(images, vocabulary)
        return self._detect(images, vocabulary)
