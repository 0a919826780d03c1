"""Pretrain an encoder-decoder (or decoder-only) Performer with DeepSpeed.

    deepspeed --num_gpus N --module launcher.pretrain --config configs/tiny.yaml [--config overlay.yaml]
              [--set train.max_steps=50 log.interval=5] [--resume auto|TAG]
    python -m launcher.pretrain ...        (one process)        performer pretrain ...   (the same)

The command, top to bottom: config -> inputs checked (manifests, tokenizer: check_inputs) ->
process group (timeouts first) -> the run built (launcher/trainer.py: resume point, model,
DeepSpeed engine, projection seed from rank 0, streams, metrics) -> steps until train.max_steps
or a stop (at optimizer-step boundaries: log, eval, checkpoint, then the next step's projection,
so evaluations, checkpoints and exports carry the projection the weights trained with) -> final
save; errors become exit codes here.
Exit codes: 0 done, 1 failed (a rank died or hung past dist.timeout_s, a checkpoint could not
be written), 2 bad input (config, data, tokenizer, checkpoint, PERFORMER_FAULTS: one line, the
same on every rank), 3 too many non-finite losses,
75 stopped early by a signal or the time budget after saving (requeue and resume with
--resume auto).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from launcher import checkpoint
from launcher.config import ConfigError, RunConfig, load_config
from launcher.dist import init_distributed, post_abort, shutdown
from launcher.errors import EXIT_FAILED, EXIT_NONFINITE, EXIT_PREEMPTED, launched_rank, report
from launcher.faults import Faults
from launcher.streams import eval_manifest_path
from launcher.trainer import TooManyNonFinite, build_run, train
from performer.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="YAML",
        help="config file; repeat to layer overlays (later files win)",
    )
    parser.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. --set train.max_steps=50 zero.stage=2",
    )
    parser.add_argument(
        "--resume",
        default=None,
        metavar="auto|TAG",
        help="auto: newest complete checkpoint (fresh start if none); TAG: that one or an error",
    )
    parser.add_argument(
        "--reshard",
        action="store_true",
        help="with --resume: continue a ZeRO-1/2 checkpoint saved on another number of ranks "
        "(converted to DeepSpeed's universal format; keep the global batch)",
    )
    # The deepspeed launcher appends --local_rank; the rank comes from the environment anyway.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain with DeepSpeed (see launcher/pretrain.py)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=lambda args: exit_without_teardown(run(args.config, args.set, args.resume, args.reshard)))


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
        return 0 if train(build_run(config, topology, resume, faults, reshard)) else EXIT_PREEMPTED
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
    Manifest.load(config.data.train_manifest).tokenizer()
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
        return (
            f"a collective waited longer than dist.timeout_s={timeout_s:g} s for another rank: a rank is hung "
            f"(or far slower than the others), so the job stops instead of waiting. Find the hung rank "
            f"(py-spy dump, its log); if steps or saves legitimately take longer, raise dist.timeout_s. "
            f"({text.splitlines()[0][:300]})"
        )
    if any(word in lowered for word in ("connection closed", "connection reset", "broken pipe", "peer")):
        return (
            f"another rank died (its connection closed) during a collective; see that rank's error above or "
            f"the launcher's exit status, then rerun with --resume auto ({text.splitlines()[0][:300]})"
        )
    return None


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
    parser = argparse.ArgumentParser(
        prog="launcher.pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args.config, args.set, args.resume, args.reshard)


if __name__ == "__main__":
    exit_without_teardown(main())
