"""Generative VLMs (LLaVA-1.5, Qwen2.5-VL, Qwen3-VL, Florence-2, PaliGemma, SmolVLM/Idefics3).

Classification is not "generate a word and hope it is a label": every candidate label's log-likelihood
`log p(label + end-of-turn | image, question)` is scored with teacher forcing, and the softmax over
candidates is the distribution. A batch of images shares passes: their prefixes (image and question) run
once, in one pass (a KV cache for decoder-only chat models, encoder states for Florence-2), and all B x K
candidates are scored from them in a second; other families take B x K teacher-forced sequences. The end-of-turn token
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
from backend.models.vlm.batching import CPU_IMAGES, CPU_SEQUENCES, accepts, fit, text_cost
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
                 max_new_tokens: int = 256, max_sequences: int | None = None, max_images: int | None = None,
                 min_confidence: float = 0.0) -> None:
        super().__init__(model, processor, name, version, device)
        if self.spec.prompt is None:
            raise ValueError(f"no prompt style for model type {self.model_type!r}")
        self.style = self.spec.prompt
        self.box_format: BoxFormat | None = self.spec.grounding
        self.tasks = frozenset({ModelTask.CLASSIFY} | ({ModelTask.DETECT} if self.box_format else set()))
        self.classify_question, self.detect_question = classify_question, detect_question
        self.florence_task, self.max_new_tokens = florence_task, max_new_tokens
        # per forward pass; None: sized from free GPU memory (a fixed default on a CPU), see batching.py
        self.max_sequences, self.max_images, self.min_confidence = max_sequences, max_images, min_confidence
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
        self.tokenizer.padding_side = "right"  # answers follow their prompts; padding after them changes nothing
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
        """log p(answer | image, question) for each candidate, summed over its tokens (one image)."""
        return self.batch_logprobs([image], prompts, question, reuse_prompt)[0]

    def batch_logprobs(self, images: list[Image.Image], prompts: tuple[str, ...], question: str,
                       reuse_prompt: bool = True) -> np.ndarray:
        """(images, candidates) log-likelihoods, as few forward passes as memory allows.

        Decoder-only chat models run each image's prefix (image and question) once, a batch of images in one
        left-padded pass, and score all K candidates from that KV cache; the others, or a prompt/answer token
        boundary that does not line up, take B x K teacher-forced sequences in memory-sized passes.
        """
        out = np.empty((len(images), len(prompts)), dtype=np.float64)
        if not images:
            return out
        todo = list(range(len(images)))
        if reuse_prompt and self.style.chat:
            tails = self._answer_tails(prompts, question)
            if tails is not None:
                for part in chunks(todo, self._images_per_pass(images[0], len(prompts), tails[0].shape[1])):
                    cached = self._cached_logprobs([images[i] for i in part], tails, question)
                    if cached is None:
                        break
                    out[part] = cached
                    todo = todo[len(part):]
        if reuse_prompt and self.encoder_decoder:
            for part in chunks(todo, self._images_per_pass(images[0], len(prompts), 8)):
                out[part] = self._shared_encoder_logprobs([images[i] for i in part], prompts, question)
            todo = []
        if todo:
            out[todo] = self._plain_logprobs([images[i] for i in todo], prompts, question)
        return out

    def _shared_encoder_logprobs(self, images: list[Image.Image], answers: tuple[str, ...], question: str
                                 ) -> np.ndarray:
        """Encoder-decoders (Florence-2): each image and question encoded once, a batch of images in one pass;
        the decoder scores the K answers of every image against its repeated encoder states."""
        from transformers.modeling_outputs import BaseModelOutput

        k, b = len(answers), len(images)
        self.tokenizer.padding_side = "right"  # learned encoder positions start at 0
        batch = self._to_device(self._encode([self.prompt(question)] * b, images))
        batch.pop("labels", None)
        config = self.model.config
        start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            start = config.get_text_config(decoder=True).decoder_start_token_id
        first = torch.full((b, 1), int(start), dtype=torch.long, device=batch["input_ids"].device)
        encoded = self.model(**batch, decoder_input_ids=first).encoder_last_hidden_state
        target = self.tokenizer(list(answers), padding="longest", return_tensors="pt")  # as teacher_forced
        labels = target.input_ids.masked_fill(target.attention_mask == 0, -100).to(encoded.device).repeat(b, 1)
        logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded.repeat_interleave(k, 0)),
                            attention_mask=batch["attention_mask"].repeat_interleave(k, 0), labels=labels).logits
        return _answer_logprob(logits, labels, labels != -100).reshape(b, k)

    def _plain_logprobs(self, images: list[Image.Image], answers: tuple[str, ...], question: str) -> np.ndarray:
        """B x K teacher-forced sequences, each carrying its image, `max_sequences` (or memory) at a time."""
        pairs = [(im, question, a) for im in images for a in answers]
        parts = []
        for part in chunks(pairs, self._sequences_per_pass()):
            batch = self._to_device(self.teacher_forced(part))
            labels = batch.pop("labels")
            if self.encoder_decoder:
                logits = self.model(**batch, labels=labels).logits
                target = labels
            else:
                logits = self.model(**batch).logits[:, :-1]
                target = labels[:, 1:]
            scored = target != -100
            start = int(scored.any(0).nonzero()[0, 0]) if scored.any() else 0  # the prompts' logits are not needed
            parts.append(_answer_logprob(logits[:, start:], target[:, start:], scored[:, start:]))
        return np.concatenate(parts).reshape(len(images), len(answers))

    def _logprobs_from_cache(self, image: Image.Image, answers: tuple[str, ...], question: str) -> np.ndarray | None:
        """One image's candidates from its prefix's KV cache, or None where that path does not apply."""
        tails = self._answer_tails(answers, question)
        cached = None if tails is None else self._cached_logprobs([image], tails, question)
        return None if cached is None else cached[0]

    def _answer_tails(self, answers: tuple[str, ...], question: str):
        """(K, T) right-padded token ids of each answer and its end of turn as they follow the prompt, and
        their mask; None when the tokenizer merges a token across the prompt/answer boundary.

        Tokenised on the text alone: the processor expands the image placeholder in the middle of the prompt,
        far from its end, so the boundary tokenises the same with or without the image's tokens."""
        prompt = self.prompt(question)
        head = self.tokenizer(prompt)["input_ids"]
        rows = []
        for answer in answers:
            ids = self.tokenizer(prompt + self.style.answer_prefix + answer + self._end_of_turn())["input_ids"]
            if len(ids) <= len(head) or ids[: len(head)] != head:
                return None
            rows.append(ids[len(head):])
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        return ids, mask, torch.tensor(head[-4:], device=self.device)  # the prompt's last tokens, to check

    def _cached_logprobs(self, images: list[Image.Image], tails, question: str) -> np.ndarray | None:
        """Prefill the B prefixes once (left-padded), repeat the cache K times, score B x K answer tails."""
        tail_ids, tail_mask, prompt_end = tails
        k, width = tail_ids.shape
        b = len(images)
        self.tokenizer.padding_side = "left"  # every prefix ends at the same column: the tails follow it
        head = self._to_device(self._encode([self.prompt(question)] * b, images))
        head.pop("labels", None)
        ids, mask = head["input_ids"], head["attention_mask"]
        if not torch.equal(ids[:, -len(prompt_end):], prompt_end.expand(b, -1)):
            return None  # the processor ended the prompt otherwise than the text alone tokenises
        n = ids.shape[1]
        lengths = mask.sum(-1)  # each prefix's real length
        inner = getattr(self.model, "model", None)
        mrope = hasattr(inner, "get_rope_index")  # Qwen: 3-axis positions computed from the mask, shifted by deltas
        extra = {}
        if mrope:
            inner.rope_deltas = None  # a fresh prefill computes this batch's
        else:  # left padding: real tokens count their positions from 0, as alone
            extra["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if accepts(self.model.forward, "logits_to_keep"):
            extra["logits_to_keep"] = 1  # only the last position's logits: (B, n, vocab) would be gigabytes
        out = self.model(**head, use_cache=True, **extra)
        cache = out.past_key_values
        if not hasattr(cache, "batch_repeat_interleave"):
            return None
        cache.batch_repeat_interleave(k)
        positions = lengths.repeat_interleave(k)[:, None] + torch.arange(width, device=ids.device)
        if mrope:
            deltas = inner.rope_deltas.reshape(-1).to(ids.device).repeat_interleave(k)[:, None]
            positions = (positions + deltas).unsqueeze(0).expand(3, -1, -1)
        rest = self.model(input_ids=tail_ids.repeat(b, 1),
                          attention_mask=torch.cat([mask.repeat_interleave(k, 0), tail_mask.repeat(b, 1)], dim=1),
                          past_key_values=cache, cache_position=torch.arange(n, n + width, device=ids.device),
                          position_ids=positions)
        first = out.logits[:, -1:].repeat_interleave(k, 0)  # predicts each answer's first token
        logits = torch.cat([first, rest.logits[:, :-1]], dim=1)
        return _answer_logprob(logits, tail_ids.repeat(b, 1), tail_mask.repeat(b, 1).bool()).reshape(b, k)

    # ---------------------------------------------------------------- batch sizes
    def _images_per_pass(self, sample: Image.Image, candidates: int, tail: int) -> int:
        """Images whose prefixes (and K cached copies each) fit one pass: `max_images` if set, else memory."""
        if self.max_images:
            return self.max_images
        if not str(self.device).startswith("cuda"):
            return fit(self.device, 1, CPU_IMAGES)
        self.tokenizer.padding_side = "left"
        n = self._encode([self.prompt("?")], [sample])["input_ids"].shape[1]
        cost = text_cost(self.model)
        per_image = candidates * cost.sequence_bytes(n + tail, tail) + n * cost.activation_per_token
        return fit(self.device, per_image, CPU_IMAGES)

    def _sequences_per_pass(self, tokens: int = 1024) -> int:
        """Teacher-forced sequences per pass: `max_sequences` if set, else memory (on a CPU, a fixed default)."""
        if self.max_sequences:
            return self.max_sequences
        return fit(self.device, text_cost(self.model).sequence_bytes(tokens, tokens), CPU_SEQUENCES)

    def _generations_per_pass(self, sample: Image.Image) -> int:
        """Images per `generate` call: `max_images` if set, else memory (prompt + new tokens, scores kept)."""
        if self.max_images:
            return self.max_images
        if not str(self.device).startswith("cuda"):
            return fit(self.device, 1, CPU_IMAGES)
        n = self._encode([self.prompt("?")], [sample])["input_ids"].shape[1]
        return fit(self.device, text_cost(self.model).sequence_bytes(n + self.max_new_tokens, self.max_new_tokens),
                   CPU_IMAGES)

    def _classify(self, images, vocabulary: Vocabulary) -> list[ModelOutput]:
        question = self.question(ModelTask.CLASSIFY, vocabulary)
        lp = self.batch_logprobs(images, vocabulary.prompts, question)
        p = np.exp(lp - lp.max(axis=1, keepdims=True))
        return [ModelOutput(probabilities=row / row.sum()) for row in p]

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
        """One `generate` call per batch of images; each image's text is parsed against its own size."""
        prompt = self.prompt(self.question(ModelTask.DETECT, vocabulary))
        out = []
        for chunk in chunks(images, self._generations_per_pass(images[0])):
            # a decoder continues from the right edge (left padding); an encoder's learned positions
            # (Florence-2's BART) must start at 0 (right padding)
            self.tokenizer.padding_side = "right" if self.encoder_decoder else "left"
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


def _answer_logprob(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Sum over each row of log p(target token), where `mask`: logits (N, T, V) predict target (N, T).

    log p = logit - logsumexp(logits), in float32, without a (N, T, V) log-softmax copy."""
    logits = logits.float()
    picked = logits.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_lp = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return token_lp.sum(-1).cpu().numpy().astype(np.float64)
