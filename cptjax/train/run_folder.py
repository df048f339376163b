"""A training run's checkpoints (RunPaths.checkpoints; the folder's layout is io/run_layout.py),
written so that no crash can leave them in a state a restart misreads: Orbax steps <step>/ (params,
opt_state, model_config, train_config, train_meta, and ema with training.ema) and hf_assets/
(tokenizer and generation files, with `.complete` written last).

- Saves are Orbax's own (asynchronous; a step is listed only once its write finished).
- Old steps are removed here, not by Orbax, because Orbax deletes a step file by file and a kill
  in the middle leaves a half-deleted step that it still lists. Here a step is first unlisted in
  one atomic operation (renamed to a name Orbax treats as unfinished, or, on an object store, its
  commit_success.txt removed), and only then deleted, in the background.
- Unfinished steps (a save cut short) are removed at start, here too: Orbax's own clean-up would,
  on an object store, also remove hf_assets (any folder without commit_success.txt looks to it
  like an unfinished step there).
- Orbax keeps no checksum of array data: a file changed after the save, at the same size, would
  restore silently with wrong values. Each save records a 64-bit digest of every array of the
  parameters, the optimizer state and the EMA (`fingerprint`, computed on the devices), checked on resume:
  a change within one 32-bit word of an array (any single bit flip; any change to one float32 or
  bf16 element) is detected for certain, other changes but for a chance of about 2^-64.
- hf_assets is complete only with its `.complete` marker (names and sizes, written last); every
  start verifies it and rewrites it from the run's source when it is not.
"""

from __future__ import annotations

import json
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cptjax.core.errors import CptjaxError
from cptjax.core.paths import is_remote
from cptjax.hf.write import HF_ASSET_FILES
from cptjax.io.checkpoint import (
    ASSETS_DIR,
    EMA,
    FINGERPRINT_FORMAT,
    MODEL_CONFIG,
    OPT_STATE,
    PARAMS,
    TRAIN_CONFIG,
    TRAIN_META,
    array_digests,
    differing,
    finished_steps,
    has_item,
    item_handlers,
    restore_guarded,
    unreadable_step,
)
from cptjax.model.config import ModelConfig

COMPLETE = ".complete"
_TMP = ".orbax-checkpoint-tmp"  # in a name, Orbax never lists the folder
_UNLISTED = f"{_TMP}-deleting"  # a step being removed: already unlisted
_COMMIT_FILE = "commit_success.txt"  # what marks a step finished on an object store


_SAVED = (PARAMS, OPT_STATE, EMA)  # the train state's items a step saves (ema only with training.ema)


def fingerprint(state: dict) -> dict:
    """A 64-bit digest (16 hex digits) per array of params, opt_state and ema (if kept), by name
    ("params/embed_tokens"), computed where the arrays lie: only the digests leave the devices (see
    checkpoint.array_digests)."""
    return {"format": FINGERPRINT_FORMAT,
            "arrays": array_digests({item: state[item] for item in _SAVED if item in state})}


@jax.jit
def _fingerprints_v1(tree) -> jax.Array:
    """The fingerprint cptjax saved before FINGERPRINT_FORMAT (a list of uint32, one per array), still
    checked on resume of such a run. Weaker: element i weighs (i % 65521) + 1, so a bit whose weight
    times 2^k is a multiple of 2^32 (a sign bit at an odd index) vanishes."""
    def one(x):
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32,
                                                8: jnp.uint64}[x.dtype.itemsize]).reshape(-1)
        weights = (jnp.arange(bits.size, dtype=jnp.uint32) % 65521) + 1
        return jnp.sum(bits.astype(jnp.uint32) * weights, dtype=jnp.uint32)
    return jnp.stack([one(x) for x in jax.tree.leaves(tree)])


def fingerprint_v1(state: dict) -> list[int]:
    return [int(v) for v in np.asarray(jax.device_get(_fingerprints_v1((state["params"], state["opt_state"]))))]


