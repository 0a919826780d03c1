"""Pretrain an encoder-decoder (or decoder-only) Performer with DeepSpeed.

    deepspeed --num_gpus N --module launcher.pretrain --config configs/tiny.yaml [--config overlay.yaml]
              [--set train.max_steps=50 log.interval=5] [--resume auto|TAG]
    python -m launcher.pretrain ...        (one process)        performer pretrain ...   (the same)

The recipe, top to bottom: config -> inputs checked (manifests, tokenizer: check_inputs) ->
process group (timeouts first) -> model -> DeepSpeed engine
-> projection seed from rank 0 -> data stream -> resume -> loop (forward, non-finite check,
backward, step; at optimizer-step boundaries: log, eval, checkpoint, then redraw for the next
step, so evaluations, checkpoints and exports carry the projection the weights trained with)
-> final save.
Exit codes: 0 done, 1 failed (a rank died or hung past dist.timeout_s, a checkpoint could not
be written), 2 bad input (config, data, tokenizer, checkpoint, PERFORMER_FAULTS: one line, the
same on every rank), 3 too many non-finite losses,
75 stopped early by a signal or the time budget after saving (requeue and resume with
--resume auto).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from launcher import checkpoint
from launcher.config import ConfigError, RunConfig, load_config, save_config
from launcher.dist import (
    PeerAbortWatchdog,
    Topology,
    all_agree,
    all_mean,
    barrier,
    broadcast_int,
    gather_objects,
    init_distributed,
    post_abort,
    shutdown,
)
from launcher.ds_config import build_deepspeed_config
from launcher.errors import launched_rank, report
from launcher.faults import Faults
from launcher.memory import model_state_bytes, peak_resident_bytes, resident_bytes
from launcher.metrics import MetricsLogger, measure_peak_flops
from launcher.schedule import learning_rate, set_learning_rate
from performer.errors import InputError
from performer.redraw import RedrawSchedule

EXIT_FAILED = 1
# 2, a bad input, is launcher.errors.EXIT_BAD_INPUT: the same for every command
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", required=True, metavar="YAML",
                        help="config file; repeat to layer overlays (later files win)")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. --set train.max_steps=50 zero.stage=2")
    parser.add_argument("--resume", default=None, metavar="auto|TAG",
                        help="auto: newest complete checkpoint (fresh start if none); TAG: that one or an error")
    parser.add_argument("--reshard", action="store_true",
                        help="with --resume: continue a ZeRO-1/2 checkpoint saved on another number of ranks "
                             "(converted to DeepSpeed's universal format; keep the global batch)")
    # The deepspeed launcher appends --local_rank; the rank comes from the environment anyway.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # fmt: skip


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("pretrain", help="pretrain with DeepSpeed (see launcher/pretrain.py)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=lambda args: exit_without_teardown(run(args.config, args.set, args.resume, args.reshard)))


class TooManyNonFinite(RuntimeError):
    pass


@dataclass
class Progress:
    """What a checkpoint must carry besides the engine's own state."""

    samples: int = 0
    tokens: int = 0
    skipped_nonfinite: int = 0
    stop_requested: list = field(default_factory=list)


# ------------------------------------------------------------------------------ building blocks


def build_model_config(config: RunConfig, special):
    from performer.config import preset

    section = config.model
    return preset(
        section.preset,
        **{
            "vocab_size": special.vocab_size,
            "pad_id": special.pad_id,
            "attention_type": section.attention_type,
            "nb_features": section.nb_features,
            "feature_map": section.feature_map,
            "dropout": section.dropout,
            # The trainer redraws at optimizer steps on every rank; the model never does on its own.
            "feature_redraw_interval": None,
            "auto_check_redraw": False,
            "gradient_checkpointing": section.activation_checkpointing,
            "projection_seed": config.seed,
            **section.overrides,
            # Every target row of the stream starts with bos (data/stream.py): generate() must too.
            "decoder_start_id": special.bos_id,
        },
    )


