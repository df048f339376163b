"""AdamW for continued pretraining: a decay mask and global-norm clipping (the step applies the schedule)."""

from __future__ import annotations

import dataclasses

import jax
import optax

from cptjax.core.errors import CptjaxError


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
