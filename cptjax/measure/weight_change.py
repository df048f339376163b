"""Where training moved the weights: per decoder layer and parameter kind, the relative change
||W - W_base||_F / ||W_base||_F of a tuned model (an HF folder, a cptjax checkpoint or a run, PATH@STEP
for a step) from its base.

It answers questions a loss curve cannot: did CPT touch every layer or mostly the top ones, did the
embeddings move more than the attention, did a second stage change more than the first? The models
are opened and checked as for a merge (merge.open_pair: same architecture, shapes, vocabulary and
tokenizer) and read one parameter at a time, so two models of any size need only two tensors of
host memory at once.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cptjax.core.errors import CptjaxError
from cptjax.measure.merge import open_pair


@dataclasses.dataclass(frozen=True)
class WeightChange:
    base: str  # what was read, as Weights.describe says
    tuned: str
    layers: dict[str, list[float]]  # {kind (q_proj, ...): relative change of layer 0, 1, ...}
    other: dict[str, float]  # embed_tokens, norm and (untied) lm_head

    def rows(self) -> list[dict]:
        """One row per layer: {"layer": i, kind: change, ...}, for tables."""
        count = len(next(iter(self.layers.values()), []))
        return [{"layer": i, **{kind: values[i] for kind, values in self.layers.items()}}
                for i in range(count)]


def relative_change(base: np.ndarray, tuned: np.ndarray, axis: tuple[int, ...] | None = None):
    """||tuned - base|| / ||base|| (Frobenius, over `axis`; all axes when None), in float64.

    NaN where the base is all zeros (a zero-initialised bias), where a relative change means nothing."""
    b, t = np.asarray(base, np.float64), np.asarray(tuned, np.float64)
    moved = np.sqrt(np.sum((t - b) ** 2, axis=axis))
    size = np.sqrt(np.sum(b ** 2, axis=axis))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(size > 0, moved / np.where(size > 0, size, 1.0), np.nan)


def weight_change(base: str, tuned: str) -> WeightChange:
    """The relative change of every parameter of `tuned` from `base`, per layer for stacked ones."""
    layers: dict[str, list[float]] = {}
    other: dict[str, float] = {}
    with open_pair(base, tuned) as pair:
        for path in pair.paths():
            b, t = pair.base.read_one(path), pair.tuned.read_one(path)
            if b.shape != t.shape:  # the configs agree, so only the files can disagree
                raise CptjaxError(f"parameter {'/'.join(path)}: the base has shape {list(b.shape)}, the "
                                  f"tuned model {list(t.shape)}")
            if path[0] == "layers":  # [Ly, ...]: one value per layer
                layers[path[-1]] = [float(v) for v in relative_change(b, t, axis=tuple(range(1, b.ndim)))]
            else:
                other["/".join(path)] = float(relative_change(b, t))
        return WeightChange(pair.base.describe(), pair.tuned.describe(), layers, other)