def changed_arrays(state: dict, saved: dict | list) -> list[str]:
    """The arrays of `state` that differ from the fingerprint `saved` with them: by name, or "the
    arrays" for a v1 fingerprint (a list), which names none. Items of the step that `state` does
    not hold (an EMA the run no longer keeps) are not compared."""
    if isinstance(saved, list):
        return [] if fingerprint_v1(state) == saved else ["the arrays"]
    held = {name: digest for name, digest in saved["arrays"].items() if name.split("/")[0] in state}
    return differing(fingerprint(state)["arrays"], held)


def restore_run(directory: epath.Path, step: int, abstract_state: dict, what: str = "run_dir") -> tuple[dict, dict]:
    """Params, optimizer state and (if `abstract_state` has one and the step holds one) the EMA of
    a run's step onto the shardings of `abstract_state`'s leaves, and its train_meta; a damaged
    step is one line saying which earlier step to fall back to. The caller decides what a missing
    EMA means (start.initial_state)."""
    steps = finished_steps(directory)
    items = [item for item in _SAVED if item in abstract_state and (item != EMA or has_item(directory, step, EMA))]
    args = {item: ocp.args.PyTreeRestore(item=abstract_state[item],
                                         restore_args=ocp.checkpoint_utils.construct_restore_args(
                                             abstract_state[item]))
            for item in items}
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    with ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers()) as manager:
        restored = restore_guarded(manager, directory, step, steps,
                                   {**args, TRAIN_META: ocp.args.JsonRestore()}, what)
    state, meta = {item: restored[item] for item in items}, restored[TRAIN_META]
    saved = meta.get("fingerprint")
    if isinstance(saved, dict) and saved.get("format") != FINGERPRINT_FORMAT:
        raise CptjaxError(f"{what} {directory}: step {step} holds a fingerprint of format "
                          f"{saved.get('format')!r}, which this cptjax does not know (it writes "
                          f"{FINGERPRINT_FORMAT!r}); resume the run with the cptjax version that saved it")
    changed = changed_arrays(state, saved) if saved is not None else []
    if changed:
        names = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        error = ValueError(f"{names} differ from the fingerprint saved with the step (a file changed after "
                           "the save)")
        raise CptjaxError(unreadable_step(directory, step, steps, error, what))
    return state, meta


def read_meta(directory: epath.Path, step: int, what: str = "run_dir") -> dict:
    """A step's train_meta alone (small JSON), to check a resume before anything is touched."""
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    with ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers()) as manager:
        return restore_guarded(manager, directory, step, finished_steps(directory),
                               {TRAIN_META: ocp.args.JsonRestore()}, what)[TRAIN_META]


