"""The training loop in parts: a run is built once, then it steps until max_steps or a stop.

    run = build_run(config, topology, resume, faults, reshard)
    finished = train(run)          # False: stopped early (a signal, the time budget), saved

An optimizer step is ``grad_accum`` micro-steps (``micro_step``: the batch, forward, the
non-finite check on every rank, backward, the step's learning rate, ``engine.step``). What happens
at an optimizer-step boundary is ``at_boundary``, in this order: log, evaluate, checkpoint, stop,
and last the projection of the next step, so whatever looks at the model at a boundary sees the
projection its last step trained with. Per-step randomness (dropout) is a function of (seed,
step, micro-step, rank): there is no RNG state to checkpoint.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from launcher import checkpoint
from launcher.config import RunConfig, save_config
from launcher.dist import PeerAbortWatchdog, Topology, all_mean, any_rank, barrier, broadcast_int, gather_objects
from launcher.engine import build_engine, build_model_config, flops_per_micro_batch
from launcher.errors import EXIT_FAILED
from launcher.faults import Faults
from launcher.memory import model_state_bytes, peak_resident_bytes, resident_bytes
from launcher.metrics import MetricsLogger, measure_peak_flops
from launcher.projections import projection_record, set_projections_everywhere
from launcher.schedule import learning_rate, set_learning_rate
from launcher.streams import (
    batch_tokens,
    eval_manifest_path,
    make_stream,
    report_bad_shards,
    report_lost_documents,
    source_tokens,
    to_device,
)
from performer.feature_maps import derive_seed
from performer.redraw import RedrawSchedule

# The dtype MFU's peak is measured in (launcher.metrics.measure_peak_flops): the training precision's.
_TRAINING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TooManyNonFinite(RuntimeError):
    pass


@dataclass
class Progress:
    """What a checkpoint must carry besides the engine's own state."""

    samples: int = 0
    tokens: int = 0
    skipped_nonfinite: int = 0
    stop_requested: list = field(default_factory=list)


@dataclass
class MetricsWindow:
    """What the micro-steps since the last log add up to."""

    loss: float = 0.0
    micro: int = 0
    tokens: int = 0
    wait: float = 0.0  # seconds spent waiting for batches
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Run:
    """Everything one rank's training needs, built once by ``build_run``."""

    config: RunConfig
    topology: Topology
    model: Any
    model_config: Any
    engine: Any
    stream: Any
    eval_stream: Any | None
    metrics: MetricsLogger
    redraws: RedrawSchedule
    projection_seed: int
    faults: Faults
    progress: Progress
    last_saved_step: int
    peak_flops: float
    micro_batch_flops: float
    eval_start: dict | None = None  # the eval stream's state at the start of its first epoch
    reported_lost: dict = field(default_factory=dict)  # (shard, member) -> reason, the same on every rank
    window: MetricsWindow = field(default_factory=MetricsWindow)
    consecutive_nonfinite: int = 0
    attempts: int = 0  # forward attempts, the fault injector's clock
    step_lr: float = 0.0  # the rate the last optimizer step used
    held: dict | None = None  # model-state bytes of the step being logged
    watchdog: PeerAbortWatchdog | None = None
    started_at: float = field(default_factory=time.monotonic)
    stop_after_step: bool = False  # agreed by every rank at the step's last micro-step

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.train.output_dir) / "checkpoints"

    def client_state(self) -> dict:
        step = self.engine.global_steps
        progress = self.progress
        return {
            "step": step,
            "samples": progress.samples,
            "tokens": progress.tokens,
            "skipped_nonfinite": progress.skipped_nonfinite,
            "data": self.stream.state_dict(),
            "projection_seed": self.projection_seed,
            "projection": projection_record(self.model, self.redraws, step),
            "config_fingerprint": self.config.fingerprint(),
            "model_config": self.model_config.to_dict(),
            "run_config": self.config.to_dict(),
            "world_size": self.topology.world_size,
            "data_lost_documents": [
                [path, member, reason] for (path, member), reason in sorted(self.reported_lost.items())
            ],
        }

    def save(self, background: bool = False) -> None:
        """A checkpoint of this step; with ``background`` rank 0 commits it while training goes on."""
        checkpoint.save(
            self.engine,
            self.checkpoint_dir,
            self.engine.global_steps,
            self.client_state(),
            self.topology,
            self.config.checkpoint.keep,
            self.config,
            background=background,
        )
        self.last_saved_step = self.engine.global_steps

    def finish_saves(self) -> None:
        """Wait for a background commit (collective; raises on every rank if it failed)."""
        checkpoint.finish_commit(self.checkpoint_dir, self.topology)


# ------------------------------------------------------------------------------ building