def build_engine(config: RunConfig, model, world_size: int, load_universal: bool = False):
    """The DeepSpeed engine over ``model``: the JSON from ``ds_config``, AdamW over the weight-decay
    groups (matrices decay; norms, biases and embeddings do not). Returns the engine and the groups'
    description for the start-up log."""
    import deepspeed

    from performer.optim import describe_groups, weight_decay_groups

    ds_config = build_deepspeed_config(config, world_size)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    groups = weight_decay_groups(model, config.optimizer.weight_decay, config.optimizer.no_decay)
    described = describe_groups(groups)  # before ZeRO replaces the groups' tensors by flat partitions
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    return engine, described


def eval_manifest_path(config: RunConfig) -> Path | None:
    if config.data.eval_manifest is not None:
        return Path(config.data.eval_manifest)
    train = Path(config.data.manifest)
    train_dir = train.parent if train.name.endswith(".json") else train
    candidate = train_dir.parent / "heldout"
    return candidate if (candidate / "manifest.json").is_file() else None


def make_stream(config: RunConfig, manifest: Path, topology: Topology, max_epochs=None):
    """The rank's stream; every rank leaves out the shards that any rank found damaged."""
    from data.stream import DataError, StreamConfig, TokenStream

    data = config.data
    stream_config = StreamConfig(
        manifest=str(manifest), objective=data.objective, input_length=data.input_length,
        batch_size=config.train.micro_batch_size, seed=config.seed, num_workers=data.num_workers,
        shuffle_buffer=data.shuffle_buffer, verify_sha256=data.verify_sha256,
        allow_pipe=data.allow_pipe, allow_remote=data.allow_remote,
        allow_shell_characters=data.allow_shell_characters, max_epochs=max_epochs,
    )  # fmt: skip
    try:
        stream = TokenStream(stream_config, rank=topology.rank, world_size=topology.world_size)
        # Each rank verified the files itself: one that changed in between must not give the ranks
        # different epochs (different step counts hang the collectives). One gather, at start-up.
        found = gather_objects(stream.bad_shards)
        union = {path: reason for share in found for path, reason in share.items()}
        if any(share.keys() != union.keys() for share in found):
            stream.exclude_shards(union)
    except DataError as error:
        raise ConfigError(f"data: {error}") from error
    return stream


def report_bad_shards(metrics: MetricsLogger, step: int, split: str, stream) -> None:
    """One event per skipped shard (name, reason, samples lost), in metrics.jsonl and on the console."""
    samples = {shard.path: shard.samples for shard in stream.manifest.shards}
    for path, reason in sorted(stream.bad_shards.items()):
        metrics.log("event", step, {"data_bad_shard": path, "split": split, "reason": reason,
                                    "samples_lost": samples[path]})  # fmt: skip
        metrics.message(f"data: skipping {split} shard {path} ({samples[path]} samples lost): {reason}")


