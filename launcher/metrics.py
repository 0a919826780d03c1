"""Metrics: TensorBoard scalars, a JSONL copy, and a console progress bar (rank 0 only).

Scalar names: train/loss, train/lr, train/grad_norm, train/loss_scale, train/tokens_per_s,
train/mfu, train/data_wait_fraction, train/skipped_steps, train/data_skipped_shards,
train/data_lost_samples, eval/loss, eval/perplexity, memory/model_state_bytes,
memory/peak_rss_bytes (maxima over ranks; per-rank figures in the JSONL), redraw/step; events (data_bad_shard,
data_lost_document, redraws, non-finite losses) go to the JSONL with their numbers under events/.
Each JSONL line has at least step, loss, lr, tokens_per_s for training records (kind "train").
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


def measure_peak_flops(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, repeats: int = 3
) -> float:
    """Dense GEMM FLOP/s of this process on ``device`` in ``dtype``: the rate MFU is counted against.

    On a GPU, 4096-square products in the training dtype (bf16 / fp16 on tensor cores); on the CPU,
    1024-square float32 products (a stand-in for the hardware peak).
    """
    device = torch.device(device)
    size = 1024 if device.type == "cpu" else 4096
    dtype = torch.float32 if device.type == "cpu" else dtype
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm-up
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


class MetricsLogger:
    """Writes only on rank 0; every method is safe to call on every rank."""

    def __init__(
        self, output_dir: Path, enabled: bool, total_steps: int, start_step: int, tensorboard: bool, progress: bool
    ):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        self.bar = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(output_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=start_step or None)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True)

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """kind: train, eval, event or memory; values: name -> number (or small JSON values for events)."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = {"train": "train", "eval": "eval", "event": "events", "memory": "memory"}[kind]
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{prefix}/{name}", value, step)
        if self.bar is not None and kind == "train":
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}")
        if self.bar is not None and kind == "eval":
            self.bar.write(f"step {step}: eval loss {values['loss']:.4f} (perplexity {values['perplexity']:.1f})")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
