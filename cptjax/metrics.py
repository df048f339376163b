"""Training metrics: JSON Lines, TensorBoard event files, and a console that suits where it runs.

Every record is written to `metrics.jsonl` (one JSON object per line, `{"step", "kind", ...}`) and to
TensorBoard under `tensorboard/`. The console shows a progress bar with loss, tokens/s and ETA on an
interactive terminal, and plain log lines otherwise (CI logs, SLURM files). Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from cptjax.model_config import ModelConfig

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


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token, attention included (PaLM, appendix B): 6 x the matmul
    parameters (embedding lookup excluded, output projection included) + 12 x layers x heads x
    head_dim x attended length. Causal masking's skipped half is counted, as PaLM counts it; the
    attended length is the sliding window when there is one."""
    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f
    matmul_params = cfg.num_layers * per_layer + cfg.vocab_size * d
    context = min(seq_len, cfg.sliding_window or seq_len)
    return 6.0 * matmul_params + 12.0 * cfg.num_layers * n * h * context


class MetricsLogger:
    """Writes records to JSON Lines, TensorBoard and the console (process 0 only)."""

    def __init__(self, log_dir: Path, total_steps: int, *, enabled: bool = True, tensorboard: bool = True,
                 progress: str = "auto", stream=None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream or sys.stderr
        self._bar = None
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(log_dir / "metrics.jsonl", "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(log_dir / "tensorboard"))
        if progress == "bar" or (progress == "auto" and self.stream.isatty()):
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, file=self.stream, unit="step", dynamic_ncols=True)

    @property
    def has_bar(self) -> bool:
        """True when a progress bar shows the train records (no separate log lines needed)."""
        return self._bar is not None

    def start_at(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def log(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **values}
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in _flatten(values):
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
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

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


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