class RunCheckpointer:
    """A training run's saves: asynchronous, the last `keep_last` kept plus every multiple of
    `keep_every`, old ones removed crash-safely (module docstring). Steps hold params, optimizer
    state, the model and training configs and `train_meta` (step, data state...), so a run resumes
    exactly, and `cptjax convert orbax-to-hf` and `load_model` read them like any checkpoint (their
    EMA too, when asked)."""

    def __init__(self, directory: epath.Path, keep_last: int, keep_every: int | None, async_save: bool = True):
        self.directory = directory
        self.keep_last, self.keep_every = keep_last, keep_every
        if jax.process_index() == 0:
            remove_unfinished(directory)
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers())
        self._deleting: list[threading.Thread] = []

    def save(self, step: int, state: dict, meta: dict, model_config: ModelConfig, train_config: dict,
             force: bool = False) -> bool:
        self._manager.wait_until_finished()  # the previous save is whole before anything is removed
        self._prune()
        return self._manager.save(step, force=force, args=ocp.args.Composite(**{
            PARAMS: ocp.args.PyTreeSave(state["params"]),
            OPT_STATE: ocp.args.PyTreeSave(state["opt_state"]),
            **({EMA: ocp.args.PyTreeSave(state["ema"])} if "ema" in state else {}),
            MODEL_CONFIG: ocp.args.JsonSave(model_config.to_hf_config()),
            TRAIN_META: ocp.args.JsonSave(meta),
            TRAIN_CONFIG: ocp.args.JsonSave(train_config),
        }))

    def _prune(self) -> None:
        """Removes the finished steps the policy does not keep. A save in flight is not counted,
        so until it finishes the last `keep_last` finished steps stay on disk beside it."""
        if jax.process_index() != 0:
            return
        self._manager.reload()
        steps = sorted(self._manager.all_steps())
        keep = set(steps[-self.keep_last:])
        keep |= {s for s in steps if self.keep_every and s % self.keep_every == 0}
        for step in steps:
            if step not in keep:
                self._unlist_and_delete(step)
        self._manager.reload()

    def _unlist_and_delete(self, step: int) -> None:
        path = self.directory / str(step)
        if is_remote(path):
            (path / _COMMIT_FILE).unlink(missing_ok=True)  # no longer finished: no longer listed
            doomed = path
        else:
            doomed = path.with_name(f"{path.name}{_UNLISTED}")
            path.rename(doomed)  # atomic on a local disk
        thread = threading.Thread(target=doomed.rmtree, name=f"cptjax-delete-{step}", daemon=True)
        thread.start()
        self._deleting.append(thread)

    def wait(self) -> None:
        """Blocks until every save has finished, then applies the retention policy."""
        self._manager.wait_until_finished()
        self._prune()
        for thread in self._deleting:
            thread.join()
        self._deleting.clear()

    def close(self) -> None:
        self._manager.close()


def remove_unfinished(directory: epath.Path) -> list[str]:
    """Removes what a cut-short save or deletion left: Orbax's temporary step folders, and on an
    object store step folders without their commit_success.txt. Returns the names removed."""
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        unfinished = _TMP in path.name or (
            is_remote(path) and path.name.isdigit() and not (path / _COMMIT_FILE).exists())
        if unfinished and path.is_dir():
            path.rmtree()
            removed.append(path.name)
    return removed


def assets_complete(folder: epath.Path) -> bool:
    """True if `folder` holds every file its `.complete` marker lists, at the listed sizes."""
    marker = folder / COMPLETE
    try:
        listed = json.loads(marker.read_text())
    except (OSError, FileNotFoundError, json.JSONDecodeError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().length == size
               for name, size in listed.items())


def write_assets(folder: epath.Path, sources: list[epath.Path | None]) -> list[str]:
    """(Re)writes `folder` from `sources` in order (a later source's files replace an earlier's),
    then the `.complete` marker; returns the file names."""
    if folder.exists():
        folder.rmtree()
    folder.mkdir(parents=True)
    names: dict[str, int] = {}
    for source in sources:
        if source is None or not source.is_dir():
            continue
        for name in HF_ASSET_FILES:
            if (source / name).is_file():
                (source / name).copy(folder / name, overwrite=True)
                names[name] = (folder / name).stat().length
    (folder / COMPLETE).write_text(json.dumps(names, indent=2, sort_keys=True) + "\n")
    return sorted(names)


def ensure_assets(checkpoints: epath.Path, sources: list[epath.Path | None]) -> None:
    """Makes checkpoints/hf_assets complete: kept if its marker checks out, else rewritten from
    `sources`; a run whose sources are gone and whose copy is incomplete gets one line to act on."""
    folder = checkpoints / ASSETS_DIR
    if assets_complete(folder):
        return
    if not any(s is not None and s.is_dir() for s in sources):
        if not folder.exists():
            return  # a run from scratch with no tokenizer folder: nothing to copy
        raise CptjaxError(f"{folder}: incomplete (a crash while it was written) and the model it was "
                          "copied from is gone; set model.tokenizer to the tokenizer's folder, or "
                          "copy the tokenizer files there")
    write_assets(folder, sources)
