"""cptjax checkpoints: an Orbax CheckpointManager folder, one subfolder per step.

Layout (a training run adds items to the same steps; run_folder.py writes those):
  CKPT/<step>/params        the model parameters (a PyTree of arrays, stacked layers)
  CKPT/<step>/model_config  the model's HF config.json, as JSON
  CKPT/<step>/ema           a training run's EMA of the parameters (training.ema), float32, if kept
  CKPT/hf_assets/           tokenizer and generation files from the source model

Orbax lists only steps whose write finished, so a half-written step is never restored. A step that
cannot be read (a damaged or half-deleted file) stops with one line naming the step, the file where
the store says which, and the other finished steps (`restore_guarded`), and nothing after it: see
`_LoopThatFinishesItsTasks`. A training run's step also holds a digest of every array
(`array_digests`); each parameter read is checked against it, so a file changed in place at the
same size (which Orbax would read without complaint) is refused too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike, user_path
from cptjax.model.config import ModelConfig
from cptjax.model.transformer import ParamPath, get_param, param_paths, set_param

PARAMS = "params"
MODEL_CONFIG = "model_config"
ASSETS_DIR = "hf_assets"
OPT_STATE = "opt_state"
TRAIN_META = "train_meta"  # step, data iterator state, lr, tokens seen: small JSON
TRAIN_CONFIG = "train_config"
EMA = "ema"  # a run's EMA of the parameters: the same tree as params, in float32

# Orbax's notices (through absl's logger) that a read-only manager is read-only: true of every
# checkpoint cptjax reads, so in a notebook or script they are only noise. Its other messages pass.
_READ_ONLY_NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")


class _DropReadOnlyNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_READ_ONLY_NOTICES)


logging.getLogger("absl").addFilter(_DropReadOnlyNotices())


class _LoopThatFinishesItsTasks(asyncio.SelectorEventLoop):
    """An event loop that, when closed, first cancels its unfinished tasks and waits for them, as
    `asyncio.run` does. Orbax runs each read in a new loop of its own and closes it as soon as the
    read's `asyncio.gather` fails, while the gather's other TensorStore reads are still in flight.
    When one of those completes, TensorStore's thread calls `call_soon_threadsafe` on the closed
    loop, and Python prints "RuntimeError: Event loop is closed" with a traceback; tasks never
    finished print "Task was destroyed but it is pending!" when collected. Both came after the
    one-line error of a damaged checkpoint, or not, depending on timing."""

    def close(self) -> None:
        if not self.is_running() and not self.is_closed():
            pending = asyncio.all_tasks(self)
            for task in pending:
                task.cancel()
            if pending:
                self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()


class _LoopsFinishTheirTasks(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _LoopThatFinishesItsTasks()


with warnings.catch_warnings():  # event loop policies are deprecated from Python 3.14
    warnings.simplefilter("ignore", DeprecationWarning)
    # Only over asyncio's own default: a policy the user installed (uvloop...) is left alone.
    if type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy:
        asyncio.set_event_loop_policy(_LoopsFinishTheirTasks())


FINGERPRINT_FORMAT = "fmix32x2-v2"  # train_meta's fingerprint["format"]; a list is the v1 format
_SEEDS = (0x9E3779B9, 0x7F4A7C15)  # one per 32-bit lane of a digest
_K1, _K2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finalizer on uint32: each step (xor with a right shift of itself, product with
    an odd constant, mod 2^32) is invertible, so the whole is a bijection of the 32-bit words."""
    h = h ^ (h >> 16)
    h = h * _K1
    h = h ^ (h >> 13)
    h = h * _K2
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words, in its own shape (8-byte elements: a trailing axis of 2;
    1- and 2-byte ones zero-extended, which keeps distinct values distinct)."""
    x = x.reshape(1) if x.ndim == 0 else x
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _digest(x: jax.Array) -> jax.Array:
    """[2] uint32: for each lane, the sum mod 2^32 over the array's words w at coordinates c of
    fmix32(w ^ key(c, lane)), key a hash of the coordinates. For fixed c, w -> fmix32(w ^ key) is a
    bijection, so a change to one word changes its term and therefore the sum, in both lanes: any
    single-bit flip is caught. Changes to several words cancel with a chance of about 2^-64. A sum
    mod 2^32 is the same in any order and grouping, and the coordinates are the global ones (iota),
    so the digest does not depend on the sharding: XLA sums each shard where it lies and adds the
    partial sums (an all-reduce of 8 bytes per array, no gather)."""
    w = _words(x)
    position = jnp.zeros(w.shape, jnp.uint32)
    for axis in range(w.ndim):  # coordinates, not a flat index: no overflow past 2^32 elements
        position = _fmix32(position * np.uint32(0x9E3779B1) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis))
    return jnp.stack([jnp.sum(_fmix32(w ^ _fmix32(position ^ np.uint32(seed))), dtype=jnp.uint32)
                      for seed in _SEEDS])


_digests = jax.jit(lambda leaves: jnp.stack([_digest(x) for x in leaves]))


def _leaf_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def array_digests(tree: dict) -> dict[str, str]:
    """A 64-bit digest (16 hex digits) per array of `tree`, by its path ("params/embed_tokens"),
    computed where the arrays lie: only the digests leave the devices (see `_digest`)."""
    named = jax.tree_util.tree_flatten_with_path(tree)[0]
    lanes = np.asarray(jax.device_get(_digests([x for _, x in named]))).tolist()
    return {_leaf_name(path): f"{hi:08x}{lo:08x}" for (path, _), (lo, hi) in zip(named, lanes, strict=True)}


def differing(now: dict[str, str], saved: dict[str, str]) -> list[str]:
    """The names whose digests differ (or that only one side has)."""
    return sorted(name for name in now.keys() | saved.keys() if now.get(name) != saved.get(name))



def save_params_checkpoint(directory: epath.Path, step: int, cfg: ModelConfig, params: dict) -> None:
    """Writes one step holding `params` (NumPy arrays) and the model config (used by hf-to-orbax).

    The save is synchronous and the caller owns the arrays, so Orbax's defensive copy of host
    arrays is switched off; so is zstd, whose compressed chunks stay in memory until the save ends.
    Together they took a 1.2B-parameter conversion from 2.9x to 1.1x the checkpoint's size in peak
    RSS (scripts/bench_convert.py), for a checkpoint ~25% larger on disk. Restore reads either form.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    handlers = {PARAMS: ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False),
                MODEL_CONFIG: ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(directory, options=options, item_handlers=handlers) as manager:
        manager.save(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.PyTreeSave(params),
            MODEL_CONFIG: ocp.args.JsonSave(cfg.to_hf_config()),
        }))
        manager.wait_until_finished()


