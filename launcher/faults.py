"""Fault injection for reliability tests, off unless PERFORMER_FAULTS is set.

PERFORMER_FAULTS holds faults separated by ";", each ``name@where``:

    nonfinite_loss@3,4,5              the loss of forward attempts 3, 4 and 5 (counted from 1 in this
                                      process, on every rank) becomes NaN
    inf_loss@3                        the same with +Inf
    kill@step=6,rank=1                rank 1 sends itself SIGKILL as it starts optimizer step 6
    hang@step=3,rank=1[,seconds=S]    rank 1 sleeps S seconds (default 3600) as it starts step 3
    slow_save@save=2,rank=1[,seconds=S]
                                      during this process's 2nd checkpoint save, rank 1 sleeps S
                                      seconds (default 3600) after writing its first file (a test
                                      kills it there: a save cut short)
    enospc@save=2[,rank=R]            this process's 2nd checkpoint save fails on rank R (default:
                                      every rank) with ENOSPC at the first file write, after half
                                      of that file's bytes are on disk, as a full disk leaves it

Steps count optimizer steps from 1 (step N is the one that ends with global step N); saves count
checkpoint saves of this process from 1. A malformed spec (unknown fault or key, a missing or
non-integer value) is an error naming the item, raised before the process group is formed. Each
fault goes through the trainer's real path (signals, collectives, DeepSpeed's own file writes),
never a mock; without the variable the trainer's only cost is one truth test per forward.
Every fault that fires prints one ``fault:`` line on stderr first, with the rank, its pid and
time.time(), so tests can time what follows and find the process to kill.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

from performer.errors import InputError

ENVIRONMENT_VARIABLE = "PERFORMER_FAULTS"
DEFAULT_SLEEP_S = 3600.0

# name -> (required keys, optional keys); nonfinite_loss / inf_loss take a plain list instead.
_KEYED = {
    "kill": ({"step", "rank"}, set()),
    "hang": ({"step", "rank"}, {"seconds"}),
    "slow_save": ({"save", "rank"}, {"seconds"}),
    "enospc": ({"save"}, {"rank"}),
}
_LISTED = ("nonfinite_loss", "inf_loss")
_USAGE = (
    "nonfinite_loss@N[,N...], inf_loss@N[,N...], kill@step=N,rank=R, hang@step=N,rank=R[,seconds=S], "
    "slow_save@save=N,rank=R[,seconds=S], enospc@save=N[,rank=R]"
)


class FaultSpecError(InputError, ValueError):
    """PERFORMER_FAULTS cannot be parsed; the message names the item and the accepted forms."""


@dataclass(frozen=True)
class StepFault:
    kind: str  # "kill" or "hang"
    step: int
    rank: int
    seconds: float = DEFAULT_SLEEP_S


@dataclass(frozen=True)
class SaveFault:
    kind: str  # "slow_save" or "enospc"
    save: int
    rank: int | None  # None: every rank
    seconds: float = DEFAULT_SLEEP_S


def _number(item: str, key: str, text: str, kind=int):
    try:
        value = kind(text)
    except ValueError:
        raise FaultSpecError(f"{ENVIRONMENT_VARIABLE}: {item!r}: {key}={text!r} is not a number") from None
    if not (value >= 0 if key == "rank" else value > 0):
        raise FaultSpecError(f"{ENVIRONMENT_VARIABLE}: {item!r}: {key}={text!r} is out of range")
    return value


def _keyed(item: str, name: str, where: str) -> dict[str, str]:
    required, optional = _KEYED[name]
    values: dict[str, str] = {}
    for pair in where.split(","):
        key, equals, value = (part.strip() for part in pair.partition("="))
        if not equals or not value:
            raise FaultSpecError(f"{ENVIRONMENT_VARIABLE}: {item!r}: expected key=value, got {pair!r}; forms: {_USAGE}")
        if key not in required | optional:
            raise FaultSpecError(
                f"{ENVIRONMENT_VARIABLE}: {item!r}: unknown key {key!r} for {name} "
                f"(keys: {', '.join(sorted(required | optional))})"
            )
        if key in values:
            raise FaultSpecError(f"{ENVIRONMENT_VARIABLE}: {item!r}: {key} given twice")
        values[key] = value
    missing = sorted(required - set(values))
    if missing:
        raise FaultSpecError(f"{ENVIRONMENT_VARIABLE}: {item!r}: {name} needs {', '.join(missing)}; forms: {_USAGE}")
    return values


def announce(what: str, rank: int) -> None:
    """The one line a firing fault prints (tests parse it: rank, pid, wall-clock time)."""
    print(f"fault: {what} rank={rank} pid={os.getpid()} time={time.time():.3f}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Faults:
    nonfinite_loss_attempts: frozenset[int] = field(default_factory=frozenset)
    "Forward attempts (1-based, per process) whose loss is replaced by NaN."
    inf_loss_attempts: frozenset[int] = field(default_factory=frozenset)
    "Forward attempts (1-based, per process) whose loss is replaced by +Inf."
    step_faults: tuple[StepFault, ...] = ()
    "kill / hang as a rank starts an optimizer step."
    save_faults: tuple[SaveFault, ...] = ()
    "slow_save / enospc during the N-th checkpoint save of the process."

    def __bool__(self) -> bool:
        return bool(self.nonfinite_loss_attempts or self.inf_loss_attempts or self.step_faults or self.save_faults)

    @classmethod
    def parse(cls, spec: str) -> "Faults":
        nonfinite: set[int] = set()
        infinite: set[int] = set()
        step_faults: list[StepFault] = []
        save_faults: list[SaveFault] = []
        for item in filter(None, (part.strip() for part in spec.split(";"))):
            name, at, where = (part.strip() for part in item.partition("@"))
            if not at or not where:
                raise FaultSpecError(f"{ENVIRONMENT_VARIABLE}: {item!r} has no '@where'; forms: {_USAGE}")
            if name in _LISTED:
                attempts = {_number(item, "attempt", n.strip()) for n in where.split(",")}
                (nonfinite if name == "nonfinite_loss" else infinite).update(attempts)
            elif name in ("kill", "hang"):
                values = _keyed(item, name, where)
                step_faults.append(
                    StepFault(
                        name,
                        _number(item, "step", values["step"]),
                        _number(item, "rank", values["rank"]),
                        _number(item, "seconds", values.get("seconds", str(DEFAULT_SLEEP_S)), float),
                    )
                )
            elif name in ("slow_save", "enospc"):
                values = _keyed(item, name, where)
                rank = _number(item, "rank", values["rank"]) if "rank" in values else None
                save_faults.append(
                    SaveFault(
                        name,
                        _number(item, "save", values["save"]),
                        rank,
                        _number(item, "seconds", values.get("seconds", str(DEFAULT_SLEEP_S)), float),
                    )
                )
            else:
                raise FaultSpecError(f"{ENVIRONMENT_VARIABLE}: unknown fault {name!r} in {item!r}; forms: {_USAGE}")
        return cls(frozenset(nonfinite), frozenset(infinite), tuple(step_faults), tuple(save_faults))

    @classmethod
    def from_environment(cls, environ=None) -> "Faults":
        return cls.parse((os.environ if environ is None else environ).get(ENVIRONMENT_VARIABLE, ""))

    # --- hooks the trainer calls -------------------------------------------------------------
    def corrupt_loss(self, loss: torch.Tensor, attempt: int) -> torch.Tensor:
        if attempt in self.nonfinite_loss_attempts:
            return loss * float("nan")
        if attempt in self.inf_loss_attempts:
            return loss + float("inf")
        return loss

    def before_step(self, step: int, rank: int, first_micro: bool) -> None:
        """Called before each forward; `step` is the optimizer step it belongs to (from 1)."""
        if not first_micro:
            return
        for fault in self.step_faults:
            if fault.step == step and fault.rank == rank:
                announce(f"{fault.kind} at step {step}", rank)
                if fault.kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(fault.seconds)

    def instrument_saves(self, engine, rank: int) -> None:
        """Count this process's checkpoint saves and act on the file writes of the faulty one.

        Wraps the engine's save_checkpoint (to count) and its checkpoint engine's save (every file
        DeepSpeed writes goes through it), so the fault lands inside DeepSpeed's real save.
        """
        mine = [f for f in self.save_faults if f.rank is None or f.rank == rank]
        if not mine:
            return
        count = {"saves": 0, "writes": 0}
        save_checkpoint, write = engine.save_checkpoint, engine.checkpoint_engine.save

        def counted_save_checkpoint(*args, **kwargs):
            count["saves"] += 1
            count["writes"] = 0
            return save_checkpoint(*args, **kwargs)

        def faulty_write(state_dict, path):
            count["writes"] += 1
            for fault in mine:
                if fault.save != count["saves"] or count["writes"] != 1:
                    continue
                if fault.kind == "enospc":
                    announce(f"enospc at save {fault.save} writing {os.path.basename(path)}", rank)
                    write(state_dict, path)
                    with open(path, "r+b") as handle:  # what a full disk leaves: a torn file
                        handle.truncate(os.path.getsize(path) // 2)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                write(state_dict, path)
                announce(f"slow_save at save {fault.save} after writing {os.path.basename(path)}", rank)
                time.sleep(fault.seconds)
                return None
            return write(state_dict, path)

        engine.save_checkpoint = counted_save_checkpoint
        engine.checkpoint_engine.save = faulty_write
