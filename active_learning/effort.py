"""How many seconds a human spends per action: turns edit counts into minutes of labelling saved.

The defaults, with where they come from (change them per team: `EffortModel(draw_box=20, ...)` or
TANDEM_EFFORT as JSON with these field names):

- draw_box 35 s: one high-quality box drawn from scratch on ILSVRC (Su, Deng, Fei-Fei, AAAI-W 2012); 42 s
  via MTurk as cited by Papadopoulos et al. (CVPR 2016).
- verify_box 7 s: accepting a shown box. Verification-only annotation cut total time 6–9× against drawing
  (Papadopoulos et al., CVPR 2016); 7 s is also the extreme-clicking cost of a box (Papadopoulos et al.,
  ICCV 2017), an upper bound for a yes/no look.
- modify_box 15 s: moving a corner or changing a label — an assumption between verifying and drawing.
- delete_box 3 s: select and delete — an assumption.
- draw_polygon 80 s: COCO polygon masks took about 6.5× SAM-assisted masks' 14 s (Kirillov et al., 2023: 34 → 14
  s per mask with SAM; 14 s is 6.5× faster than COCO polygons).
- choose_class 5 s / verify_class 2 s: an image-level choice made or confirmed — assumptions.
- auto-accepted regions cost nothing but the spot-check: `spot_check` of them are looked at (verify cost).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class EffortModel:
    draw_box: float = 35.0
    verify_box: float = 7.0
    modify_box: float = 15.0
    delete_box: float = 3.0
    draw_polygon: float = 80.0
    choose_class: float = 5.0
    verify_class: float = 2.0
    spot_check: float = 0.05  # share of auto-accepted tasks a human still checks

    @classmethod
    def from_env(cls) -> EffortModel:
        """TANDEM_EFFORT='{"draw_box": 20}' overrides single figures; unknown names are a clear error."""
        raw = os.environ.get("TANDEM_EFFORT")
        if not raw:
            return cls()
        values = json.loads(raw)
        known = {f.name for f in fields(cls)}
        if unknown := set(values) - known:
            raise ValueError(f"TANDEM_EFFORT: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**{k: float(v) for k, v in values.items()})

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def describe(self, regions: bool = True, choices: bool = False, polygons: bool = False) -> str:
        """The prices a report used, for the kinds of work it counted: a Choices project's report names the
        choice prices, not the box prices."""
        parts = []
        if regions:
            shape = "polygon" if polygons else "box"
            parts.append(f"draw {self.draw(polygons):g} s, verify {self.verify_box:g} s, modify {self.modify_box:g} s, "
                         f"delete {self.delete_box:g} s per {shape}")
        if choices:
            parts.append(f"choose {self.choose_class:g} s, confirm {self.verify_class:g} s per choice")
        return "; ".join(parts) or "nothing counted"

    def draw(self, polygons: bool = False) -> float:
        return self.draw_polygon if polygons else self.draw_box

    def scratch_seconds(self, regions: int, choices: int = 0, polygons: bool = False) -> float:
        """Labelling every final region and choice from nothing."""
        return regions * self.draw(polygons) + choices * self.choose_class

    def assisted_seconds(self, unchanged: int, modified: int, deleted: int, missed: int, choices_right: int = 0,
                         choices_wrong: int = 0, auto_accepted: int = 0, polygons: bool = False) -> float:
        """Working from pre-annotations: verify what was right, fix, delete, draw what was missed; auto-accepted
        regions cost only the spot-check."""
        return (unchanged * self.verify_box + modified * self.modify_box + deleted * self.delete_box
                + missed * self.draw(polygons) + choices_right * self.verify_class + choices_wrong * self.choose_class
                + auto_accepted * self.spot_check * self.verify_box)


__all__ = ["EffortModel"]