def has_item(directory: epath.Path, step: int, item: str) -> bool:
    """Whether a finished step holds `item` (a run's step holds EMA only if it kept one)."""
    return (directory / str(step) / item).is_dir()


class CheckpointReader:
    """Reads one finished step of a cptjax checkpoint, a parameter at a time if asked.

    `flag` and `step_flag` name the path and the step the way the user gave them ("--ckpt",
    "model.init_from"...), for messages. `cptjax.io.weights.open_weights` decides that a folder is one.
    `item` is PARAMS, or EMA for a training run's EMA of them (the same tree, in float32).
    """

    def __init__(self, directory: PathLike, step: int | None = None, *, flag: str = "--ckpt",
                 step_flag: str = "--step", item: str = PARAMS):
        self.item = item
        self.directory = user_path(directory, flag)
        if not self.directory.is_dir():
            raise CptjaxError(f"{flag} {self.directory}: no such folder")
        options = ocp.CheckpointManagerOptions(create=False, read_only=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=item_handlers())
        try:
            self._open(step, flag, step_flag)
        except BaseException:
            self._manager.close()  # no caller gets a reader to close
            raise

    def _open(self, step: int | None, flag: str, step_flag: str) -> None:
        self.steps = steps = sorted(self._manager.all_steps())
        if not steps:
            raise CptjaxError(f"{flag} {self.directory}: no finished checkpoint step in this folder "
                              "(is it a cptjax checkpoint? an interrupted write leaves none)")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CptjaxError(f"{step_flag} {step}: not in {self.directory}; finished steps are "
                              f"{', '.join(map(str, steps))}")
        self.step, self._flag, self._step_flag = step, flag, step_flag
        config_dict = self._restore({MODEL_CONFIG: ocp.args.JsonRestore()})[MODEL_CONFIG]
        self.config = ModelConfig.from_hf_config(config_dict, f"{self.directory}/{step}/{MODEL_CONFIG}")
        if self.item != PARAMS and not has_item(self.directory, step, self.item):
            raise CptjaxError(f"{flag} {self.directory}: step {step} holds no EMA of the weights (its run had "
                              "no training.ema); read its parameters without ':ema' / --ema, or train with "
                              "training.ema set")
        try:
            self._metadata = self._manager.item_metadata(step)[self.item]
        except Exception as err:  # noqa: BLE001 - a damaged step raises what the store raises
            raise CptjaxError(unreadable_step(self.directory, step, steps, err, flag, step_flag)) from None
        # A training run's step holds the digests of its arrays (run_folder.py): every parameter
        # read is checked against them. A converted checkpoint, or a v1 list (not by name), has none.
        saved = {}
        if (self.directory / str(step) / TRAIN_META).is_dir():
            saved = self._restore({TRAIN_META: ocp.args.JsonRestore()})[TRAIN_META].get("fingerprint")
        self._digests = saved["arrays"] if isinstance(saved, dict) and saved.get("format") == FINGERPRINT_FORMAT \
            else None

    def _verified(self, params: dict) -> dict:
        if self._digests is None:
            return params
        now = array_digests({self.item: params})
        changed = differing(now, {name: self._digests.get(name) for name in now})
        if changed:
            error = ValueError(f"{', '.join(changed[:3])} differ from the fingerprint saved with the step (a file "
                               "changed after the save)")
            raise CptjaxError(unreadable_step(self.directory, self.step, self.steps, error, self._flag,
                                              self._step_flag))
        return params

    def _restore(self, args: dict) -> dict:
        return restore_guarded(self._manager, self.directory, self.step, self.steps, args, self._flag,
                               self._step_flag)

    @property
    def assets_dir(self) -> epath.Path:
        return self.directory / ASSETS_DIR

    def restore(self, paths: list[ParamPath] | None = None) -> dict:
        """Restores the named parameters (all by default) as NumPy arrays in their stored dtype."""
        meta = _as_dict(self._metadata)
        item, restore_args = {}, {}
        for path in param_paths(meta) if paths is None else paths:
            set_param(item, path, np.empty((0,), dtype=get_param(meta, path).dtype))
            set_param(restore_args, path, ocp.RestoreArgs(restore_type=np.ndarray))
        restored = self._restore({self.item: ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True)})
        return self._verified(restored[self.item])

    def restore_onto(self, abstract_params: dict) -> dict:
        """All parameters straight onto the shardings (and dtypes) of `abstract_params`' leaves."""
        restored = self._restore({self.item: ocp.args.PyTreeRestore(
            item=abstract_params, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_params))})
        return self._verified(restored[self.item])

    def restore_one(self, path: ParamPath) -> np.ndarray:
        return get_param(self.restore([path]), path)

    def close(self) -> None:
        self._manager.close()


