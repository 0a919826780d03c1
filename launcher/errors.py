"""How every entry point ends on a bad input: one line, exit code 2; anything else stays a traceback.

    performer <command> ...          launcher/__main__.py: run_command(args.func, args)
    python -m launcher <command> ... the same
    python -m launcher.pretrain ...  launcher/pretrain.py: report(error, rank) in its own exit-code table

A bad input is a `performer.errors.InputError` (ConfigError, DataError, CheckpointError,
ExportError, ...): its message names the input, the problem and the fix, so a traceback would
only hide it. It is printed as ``error: <message>`` on stderr, one line, ``[rank N] error: ...``
in a job of several ranks, and the process exits 2. Any other exception is a bug and keeps its
traceback. PERFORMER_DEBUG=1 prints the traceback of bad inputs too (the exit code stays 2).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from performer.errors import InputError

# The exit codes of every command (the trainer uses all of them).
EXIT_FAILED = 1  # a rank died or hung past dist.timeout_s, a checkpoint could not be written
EXIT_BAD_INPUT = 2  # one line naming the input, the problem and the fix
EXIT_NONFINITE = 3  # too many non-finite losses in a row (the last good weights are saved)
EXIT_PREEMPTED = 75  # stopped early by a signal or the time budget, after saving: requeue with --resume auto
DEBUG_VARIABLE = "PERFORMER_DEBUG"

# (rank, world size) variables of the launchers launcher.dist knows, in its order of precedence.
_RANK_VARIABLES = (
    ("RANK", "WORLD_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE"),
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"),
)


def launched_rank(environ=None) -> int | None:
    """This process's rank when a launcher started several, else None (read only: joins nothing)."""
    environ = os.environ if environ is None else environ
    for rank, size in _RANK_VARIABLES:
        if rank in environ and size in environ:
            return int(environ[rank]) if int(environ[size]) > 1 else None
    return None


def report(error: InputError, rank: int | None = None) -> int:
    """Print the bad input as one line (and, under PERFORMER_DEBUG=1, its traceback first); return 2."""
    if os.environ.get(DEBUG_VARIABLE) == "1":
        traceback.print_exception(error)
    prefix = f"[rank {rank}] " if rank is not None else ""
    # One write: the ranks of a job often share one stream, and print() writes the newline apart.
    sys.stderr.write(f"{prefix}error: {' '.join(str(error).split())}\n")
    sys.stderr.flush()
    return EXIT_BAD_INPUT


def run_command(function: Callable[..., int | None], *args, rank: int | None = None) -> int:
    """``function(*args)``'s exit code; a bad input is reported (`report`) and gives 2."""
    try:
        return int(function(*args) or 0)
    except InputError as error:
        return report(error, rank if rank is not None else launched_rank())
