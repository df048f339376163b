"""Training metrics: JSON Lines, TensorBoard event files, W&B, and a console that suits where it runs.

Every record is written to `metrics.jsonl` (one JSON object per line, `{"step", "kind", ...}`), to
TensorBoard under `tensorboard/`, and with `logging.wandb` to Weights & Biases (wandb_run.py). The
console shows a progress bar with loss, tokens/s and ETA on an interactive terminal, and plain log
lines otherwise (CI logs, SLURM files). Only process 0 writes.

The log is the history of the run as restored: a run that starts at step k (its checkpoint) keeps
the records of steps <= k, and moves those of later steps (written before a crash, about to be
computed again) to `metrics.discarded.jsonl`; TensorBoard purges them too (W&B cannot: see
wandb_run.py). On an object store (gs://), which cannot append, the file is rewritten whole at
most every FLUSH_SECONDS and at `flush()`, as tensorboardX does for its event files.
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
from etils import epath

from cptjax.core.errors import CptjaxError
from cptjax.core.paths import is_remote
from cptjax.io.run_layout import RunPaths
from cptjax.model.config import ModelConfig
from cptjax.train.config import WandbSection
from cptjax.train.wandb_run import WandbRun

FLUSH_SECONDS = 30.0  # how stale a remote metrics.jsonl may get between flushes

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets; extend with logging.peak_flops.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12, "NVIDIA B200": 2250e12,
}


def peak_flops_per_device(device_kind: str, override: float | None = None) -> float | None:
    if override:
        return override
    for prefix, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if device_kind.startswith(prefix):
            return flops
    return None  # CPUs and unknown chips: MFU is not reported rather than guessed


def training_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = False) -> float:
    """Model FLOPs per trained token, attention included (PaLM, appendix B): 6 x the matmul
    parameters (embedding lookup excluded, output projection included) + 12 x layers x heads x
    head_dim x attended length. PaLM's count (`causal` false) takes the attended length as the whole
    row, or each layer's sliding window where it has one: causal masking's skipped half is counted.
    `causal`: the positions a query attends under the causal mask, on average over the row:
    `attended_length` (MaxText's count since its 2025 changes: about half the row for full
    attention). A mixture-of-experts layer counts the experts a token runs (experts_per_token of
    them) and its router, not all experts."""
    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    moe = cfg.experts_per_token * 3 * d * cfg.expert_size + d * cfg.num_experts
    mlps = len(cfg.moe_layers) * moe + (cfg.num_layers - len(cfg.moe_layers)) * 3 * d * f
    matmul_params = cfg.num_layers * (d * n * h * 2 + d * k * h * 2) + mlps + cfg.vocab_size * d
    if causal:
        context = sum(attended_length(seq_len, window) for window in cfg.layer_windows)
    else:
        context = sum(min(seq_len, window or seq_len) for window in cfg.layer_windows)  # over the layers
    return 6.0 * matmul_params + 12.0 * n * h * context


def attended_length(seq_len: int, window: int | None = None) -> float:
    """The mean over a row of L positions of how many positions a query attends under the causal
    mask: (L + 1) / 2 for full attention; with a sliding window W < L, (W (W + 1) / 2 + (L - W) W) / L."""
    w = min(window or seq_len, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def throughput(cfg: ModelConfig, seq_len: int, tokens_per_s: float, devices: int, peak: float | None) -> dict:
    """A train record's rates: tokens/s overall and per device, model TFLOP/s per device (PaLM's
    count), and where the chips' peak is known, MFU by PaLM's count (`mfu`) and by the causal count
    (`mfu_causal`), to set beside MaxText's tables."""
    flops, flops_causal = (training_flops_per_token(cfg, seq_len, causal) for causal in (False, True))
    record = {"tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / devices,
              "tflops_per_device": tokens_per_s * flops / devices / 1e12}
    if peak:
        record["mfu"] = tokens_per_s * flops / (peak * devices)
        record["mfu_causal"] = tokens_per_s * flops_causal / (peak * devices)
    return record