def item_handlers() -> dict:
    """Every item a cptjax checkpoint may hold (a converted one has params and model_config; a run's
    the other three, and ema with training.ema). Orbax warns of each item present but unregistered,
    even when it is not read."""
    return {PARAMS: ocp.PyTreeCheckpointHandler(), OPT_STATE: ocp.PyTreeCheckpointHandler(),
            EMA: ocp.PyTreeCheckpointHandler(),
            MODEL_CONFIG: ocp.JsonCheckpointHandler(), TRAIN_META: ocp.JsonCheckpointHandler(),
            TRAIN_CONFIG: ocp.JsonCheckpointHandler()}


def _as_dict(metadata) -> dict:
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    return dict(tree)


def finished_steps(directory: epath.Path) -> list[int]:
    """The steps of a checkpoint folder whose write finished (none if it is not one)."""
    if not directory.is_dir():
        return []
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    with ocp.CheckpointManager(directory, options=options) as manager:
        return sorted(manager.all_steps())


def restore_guarded(manager: ocp.CheckpointManager, directory: epath.Path, step: int, steps: list[int],
                    args: dict, flag: str, step_flag: str | None = None) -> dict:
    """`manager.restore(step, Composite(**args))`, with a damaged step reported as one line."""
    try:
        return manager.restore(step, args=ocp.args.Composite(**args))
    except CptjaxError:
        raise
    except Exception as err:  # noqa: BLE001 - tensorstore, OCDBT and JSON raise several types
        raise CptjaxError(unreadable_step(directory, step, steps, err, flag, step_flag)) from None


def unreadable_step(directory: epath.Path, step: int, steps: list[int], err: Exception, flag: str,
                    step_flag: str | None = None) -> str:
    """One line: which step, which file (where the error names one), what to do: read another step
    with `step_flag`, or (a run resuming, step_flag None) set the broken step aside."""
    full = " ".join(f"{err} {err.__cause__ or ''} {err.__context__ or ''}".split())
    first = " ".join(str(err).split()).split(" See full TensorStore details")[0]
    named = re.findall(r"((?:gs://|/)[^\s'\",;]*/" + str(step) + r"/[^\s'\",;]*)", full)
    where = f" ({named[0]})" if named else ""
    earlier = [s for s in steps if s < step]
    if not earlier:
        fix = "no earlier finished step to fall back to"
    elif step_flag:
        fix = f"finished steps before it: {', '.join(map(str, earlier))}; read one with {step_flag}"
    else:
        fix = (f"finished steps before it: {', '.join(map(str, earlier))}; to resume from step {earlier[-1]}, "
               f"move {directory / str(step)} aside (e.g. rename it to {step}.broken) and run again")
    return (f"{flag} {directory}: step {step} cannot be read{where}: {type(err).__name__}: "
            f"{first[:200]}; {fix}")