def build_run(
    config: RunConfig, topology: Topology, resume: str | None, faults: Faults | None = None, reshard: bool = False
) -> Run:
    """Resume point, model, engine, projections, streams and metrics of this rank (collective)."""
    from data.shards import Manifest
    from performer.models import build_model

    checkpoint_dir = Path(config.train.output_dir) / "checkpoints"
    resume_tag = checkpoint.resolve_resume_tag(checkpoint_dir, resume, topology)
    convert = resume_tag is not None and checkpoint.check_compatible(
        checkpoint_dir / resume_tag, config, topology, reshard
    )
    load_dir = checkpoint.convert_to_universal(checkpoint_dir, resume_tag, topology) if convert else checkpoint_dir
    model_config = build_model_config(config, Manifest.load(config.data.train_manifest).special)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = build_model(config.model.kind, model_config)
    engine, parameter_groups = build_engine(config, model, topology.world_size, load_universal=convert)
    faults = faults if faults is not None else Faults()
    faults.instrument_saves(engine, topology.rank)
    # One integer decides every projection: drawn on rank 0, broadcast, stored in checkpoints.
    projection_seed = broadcast_int(derive_seed(config.seed, 0x5EED) if topology.is_main else 0)
    stream = make_stream(config, None, topology)
    progress, client = Progress(), None
    if resume_tag is not None:
        client = checkpoint.load(engine, load_dir, resume_tag)
        if convert:
            checkpoint.remove_universal(checkpoint_dir, topology)
        stream.load_state_dict(client["data"])
        for path, member, reason in client.get("data_lost_documents", []):
            stream.lost_documents[(path, member)] = reason
        projection_seed = int(client["projection_seed"])
        progress = Progress(
            samples=client["samples"], tokens=client["tokens"], skipped_nonfinite=client["skipped_nonfinite"]
        )
    redraws = RedrawSchedule(config.model.feature_redraw_interval, config.model.redraw_mode)
    # The projection the next step trains with (a function of (seed, step): resuming restores it exactly).
    set_projections_everywhere(model, projection_seed, engine.global_steps + 1, redraws, check=True)
    if topology.is_main:
        output_dir = Path(config.train.output_dir)
        save_config(config, output_dir / "config.yaml")
        (output_dir / "model_config.json").write_text(json.dumps(model_config.to_dict(), indent=2) + "\n")
    eval_manifest = eval_manifest_path(config) if config.eval.interval else None
    eval_stream = make_stream(config, eval_manifest, topology, max_epochs=1) if eval_manifest is not None else None
    _install_stop_signals(progress)
    metrics = MetricsLogger(
        Path(config.train.output_dir),
        topology.is_main,
        config.train.max_steps,
        engine.global_steps,
        config.log.tensorboard,
        config.log.progress,
    )
    run = Run(
        config=config,
        topology=topology,
        model=model,
        model_config=model_config,
        engine=engine,
        stream=stream,
        eval_stream=eval_stream,
        metrics=metrics,
        redraws=redraws,
        projection_seed=projection_seed,
        faults=faults,
        progress=progress,
        last_saved_step=engine.global_steps if resume_tag is not None else -1,
        peak_flops=config.log.peak_flops_per_rank
        or measure_peak_flops(engine.device, _TRAINING_DTYPES[config.precision]),
        micro_batch_flops=flops_per_micro_batch(model, config, stream.config.target_length),
        eval_start=eval_stream.state_dict() if eval_stream is not None else None,
        reported_lost=dict(stream.lost_documents),
    )
    _announce(run, resume_tag, client, convert, parameter_groups)
    return run


def _announce(run: Run, resume_tag: str | None, client: dict | None, convert: bool, parameter_groups: dict) -> None:
    config, metrics, step = run.config, run.metrics, run.engine.global_steps
    if resume_tag is not None:
        resharded = f", resharded from {client['world_size']} to {run.topology.world_size} rank(s)" if convert else ""
        metrics.message(f"resumed from {resume_tag} at step {step}{resharded}")
    parameters = sum(p.numel() for p in run.model.parameters())
    metrics.message(
        f"{config.model.kind} model, {parameters / 1e6:.2f}M parameters, {run.topology.world_size} "
        f"rank(s), ZeRO {config.zero.stage}, {config.precision}"
    )
    metrics.log("event", step, {"parameter_groups": parameter_groups})
    metrics.message(
        "optimizer groups: "
        + "; ".join(
            f"{name} (weight decay {group['weight_decay']:g}): {group['tensors']} tensors, "
            f"{group['parameters']:,} parameters"
            for name, group in parameter_groups.items()
        )
    )
    report_bad_shards(metrics, step, "train", run.stream)
    if run.eval_stream is not None:
        report_bad_shards(metrics, step, "heldout", run.eval_stream)


