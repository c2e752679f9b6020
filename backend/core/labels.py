"""One `LabelSpace`: how a model's class names land on a control's labels, written once.

The rules, strongest first: an explicit mapping from the user (`label_map`), then a label's
`predicted_values`, then its value or alias compared case-insensitively (exactly, when asked). Classes
that map to nothing are dropped: a COCO model on a two-label project predicts only those two labels.

Everything that needs the mapping asks a `LabelSpace`: the result writers (`label`), scoring and the
stored predictions (`to_labels`, `pooling_matrix`), the promotion gate (`class_ids`), and the VLM
vocabulary (`vocabulary`). `backend.labeling.label_map.LabelMap` is this class under its old name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from backend.core.prediction import CLASS_NAME, CLASS_SCORES, Prediction
from backend.core.text import shortlist
from backend.errors import ConfigError
from backend.labeling.config import ControlSpec


OUTSIDE_LABELS = "outside_labels"  # `Prediction.extra` key: the class a classifier saw that is none of the labels


def pool_choice(probabilities: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, bool]:
    """A classifier's class probabilities pooled onto a control's labels (`pool`: a `pooling_matrix`), and
    whether the model's answer lies outside them.

    Classes that map to no label are dropped and the rest renormalised (an ImageNet model's "tabby" on a
    cat/dog project reads as a sure cat) — unless one such class outweighs every label: then the model says
    "none of these" (a circle on a square/star project). The labels then get no pre-annotation, and the
    unmapped mass is spread evenly over them, so scoring reads the choice as unsure instead of a sure
    "square" at 0.16 renormalised to 1.00.

    Returns:
        (probabilities over the labels summing to 1 (all zero when there is nothing to pool), out of
        vocabulary)
    """
    p = np.clip(np.asarray(probabilities, dtype=float), 0, None)
    pooled = p @ pool
    total = float(pooled.sum())
    unmapped = p[~pool.any(axis=1)] if pool.size else p
    outside = bool(len(unmapped)) and float(unmapped.max()) > float(pooled.max(initial=0.0))
    if outside and pooled.size:
        rest = max(float(p.sum()) - total, 0.0)
        spread = pooled + rest / pooled.size
        return spread / max(float(spread.sum()), 1e-12), True
    return (pooled / total if total > 0 else pooled), outside


@dataclass(frozen=True)
class LabelSpace:
    """A model's classes seen through one control's labels.

    `by_class` maps a model class name to the label's result value (the alias where one is set), only for
    classes that map. `class_names` are the model's classes (the rows of `pooling_matrix`), `label_names`
    the control's result values in config order (its columns, and the ids `to_labels` gives).
    """

    control: str  # the control's name ("" for a space built from names alone)
    by_class: Mapping[str, str]  # model class name -> result value
    class_names: tuple[str, ...] = ()
    label_names: tuple[str, ...] = field(default=())
    ignored: tuple[str, ...] = ()  # label map entries that name no label of the control: why each was left out

    @classmethod
    def build(
        cls,
        control: ControlSpec,
        class_names: Sequence[str],
        explicit: Mapping[str, str] | None = None,
        case_sensitive: bool = False,
    ) -> LabelSpace:
        """Map `class_names` onto `control`'s labels by the rules above.

        Args:
            control: the control whose labels are the targets.
            class_names: the model's class names.
            explicit: model class name -> label value or result value (the user's label map); wins over all.
            case_sensitive: compare names exactly instead of stripped and lower-cased.

        Returns:
            The label space; its `label_names` are the control's result values in config order.

        An explicit entry whose target is not a label of the control (a label renamed since the map was
        written) is left out and said in `ignored`; the other classes still map.

        Raises:
            ConfigError: no class reaches any label (every prediction would be empty); the message names the
                label map's entries that did not apply, and its keys that are not classes of the model.
        """

        def norm(s: str) -> str:
            return s if case_sensitive else s.strip().lower()

        by_result = {label.result_value: label for label in control.labels}
        lookup: dict[str, str] = {}
        for label in control.labels:  # weakest first, so stronger rules overwrite
            for name in (label.alias, label.value):
                if name:
                    lookup.setdefault(norm(name), label.result_value)
        for label in control.labels:
            for name in label.predicted_values:
                lookup[norm(name)] = label.result_value

        by_value = {norm(label.value): label.result_value for label in control.labels}
        ignored: list[str] = []
        for model_name, target in dict(explicit or {}).items():
            resolved = target if target in by_result else by_value.get(norm(target))
            if resolved is None:
                ignored.append(f"label mapping {model_name!r} -> {target!r}: control '{control.name}' has no label "
                               f"{target!r} (labels: {shortlist(map(repr, by_result))})")
                continue
            lookup[norm(model_name)] = resolved

        mapping = {name: lookup[norm(name)] for name in class_names if norm(name) in lookup}
        if not mapping:
            classes = {norm(c) for c in class_names}
            strangers = [k for k in dict(explicit or {}) if norm(k) not in classes]
            why = [*([shortlist(ignored, 3, "; ")] if ignored else []), *([f"the label map's key(s) {shortlist(map(repr, strangers))} are not classes of the "
                                "model"] if strangers else [])]
            raise ConfigError(
                ("; ".join(why) + ". So " if why else "")
                + f"none of the model's classes ({shortlist(class_names)}) matches a label of control "
                f"'{control.name}' ({shortlist(by_result)}); add predicted_values=\"...\" to the labels or set a "
                "label_map (TANDEM_LABEL_MAP or the backend's extra_params), or let an open-vocabulary model, "
                "which names any label, pre-annotate the project (tandem models bind --project ID --second-opinion "
                "VLM --pre-annotator vlm)"
            )
        return cls(control=control.name, by_class=mapping, class_names=tuple(class_names),
                   label_names=tuple(by_result), ignored=tuple(ignored))

    @classmethod
    def of_control(cls, control: ControlSpec) -> LabelSpace:
        """The control's own labels mapped onto themselves: for predictions already in its labels
        (what `to_labels` and `backend.convert.labelstudio.from_results` return)."""
        names = tuple(label.result_value for label in control.labels)
        return cls(control=control.name, by_class={n: n for n in names}, class_names=names, label_names=names)

    @classmethod
    def by_name(cls, class_names: Sequence[str], label_names: Sequence[str]) -> LabelSpace:
        """Names alone, case-insensitively, for label lists that come without a control (a dataset made
        outside the Label Studio export). Never raises; classes without a same-named label are dropped."""
        wanted: dict[str, str] = {}
        for name in label_names:
            wanted[name.lower()] = name  # a later duplicate wins, as the gate's name lookup always did
        mapping = {c: wanted[c.lower()] for c in class_names if c.lower() in wanted}
        return cls(control="", by_class=mapping, class_names=tuple(class_names), label_names=tuple(label_names))

    def over(self, class_names: Sequence[str], label_names: Sequence[str]) -> LabelSpace:
        """The same mapping with other row (class) and column (label) lists."""
        return LabelSpace(self.control, self.by_class, tuple(class_names), tuple(label_names))

    def label(self, class_name: str) -> str | None:
        """The label (result value) a model class is written as, or None when it maps to none."""
        return self.by_class.get(class_name)

    __call__ = label

    def class_ids(self) -> dict[str, int]:
        """Model class name -> index of its label in `label_names`, for classes whose label is there."""
        column = {name: j for j, name in enumerate(self.label_names)}
        return {c: column[v] for c, v in self.by_class.items() if v in column}

    def pooling_matrix(self) -> np.ndarray:
        """(C, L) 0/1 over `class_names` x `label_names`: column l sums the classes that map onto label l;
        unmapped classes are all-zero rows. `probabilities @ matrix` pools a class vector onto the labels."""
        column = {name: j for j, name in enumerate(self.label_names)}
        m = np.zeros((len(self.class_names), len(self.label_names)))
        pairs = [(i, column[t]) for i, t in enumerate(map(self.label, self.class_names)) if t in column]
        if pairs:
            rows, cols = zip(*pairs, strict=True)
            m[list(rows), list(cols)] = 1.0
        return m

    def to_labels(self, predictions: Sequence[Prediction]) -> list[Prediction]:
        """Predictions in the model's classes -> the same predictions in the control's labels.

        Args:
            predictions: the model's outputs; detections name their class in `data[CLASS_NAME]` (else
                `class_id` indexes `class_names`), a classifier's `probabilities` are aligned with `class_names`.

        Returns:
            One prediction per input, `class_names` set to `label_names`: boxes of unmapped classes dropped,
            `class_id` the label's column, `data[CLASS_NAME]` the label, `data[CLASS_SCORES]` pooled to (N, L);
            probabilities pooled onto the labels (`pool_choice`: renormalised, or read as unsure when a class
            mapped to no label outweighs them all).
        """
        pool = self.pooling_matrix()
        ids = self.class_ids()
        labels = self.label_names
        out = []
        for p in predictions:
            if p.probabilities is not None:
                pooled, outside = pool_choice(p.probabilities, pool)
                extra = dict(p.extra)
                if outside:  # the class it saw, for reasons: "sees circle, which is none of the choices"
                    names = self.class_names or p.class_names
                    top = int(np.argmax(p.probabilities))
                    extra[OUTSIDE_LABELS] = str(names[top]) if top < len(names) else str(top)
                out.append(p.with_meta(probabilities=pooled, class_names=labels, extra=extra))
                continue
            det = p.detections
            if det is None or len(det) == 0:
                out.append(p.with_meta(class_names=labels))
                continue
            names = det.data.get(CLASS_NAME)
            if names is None:
                names = [self.class_names[int(i)] for i in det.class_id]
            column = [ids.get(str(n)) for n in names]
            kept = det[np.array([j is not None for j in column], dtype=bool)]
            kept.class_id = np.array([j for j in column if j is not None], dtype=int)
            kept.data[CLASS_NAME] = np.array([labels[j] for j in kept.class_id], dtype=object)
            if CLASS_SCORES in kept.data and len(kept):
                kept.data[CLASS_SCORES] = np.asarray(kept.data[CLASS_SCORES], dtype=float) @ pool
            out.append(p.with_meta(detections=kept, class_names=labels))
        return out

    @staticmethod
    def vocabulary(
        labels: ControlSpec | Sequence[str], prompts: Mapping[str, str] | None = None
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """What an open-vocabulary model is asked about: (names, prompts), aligned.

        Args:
            labels: a control (its label *values*, in config order: what prompts are keyed by and what the
                bound model reports as classes) or the label values themselves.
            prompts: label -> the text to ask instead, matched case-insensitively; a label without one is
                asked as itself.

        Returns:
            (names, prompts): `names[i]` is reported as the class, `prompts[i]` is the text asked.
        """
        names = tuple(label.value for label in labels.labels) if isinstance(labels, ControlSpec) else tuple(labels)
        by_lower = {k.lower(): v for k, v in (prompts or {}).items()}
        return names, tuple(by_lower.get(name.lower(), name) for name in names)


__all__ = ["LabelSpace"]
