"""AdamW for continued pretraining: a decay mask and global-norm clipping (the step applies the schedule)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from cptjax.core.errors import CptjaxError

FirstStage = Literal["everything", "new_rows", "new_rows_and_norms"]


@dataclasses.dataclass(frozen=True)
class VocabRowsConfig:
    """A model whose vocabulary `cptjax vocab resize` grew: rows [0, original_rows) of embed_tokens
    and lm_head hold the base model's tokens, the rows after them the new ones. The first stage is
    the steps before data.stages[0].start_step (schedule kind `cycles` re-warms at that step)."""

    original_rows: int  # the base tokenizer's ids, as `cptjax vocab resize` printed them
    freeze_original: bool = False  # those rows never change (bit-identical): no gradient, update or weight decay
    first_stage: FirstStage = "everything"  # what trains before data.stages[0]: all, or the new rows (and norms)

    def __post_init__(self):
        if self.original_rows < 1:
            raise CptjaxError(f"optimizer.vocab.original_rows: must be >= 1, got {self.original_rows}")


@dataclasses.dataclass(frozen=True)
class TrainedRows:
    """optimizer.vocab for the train step: `where_trained(tree, other, step)` takes, in trees shaped
    like the parameters, `tree` where a value trains at `step` (1-based) and `other` elsewhere. The
    step zeroes the untrained gradients (so clipping and Adam see the trained part only) and keeps
    the old value of every untrained parameter (bit-identical: Adam's momentum and weight decay
    move nothing else, and no -0.0 turns into +0.0 as adding a zero update would)."""

    original_rows: int
    freeze_original: bool
    first_stage: str
    first_stage_end: int  # the first step after the first stage (data.stages[0].start_step; 1: none)

    def where_trained(self, tree: dict, other: dict | None, step: jax.Array) -> dict:
        """`other` None: zeros."""
        later = step >= self.first_stage_end if self.first_stage != "everything" else True

        def leaf(path, x, y=None):
            name = str(getattr(path[-1], "key", path[-1]))
            if len(path) == 1 and name in ("embed_tokens", "lm_head"):
                new = (jnp.arange(x.shape[0]) >= self.original_rows)[:, None]
                trained = new if self.freeze_original else True if later is True else new | later
            elif self.first_stage == "new_rows_and_norms" and name.endswith("norm"):
                trained = True
            else:
                trained = later
            return x if trained is True else jnp.where(trained, x, jnp.zeros_like(x) if y is None else y)
        if other is None:
            return jax.tree_util.tree_map_with_path(leaf, tree)
        return jax.tree_util.tree_map_with_path(leaf, tree, other)


def trained_rows(vocab: VocabRowsConfig | None, first_stage_end: int, num_tokens: int) -> TrainedRows | None:
    """The step's TrainedRows of optimizer.vocab (None: not set), checked against the model's tokens."""
    if vocab is None:
        return None
    if vocab.original_rows >= num_tokens:
        raise CptjaxError(f"optimizer.vocab.original_rows {vocab.original_rows}: the model has {num_tokens} "
                          "token rows, so no new ones; give the base tokenizer's size (cptjax vocab resize prints it)")
    return TrainedRows(vocab.original_rows, vocab.freeze_original, vocab.first_stage, first_stage_end)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyperparameters; the learning rate comes from the schedule section."""

    b1: float = 0.9  # Adam's first-moment decay
    b2: float = 0.95  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's epsilon
    weight_decay: float = 0.1  # decoupled, scaled by the learning rate
    decay_norms_and_biases: bool = False  # off by default: decay pulls norm scales towards 0
    grad_clip_norm: float | None = 1.0  # global-norm clipping (null: none)
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2), PaLM's stabiliser
    grad_accum_steps: int = 1  # micro-batches per step; the update equals the full batch's
    # A name freezes every parameter with it in its path ("router": each MoE layer's; "embed_tokens").
    freeze: tuple[str, ...] = ()  # parameters left as loaded (no optimizer state kept for them)
    vocab: VocabRowsConfig | None = None  # a grown vocabulary: freeze the original rows, train the new ones first

    def __post_init__(self):
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise CptjaxError(f"optimizer.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise CptjaxError(f"optimizer.eps: must be positive, got {self.eps}")
        if self.weight_decay < 0:
            raise CptjaxError(f"optimizer.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise CptjaxError(f"optimizer.grad_clip_norm: must be positive or null, got {self.grad_clip_norm}")
        if self.z_loss < 0:
            raise CptjaxError(f"optimizer.z_loss: must be >= 0, got {self.z_loss}")
        if self.grad_accum_steps < 1:
            raise CptjaxError(f"optimizer.grad_accum_steps: must be >= 1, got {self.grad_accum_steps}")


def decay_mask(params: dict, decay_norms_and_biases: bool = False) -> dict:
    """True where weight decay applies: everything but norm scales and biases, unless asked."""
    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return decay_norms_and_biases or not (name.endswith("norm") or name.endswith("bias"))
    return jax.tree_util.tree_map_with_path(decays, params)


def frozen_mask(params: dict, names: tuple[str, ...]) -> dict:
    """True for the parameters `names` freeze: a name equal to any part of a parameter's path."""
    def frozen(path, _):
        return any(str(getattr(key, "key", key)) in names for key in path)
    return jax.tree_util.tree_map_with_path(frozen, params)


def check_freeze(names: tuple[str, ...], params: dict) -> None:
    """Every name of optimizer.freeze names something in the model (a typo would freeze nothing)."""
    parts = {str(getattr(key, "key", key)) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
             for key in path}
    unknown = [n for n in names if n not in parts]
    if unknown:
        raise CptjaxError(f"optimizer.freeze: {unknown} name no parameter of this model; names it has: "
                          f"{', '.join(sorted(parts))}")


def build_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW's update direction, before the learning rate: clipping, Adam, decoupled weight decay.

    The step multiplies it by -lr(step) itself (train_step.py), with the step counter of the train
    state, so the learning rate logged for a step is the one applied, also after a skipped
    (non-finite) step: optax's own schedule would count only the updates it applied.
    `optax.adamw(lr)` is this chain followed by `scale_by_learning_rate(lr)`.
    """
    chain = []
    if config.grad_clip_norm is not None:
        chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
    chain.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
    chain.append(optax.add_decayed_weights(
        config.weight_decay, mask=lambda p: decay_mask(p, config.decay_norms_and_biases)))
    if not config.freeze:
        return optax.chain(*chain)
    # Frozen parameters get a zero direction and no Adam state; clipping sees the trained ones only.
    labels = lambda p: jax.tree.map(lambda f: "frozen" if f else "trained", frozen_mask(p, config.freeze))  # noqa: E731
    return optax.multi_transform({"trained": optax.chain(*chain), "frozen": optax.set_to_zero()}, labels)