class JsonLines:
    """metrics.jsonl, restored to the run's history at `start_step` (see the module docstring)."""

    def __init__(self, path: epath.Path, start_step: int):
        self.path = path
        self._remote = is_remote(path)
        lines = path.read_text().splitlines() if path.exists() else []
        # the last step logged before this start, set-aside records included (what W&B may hold)
        self.last_step = max((_step_of(line) for line in lines), default=-1)
        torn = lines[-1] if lines and _step_of(lines[-1]) < 0 else None  # a write a crash cut short
        for number, line in enumerate(lines[:-1] if torn is not None else lines, start=1):
            if line and _step_of(line) < 0:
                raise CptjaxError(f"{path}:{number}: not a metrics record; the log is damaged. Move the "
                                  "file aside to start the log afresh (the checkpoints are unaffected)")
        kept = [line for line in lines
                if line and line != torn and start_step > 0 and json.loads(line)["step"] <= start_step]
        dropped = [line for line in lines if line and line not in kept]
        if dropped:
            discarded = path.with_name("metrics.discarded.jsonl")
            old = discarded.read_text() if discarded.exists() else ""
            discarded.write_text(old + "".join(f"{line}\n" for line in dropped))
        self._lines = kept
        self.dropped = [json.loads(line) for line in dropped if line != torn]  # set aside by this start
        self._flushed_at = time.monotonic()
        if dropped or not path.exists():
            self._rewrite()
        self._file = None if self._remote else path.open("a")

    def _rewrite(self) -> None:
        text = "".join(f"{line}\n" for line in self._lines)
        if self._remote:  # one object, written whole
            self.path.write_text(text)
            return
        partial = self.path.with_name(f".{self.path.name}.partial")
        partial.write_text(text)
        partial.replace(self.path)  # atomic: the log is never seen half rewritten

    def steps(self, kind: str) -> set[int]:
        """The steps of the records of `kind` in the log: its history as restored, and what this
        run has written since."""
        return {record["step"] for record in map(json.loads, self._lines) if record["kind"] == kind}

    def write(self, record: dict) -> None:
        line = json.dumps(record, allow_nan=True)
        self._lines.append(line)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        elif time.monotonic() - self._flushed_at > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._remote:
            self._rewrite()
            self._flushed_at = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()


class MetricsLogger:
    """Writes records to JSON Lines, TensorBoard, W&B and the console (process 0 only). `start_step`
    is where the run (re)starts: later records already in the log are set aside. `wandb` and
    `config` (the resolved config, plain data): the W&B run to log to as well, if any."""

    def __init__(self, run: RunPaths, total_steps: int, *, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, progress: str = "auto", stream=None,
                 wandb: WandbSection | None = None, config: dict | None = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream or sys.stderr
        self._bar = None
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        run.logs.mkdir(parents=True, exist_ok=True)
        self._jsonl = JsonLines(run.metrics, start_step)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(run.tensorboard), purge_step=start_step + 1)
        if progress == "bar" or (progress == "auto" and self.stream.isatty()):
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, file=self.stream, unit="step", dynamic_ncols=True)
        if wandb is not None:
            self._wandb = WandbRun(wandb, run, config or {}, logged_up_to=self._jsonl.last_step,
                                   warn=lambda text: self.message(f"cptjax train: {text}"),
                                   without="training goes on without it (metrics.jsonl has every record)")

    @property
    def has_bar(self) -> bool:
        """True when a progress bar shows the train records (no separate log lines needed)."""
        return self._bar is not None

    def logged_steps(self, kind: str) -> set[int]:
        """The steps with a record of `kind` in metrics.jsonl (none on the processes that do not log)."""
        return self._jsonl.steps(kind) if self._jsonl is not None else set()

    @property
    def discarded(self) -> list[dict]:
        """The records this start set aside (of steps after its start step; none where not logging)."""
        return self._jsonl.dropped if self._jsonl is not None else []

    def start_at(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def log(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write({"step": step, "kind": kind, **values})
        fields = dict(_flatten(values))
        if self._tb is not None:
            for key, value in fields.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log(step, kind, fields)
        if self._bar is not None and kind == "train":
            self._bar.n = step
            self._bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values.get('tokens_per_s', 0):,.0f}",
                                  refresh=False)
            self._bar.refresh()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def flush(self) -> None:
        """Makes everything logged so far visible (remote logs are rewritten on a timer)."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _step_of(line: str) -> int:
    """A logged line's step; -1 for a blank line or one a crash cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


def _flatten(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


class StepTimer:
    """Wall time between consecutive fetched steps, for step time and tokens/s."""

    def __init__(self):
        self._last = None

    def restart(self) -> None:
        """Forget the last mark: the next lap reports nothing (used after eval or a save)."""
        self._last = None

    def lap(self) -> float | None:
        now = time.perf_counter()
        elapsed = None if self._last is None else now - self._last
        self._last = now
        return elapsed


def router_record(router: dict, layers: tuple[int, ...]) -> dict:
    """An MoE step's router metrics as logged: the load-balancing and router z-losses (before their
    coefficients), and per MoE layer (`layers`, their indices) the share of routed tokens each
    expert took and the normalised entropy of those shares (1: perfectly even, 0: one expert
    takes every token)."""
    load = np.asarray(router["expert_load"], np.float64)  # [Ly, E]
    entropy = -np.sum(np.where(load > 0, load * np.log(np.where(load > 0, load, 1.0)), 0.0), axis=-1)
    return {"aux_loss": float(router["aux_loss"]), "z_loss": float(router["z_loss"]), "layers": list(layers),
            "load_entropy": [round(float(h), 5) for h in entropy / np.log(load.shape[-1])],
            "expert_load": [[round(float(x), 5) for x in row] for row in load]}