def report_lost_documents(metrics: MetricsLogger, step: int, stream, reported: dict, new_anywhere: bool) -> None:
    """Gather the documents the ranks found unreadable since the last report (only when one did:
    the count rides on the log interval's all-reduce) and log each once; `reported` stays the same
    on every rank."""
    if not new_anywhere:
        return
    mine = {key: reason for key, reason in stream.lost_documents.items() if key not in reported}
    for share in gather_objects(mine):
        for (path, member), reason in sorted(share.items()):
            if (path, member) not in reported:
                reported[(path, member)] = reason
                metrics.log("event", step, {"data_lost_document": path, "member": member, "reason": reason})
                metrics.message(f"data: shard {path} document {member} unreadable ({reason}); replaced by the "
                                "documents after it")  # fmt: skip


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens the model read and predicted in this batch."""
    count = int(batch["attention_mask"].sum())
    if "decoder_input_ids" in batch:
        count += int((batch["labels"] != -100).sum())
    return count


def flops_per_micro_batch(model, config: RunConfig, target_length: int) -> float:
    """Counted training FLOPs: 6 x (parameters a token passes through) per token, attention excluded.

    Encoder tokens pass the encoder; decoder tokens the decoder and the vocabulary projection.
    """
    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    batch = config.train.micro_batch_size
    model_config = model.config
    head = model_config.d_model * model_config.vocab_size
    decoder_tokens = batch * target_length
    flops = (count(model.decoder) + head) * decoder_tokens
    if hasattr(model, "encoder"):
        flops += count(model.encoder) * batch * config.data.input_length
    return 6.0 * flops


def projection_digest(model) -> str:
    """sha256 over every FAVOR+ projection, in module order."""
    digest = hashlib.sha256()
    for attention in model.favor_attentions():
        digest.update(attention.projection.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def set_projections_everywhere(model, seed: int, step: int, redraws: RedrawSchedule, check: bool) -> str | None:
    """Every rank takes the projections step ``step`` trains with; with ``check``, the ranks then
    prove they agree (an all-gather of digests) and the digest is returned."""
    model.set_projections_for_step_(seed, step, redraws)
    if not check:
        return None
    digest = projection_digest(model)
    digests = gather_objects(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"FAVOR+ projections differ between ranks for step {step}: {digests}")
    return digest


def projection_record(model, redraws: RedrawSchedule, step: int) -> dict | None:
    """The projection in force after ``step`` optimizer steps, for checkpoints and exports: base
    seed, the draw (smooth redraws: the blend of two draws), and the steps that trained with it
    (None when no step has yet)."""
    state = model.projection_state()
    if state is None:
        return None
    first, second, weight = redraws.blend_for_step(max(step, 1))
    trained = redraws.trained_steps(step)
    record = {"base_seed": state[0], "draw": first, "trained_steps": list(trained) if trained else None}
    if weight:
        record.update(next_draw=second, blend_weight=weight)
    return record


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
            total += float(engine(**_to_device(batch, engine.device)).loss)
            count += 1
    engine.train()
    mean_loss = all_mean([total / max(count, 1)])[0]
    return {"loss": mean_loss, "perplexity": float(torch.tensor(mean_loss).exp())}


def log_memory(metrics: MetricsLogger, step: int, held: dict[str, int] | None) -> None:
    """One "memory" record per log interval: each rank's model-state bytes by role (taken after the
    backward of this step, before the optimizer step), resident set and peak resident set; the
    maxima over ranks as scalars. One gather of a few integers per rank."""
    mine = {**(held or {}), "rss_bytes": resident_bytes(), "peak_rss_bytes": peak_resident_bytes()}
    ranks = gather_objects(mine)
    metrics.log("memory", step, {
        "model_state_bytes": max(r.get("total", 0) for r in ranks),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
        "per_rank": ranks,
    })  # fmt: skip


def _to_device(batch: dict, device) -> dict:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def _install_stop_signals(progress: Progress) -> None:
    def request_stop(signum, _frame):
        progress.stop_requested.append(signal.Signals(signum).name)

    for name in ("SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), request_stop)


# ------------------------------------------------------------------------------ the recipe


def run(config_paths: list[str], overrides: list[str], resume: str | None, reshard: bool = False) -> int:
    """The whole job on this rank; returns its exit code (the table in the module docstring)."""
    try:
        config = load_config(config_paths, overrides)
        faults = Faults.from_environment()
        check_inputs(config, resume, reshard)
    except InputError as error:  # every rank checks the same files, so every rank stops alike
        return report(error, launched_rank())
    topology = init_distributed(config.dist.timeout_s)
    try:
        return train(config, topology, resume, faults, reshard)
    except InputError as error:  # a checkpoint that cannot continue the run, damaged data, the batch triad
        return report(error, topology.rank if topology.world_size > 1 else None)
    except TooManyNonFinite as error:
        print(f"[rank {topology.rank}] error: {error}", file=sys.stderr)
        return EXIT_NONFINITE
    except checkpoint.CheckpointSaveError as error:
        print(f"[rank {topology.rank}] error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except RuntimeError as error:
        explanation = explain_collective_failure(error, config.dist.timeout_s)
        # The first clause ("a collective waited longer than dist.timeout_s=60 s for another rank").
        post_abort(topology.rank, re.split(r"[:;]", explanation)[0] if explanation else f"{type(error).__name__}")
        if explanation is None:
            raise
        print(f"[rank {topology.rank}] error: {explanation}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except Exception as error:
        post_abort(topology.rank, type(error).__name__)  # a peer hung mid-step must not outlive this rank
        raise
    finally:
        shutdown()


def check_inputs(config: RunConfig, resume: str | None, reshard: bool) -> None:
    """Check, before the process group forms and anything is written, what the run reads and can
    be checked alone: the options, train.output_dir, the training and held-out manifests, and the
    tokenizer beside the shards (it must load and be the one the manifest pins, or `performer
    export` fails at the end of the run). An InputError names the input and the fix."""
    from data.shards import Manifest

    if reshard and resume is None:
        raise InputError("--reshard converts the checkpoint being resumed; add --resume auto (or a tag)")
    output_dir = Path(config.train.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"train.output_dir={output_dir} is not a directory; choose another train.output_dir")
    Manifest.load(config.data.manifest).tokenizer()
    eval_manifest = eval_manifest_path(config) if config.eval.interval else None
    if eval_manifest is not None:
        Manifest.load(eval_manifest)


def explain_collective_failure(error: RuntimeError, timeout_s: float) -> str | None:
    """What a failed collective means for the job, or None when `error` is something else.

    gloo and NCCL report a peer that stopped answering as a timeout, and a dead peer as a closed
    or reset connection; the raw messages name neither the cause nor the knob.
    """
    text = str(error)
    lowered = text.lower()
    if "timed out" in lowered or "timeout" in lowered:
        return (f"a collective waited longer than dist.timeout_s={timeout_s:g} s for another rank: a rank is hung "
                f"(or far slower than the others), so the job stops instead of waiting. Find the hung rank "
                f"(py-spy dump, its log); if steps or saves legitimately take longer, raise dist.timeout_s. "
                f"({text.splitlines()[0][:300]})")  # fmt: skip
    if any(word in lowered for word in ("connection closed", "connection reset", "broken pipe", "peer")):
        return (f"another rank died (its connection closed) during a collective; see that rank's error above or "
                f"the launcher's exit status, then rerun with --resume auto ({text.splitlines()[0][:300]})")
    return None


def train(config: RunConfig, topology: Topology, resume: str | None, faults: Faults | None = None,
          reshard: bool = False) -> int:
    from data.shards import Manifest
    from performer.feature_maps import derive_seed
    from performer.models import build_model

    output_dir = Path(config.train.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    resume_tag = checkpoint.resolve_resume_tag(checkpoint_dir, resume, topology)
    load_dir = checkpoint_dir
    convert = resume_tag is not None and checkpoint.check_compatible(checkpoint_dir / resume_tag, config, topology,
                                                                      reshard)  # fmt: skip
    if convert:
        load_dir = checkpoint.convert_to_universal(checkpoint_dir, resume_tag, topology)

    manifest = Manifest.load(config.data.manifest)
    model_config = build_model_config(config, manifest.special)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = build_model(config.model.kind, model_config)
    engine, parameter_groups = build_engine(config, model, topology.world_size, load_universal=convert)
    faults = faults if faults is not None else Faults()
    faults.instrument_saves(engine, topology.rank)

    # One integer decides every projection: drawn on rank 0, broadcast, stored in checkpoints.
    projection_seed = broadcast_int(derive_seed(config.seed, 0x5EED) if topology.is_main else 0)
    progress = Progress()
    stream = make_stream(config, Path(config.data.manifest), topology)
    if resume_tag is not None:
        client = checkpoint.load(engine, load_dir, resume_tag)
        if convert:
            checkpoint.remove_universal(checkpoint_dir, topology)
        stream.load_state_dict(client["data"])
        for path, member, reason in client.get("data_lost_documents", []):
            stream.lost_documents[(path, member)] = reason
        projection_seed = int(client["projection_seed"])
        progress = Progress(samples=client["samples"], tokens=client["tokens"],
                            skipped_nonfinite=client["skipped_nonfinite"])  # fmt: skip
    redraws = RedrawSchedule(config.model.redraw_interval, config.model.redraw_mode)
    # The draw the next step trains with (a function of (seed, step): resuming restores it exactly).
    set_projections_everywhere(model, projection_seed, engine.global_steps + 1, redraws, check=True)
    if topology.is_main:
        save_config(config, output_dir / "config.yaml")
        (output_dir / "model_config.json").write_text(json.dumps(model_config.to_dict(), indent=2) + "\n")
    eval_manifest = eval_manifest_path(config) if config.eval.interval else None
    eval_stream = make_stream(config, eval_manifest, topology, max_epochs=1) if eval_manifest is not None else None
    eval_start = eval_stream.state_dict() if eval_stream is not None else None
    _install_stop_signals(progress)

    start_step = engine.global_steps
    metrics = MetricsLogger(output_dir, topology.is_main, config.train.max_steps, start_step,
                            config.log.tensorboard, config.log.progress)  # fmt: skip
    peak_flops = config.log.peak_flops_per_rank or measure_peak_flops()
    parameter_count = sum(p.numel() for p in model.parameters())
    micro_batch_flops = flops_per_micro_batch(model, config, stream.config.target_length)
    if resume_tag is not None:
        resharded = f", resharded from {client['world_size']} to {topology.world_size} rank(s)" if convert else ""
        metrics.message(f"resumed from {resume_tag} at step {start_step}{resharded}")
    metrics.message(f"{config.model.kind} model, {parameter_count / 1e6:.2f}M parameters, "
                    f"{topology.world_size} rank(s), ZeRO {config.zero.stage}, {config.precision}")  # fmt: skip
    metrics.log("event", start_step, {"parameter_groups": parameter_groups})
    metrics.message("optimizer groups: " + "; ".join(
        f"{name} (weight decay {group['weight_decay']:g}): {group['tensors']} tensors, {group['parameters']:,} parameters"
        for name, group in parameter_groups.items()))  # fmt: skip
    report_bad_shards(metrics, start_step, "train", stream)
    if eval_stream is not None:
        report_bad_shards(metrics, start_step, "heldout", eval_stream)
    reported_lost = dict(stream.lost_documents)  # (shard, member) -> reason, the same on every rank

    def client_state() -> dict:
        return {
            "step": engine.global_steps, "samples": progress.samples, "tokens": progress.tokens,
            "skipped_nonfinite": progress.skipped_nonfinite, "data": stream.state_dict(),
            "projection_seed": projection_seed, "projection": projection_record(model, redraws, engine.global_steps),
            "config_fingerprint": config.fingerprint(),
            "model_config": model_config.to_dict(), "run_config": config.to_dict(),
            "world_size": topology.world_size,
            "data_lost_documents": [[path, member, reason] for (path, member), reason in sorted(reported_lost.items())],
        }  # fmt: skip

    def save() -> str:
        return checkpoint.save(engine, checkpoint_dir, engine.global_steps, client_state(), topology,
                               config.checkpoint.keep, config)  # fmt: skip

    batches = iter(stream)
    attempt = 0
    window = {"loss": 0.0, "micro": 0, "tokens": 0, "wait": 0.0, "started": time.perf_counter()}
    consecutive_nonfinite = 0
    last_saved_step = start_step if resume_tag is not None else -1
    exit_code = 0
    started_at = time.monotonic()
    held = None  # model-state bytes of the step being logged
    watchdog = PeerAbortWatchdog(topology.rank, config.dist.timeout_s, EXIT_FAILED)
    while engine.global_steps < config.train.max_steps:
        watchdog.arm(engine.global_steps + 1)  # inside a step; disarmed at its boundary
        # Per-step randomness (dropout) is a function of (seed, step, rank): nothing to save.
        torch.manual_seed(derive_seed(config.seed, engine.global_steps, engine.micro_steps, topology.rank))
        if faults:
            first_micro = engine.micro_steps % config.train.grad_accum == 0
            faults.before_step(engine.global_steps + 1, topology.rank, first_micro)
        waited = time.perf_counter()
        batch = _to_device(next(batches), engine.device)
        window["wait"] += time.perf_counter() - waited
        loss = engine(**batch).loss
        attempt += 1
        loss = faults.corrupt_loss(loss, attempt)
        if not all_agree(bool(torch.isfinite(loss)), op=torch.distributed.ReduceOp.MIN):
            # Skipped on every rank alike: no backward, no step, weights untouched.
            progress.skipped_nonfinite += 1
            consecutive_nonfinite += 1
            metrics.log("event", engine.global_steps, {"nonfinite_loss": 1, "skipped_total": progress.skipped_nonfinite})
            if consecutive_nonfinite >= config.train.max_consecutive_nonfinite:
                watchdog.disarm()
                if last_saved_step != engine.global_steps:
                    save()
                raise TooManyNonFinite(
                    f"{consecutive_nonfinite} non-finite losses in a row at step {engine.global_steps}; the last "
                    "good weights are checkpointed. Lower optimizer.lr, raise schedule.warmup_steps, or use "
                    "precision=bf16 instead of fp16, then --resume auto"
                )
            continue
        consecutive_nonfinite = 0
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)
        if boundary and ((engine.global_steps + 1) % config.log.interval == 0
                         or engine.global_steps + 1 == config.train.max_steps):
            # Before the step, while weights, gradients and optimizer state are all alive.
            held = model_state_bytes(engine)
        if boundary:
            step_lr = learning_rate(engine.global_steps + 1, config.optimizer.lr, config.schedule.warmup_steps,
                                    config.train.max_steps, config.schedule.min_lr_ratio)  # fmt: skip
            set_learning_rate(engine.optimizer, step_lr)
        engine.step()
        window["loss"] += loss.item()
        window["micro"] += 1
        window["tokens"] += batch_tokens(batch)
        progress.samples += batch["input_ids"].shape[0] * topology.world_size
        if not boundary:
            continue

        watchdog.disarm()
        step = engine.global_steps
        metrics.advance()
        if step % config.log.interval == 0 or step == config.train.max_steps:
            elapsed = time.perf_counter() - window["started"]
            new_lost = sum(key not in reported_lost for key in stream.lost_documents)
            mean_loss, tokens, new_lost = all_mean([window["loss"] / max(window["micro"], 1), window["tokens"], new_lost])
            report_lost_documents(metrics, step, stream, reported_lost, new_lost > 0)
            tokens_per_s = tokens * topology.world_size / elapsed
            progress.tokens += int(tokens * topology.world_size)
            grad_norm = engine.get_global_grad_norm()
            metrics.log("train", step, {
                "loss": mean_loss,
                "lr": step_lr,  # the rate this step used
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "loss_scale": float(getattr(engine.optimizer, "cur_scale", 1.0)) if config.precision == "fp16" else 1.0,
                "tokens_per_s": tokens_per_s,
                "mfu": micro_batch_flops * window["micro"] / elapsed / peak_flops,
                "data_wait_fraction": window["wait"] / elapsed,
                "skipped_steps": progress.skipped_nonfinite + int(getattr(engine, "skipped_steps", 0)),
                "tokens": progress.tokens,
                "data_skipped_shards": len(stream.bad_shards),
                "data_lost_samples": stream.lost_samples - len(stream.lost_documents) + len(reported_lost),
            })  # fmt: skip
            log_memory(metrics, step, held)
            window = {"loss": 0.0, "micro": 0, "tokens": 0, "wait": 0.0, "started": time.perf_counter()}
        if eval_stream is not None and (
            step % config.eval.interval == 0 or step == config.train.max_steps
        ):
            metrics.log("eval", step, evaluate(engine, eval_stream, eval_start, config.eval.batches))
        if step % config.checkpoint.interval == 0 or step == config.train.max_steps:
            save()
            last_saved_step = step
        over_budget = config.train.time_budget_s is not None and time.monotonic() - started_at > config.train.time_budget_s
        if all_agree(bool(progress.stop_requested) or over_budget) and step < config.train.max_steps:
            if last_saved_step != step:
                save()
                last_saved_step = step
            reason = ",".join(progress.stop_requested) or "time budget"
            metrics.message(f"stopping at step {step} ({reason}): checkpoint saved; resume with --resume auto")
            exit_code = EXIT_PREEMPTED
            break
        if redraws.changes_after(step) and step < config.train.max_steps:
            # Last at the boundary: everything above saw the projection this step trained with.
            digest = set_projections_everywhere(model, projection_seed, step + 1, redraws,
                                                check=redraws.redraws_after(step))  # fmt: skip
            if digest is not None:
                metrics.log("event", step, {"redraw": step, "first_step": step + 1, "mode": redraws.mode,
                                            "projection_digest": digest})
    watchdog.disarm()
    if last_saved_step != engine.global_steps:
        save()
    metrics.close()
    barrier()
    return exit_code


def exit_without_teardown(code: int) -> int:
    """End the process now that everything is saved, flushed and closed.

    Even after the process group is destroyed, about one 2-rank job in ten aborted during
    interpreter teardown ("terminate called without an active exception", exit -6) from a
    C++ thread still joinable in static destructors, turning a finished run into a failure.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # under mpirun, a rank that exits without it counts as a crash
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args.config, args.set, args.resume, args.reshard)


if __name__ == "__main__":
    exit_without_teardown(main())