def _install_stop_signals(progress: Progress) -> None:
    def request_stop(signum, _frame):
        progress.stop_requested.append(signal.Signals(signum).name)

    for name in ("SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), request_stop)


# ------------------------------------------------------------------------------ training


def train(run: Run) -> bool:
    """Step until train.max_steps (True) or a stop request / the time budget (False, saved first)."""
    batches = iter(run.stream)
    run.watchdog = PeerAbortWatchdog(run.topology.rank, run.config.dist.timeout_s, EXIT_FAILED)
    finished = True
    while run.engine.global_steps < run.config.train.max_steps:
        run.watchdog.arm(run.engine.global_steps + 1)  # inside a step; disarmed at its boundary
        if micro_step(run, batches):
            run.watchdog.disarm()
            if not at_boundary(run):
                finished = False
                break
    run.watchdog.disarm()
    if run.last_saved_step != run.engine.global_steps:
        run.save()
    run.finish_saves()
    run.metrics.close()
    barrier()
    return finished


def micro_step(run: Run, batches: Iterator[dict]) -> bool:
    """One forward and backward; True when it completed an optimizer step. A non-finite loss on
    any rank skips the micro-step on every rank (weights untouched) and is counted."""
    engine, config, rank = run.engine, run.config, run.topology.rank
    torch.manual_seed(derive_seed(config.seed, engine.global_steps, engine.micro_steps, rank))
    if run.faults:
        run.faults.before_step(engine.global_steps + 1, rank, engine.micro_steps % config.train.grad_accum == 0)
    waited = time.perf_counter()
    batch = to_device(next(batches), engine.device)
    run.window.wait += time.perf_counter() - waited
    loss = engine(**batch).loss
    run.attempts += 1
    loss = run.faults.corrupt_loss(loss, run.attempts)
    boundary = engine.is_gradient_accumulation_boundary()
    # One small all-reduce per micro-step carries both flags: whether any rank's loss is not
    # finite and, at a step's last micro-step, whether any rank must stop after the step.
    nonfinite, stop = any_rank([not bool(torch.isfinite(loss)), boundary and _wants_to_stop(run)])
    if nonfinite:
        _skip_nonfinite(run)
        return False
    run.stop_after_step = stop
    run.consecutive_nonfinite = 0
    engine.backward(loss)
    if boundary:
        step = engine.global_steps + 1
        if step % config.log.interval == 0 or step == config.train.max_steps:
            run.held = model_state_bytes(engine)  # while weights, gradients and optimizer state are all alive
        run.step_lr = learning_rate(
            step,
            config.optimizer.lr,
            config.schedule.warmup_steps,
            config.train.max_steps,
            config.schedule.min_lr_ratio,
        )
        set_learning_rate(engine.optimizer, run.step_lr)
    engine.step()
    run.window.loss += loss.item()
    run.window.micro += 1
    run.window.tokens += batch_tokens(batch)
    run.progress.samples += batch["input_ids"].shape[0] * run.topology.world_size
    return boundary


def _wants_to_stop(run: Run) -> bool:
    """A stop signal arrived, or the time budget is spent (this rank's view)."""
    budget = run.config.train.time_budget_s
    return bool(run.progress.stop_requested) or (budget is not None and time.monotonic() - run.started_at > budget)


def _skip_nonfinite(run: Run) -> None:
    run.progress.skipped_nonfinite += 1
    run.consecutive_nonfinite += 1
    step = run.engine.global_steps
    run.metrics.log("event", step, {"nonfinite_loss": 1, "skipped_total": run.progress.skipped_nonfinite})
    if run.consecutive_nonfinite >= run.config.train.max_consecutive_nonfinite:
        run.watchdog.disarm()
        if run.last_saved_step != step:
            run.save()
        run.finish_saves()
        raise TooManyNonFinite(
            f"{run.consecutive_nonfinite} non-finite losses in a row at step {step}; the last good weights are "
            "checkpointed. Lower optimizer.lr, raise schedule.warmup_steps, or use precision=bf16 instead of "
            "fp16, then --resume auto"
        )


def at_boundary(run: Run) -> bool:
    """Log, evaluate, checkpoint, stop, then the next step's projection; False when the run stops."""
    config, step = run.config, run.engine.global_steps
    last = step == config.train.max_steps
    run.metrics.advance()
    if step % config.log.interval == 0 or last:
        log_window(run, step)
    if run.eval_stream is not None and (step % config.eval.interval == 0 or last):
        run.metrics.log("eval", step, evaluate(run.engine, run.eval_stream, run.eval_start, config.eval.batches))
    if step % config.checkpoint.interval == 0 or last:
        run.save(background=True)  # finished by the next save, or before the run ends
    if run.stop_after_step and not last:
        if run.last_saved_step != step:
            run.save()
        run.finish_saves()
        reason = ",".join(run.progress.stop_requested) or "time budget"
        run.metrics.message(f"stopping at step {step} ({reason}): checkpoint saved; resume with --resume auto")
        return False
    if run.redraws.changes_after(step) and not last:
        # Last at the boundary: everything above saw the projection this step trained with.
        digest = set_projections_everywhere(
            run.model, run.projection_seed, step + 1, run.redraws, check=run.redraws.redraws_after(step)
        )
        if digest is not None:
            run.metrics.log(
                "event",
                step,
                {"redraw": step, "first_step": step + 1, "mode": run.redraws.mode, "projection_digest": digest},
            )
    return True


def log_window(run: Run, step: int) -> None:
    """The "train" and "memory" records of the log interval ending at ``step``, then a new window."""
    engine, stream, window, progress = run.engine, run.stream, run.window, run.progress
    elapsed = time.perf_counter() - window.started
    new_lost = sum(key not in run.reported_lost for key in stream.lost_documents)
    # One gather per log interval: each rank's mean loss, tokens, whether it lost documents, memory.
    mine = {"loss": window.loss / max(window.micro, 1), "tokens": window.tokens, "new_lost": new_lost}
    ranks = gather_objects({**mine, "memory": memory_of_rank(run.held)})
    world_size = run.topology.world_size
    mean_loss = sum(rank["loss"] for rank in ranks) / world_size
    report_lost_documents(run.metrics, step, stream, run.reported_lost, any(rank["new_lost"] for rank in ranks))
    all_tokens = sum(rank["tokens"] for rank in ranks)
    progress.tokens += all_tokens
    grad_norm = engine.get_global_grad_norm()
    fp16 = run.config.precision == "fp16"
    run.metrics.log(
        "train",
        step,
        {
            "loss": mean_loss,
            "lr": run.step_lr,  # the rate this step used
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "loss_scale": float(getattr(engine.optimizer, "cur_scale", 1.0)) if fp16 else 1.0,
            "tokens_per_s": all_tokens / elapsed,
            "mfu": run.micro_batch_flops * window.micro / elapsed / run.peak_flops,
            "data_wait_fraction": window.wait / elapsed,
            "skipped_steps": progress.skipped_nonfinite + int(getattr(engine, "skipped_steps", 0)),
            "tokens": progress.tokens,
            "data_skipped_shards": len(stream.bad_shards),
            "data_lost_samples": stream.lost_samples - len(stream.lost_documents) + len(run.reported_lost),
            **source_tokens(stream),
        },
    )
    log_memory(run.metrics, step, [rank["memory"] for rank in ranks])
    run.window = MetricsWindow()


def evaluate(engine, stream, start_state: dict, batches: int) -> dict[str, float]:
    """Mean loss over the first `batches` batches of the held-out split (the same every time).

    The eval stream is built (and its shards verified) once; each evaluation rewinds it to
    `start_state`, the beginning of its first epoch.
    """
    stream.load_state_dict(start_state)
    batches = min(batches, stream.steps_per_epoch)
    total, count = 0.0, 0
    engine.eval()
    with torch.no_grad():
        for index, batch in enumerate(stream.iter_epoch()):
            if index >= batches:
                break
            total += float(engine(**to_device(batch, engine.device)).loss)
            count += 1
    engine.train()
    mean_loss = all_mean([total / max(count, 1)])[0]
    return {"loss": mean_loss, "perplexity": float(torch.tensor(mean_loss).exp())}


def memory_of_rank(held: dict[str, int] | None) -> dict[str, int]:
    """This rank's model-state bytes by role (taken after the backward of the logged step, before
    the optimizer step), resident set and peak resident set, and on a GPU its peak allocated bytes."""
    memory = {**(held or {}), "rss_bytes": resident_bytes(), "peak_rss_bytes": peak_resident_bytes()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["device_peak_bytes"] = torch.cuda.max_memory_allocated()
    return memory


def log_memory(metrics: MetricsLogger, step: int, ranks: list[dict[str, int]]) -> None:
    """One "memory" record per log interval: every rank's `memory_of_rank` (gathered with the
    interval's loss and tokens) and the maxima over ranks as scalars."""
    metrics.log(
        "memory",
        step,
        {
            "model_state_bytes": max(r.get("total", 0) for r in ranks),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
            **(
                {"device_peak_bytes": max(r.get("device_peak_bytes", 0) for r in ranks)}
                if "device_peak_bytes" in ranks[0]
                else {}
            ),
            "per_rank": ranks,
        },
    )
