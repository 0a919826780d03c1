"""Checkpoints we can trust: DeepSpeed writes the shards, we own the commit.

Layout under ``<output_dir>/checkpoints``::

    step00000050/           engine.save_checkpoint(tag=...) output, one file set per rank
    step00000050/COMPLETE   written by rank 0 after every rank has finished writing
    latest                  the newest complete tag, replaced atomically after COMPLETE

DeepSpeed's own ``latest`` is written by rank 0 before other ranks finish, and a missing one makes
``load_checkpoint`` silently start from step 0. Here ``--resume auto`` takes the newest tag that
has COMPLETE (whatever ``latest`` says), an explicit tag that is missing or incomplete is an
error, and retention deletes only older complete tags after a newer one is committed.

Integrity: the COMPLETE marker records the size and XXH3-128 digest of every file of the tag
(sha256 in markers written before; both verify), hashed as
DeepSpeed writes it (launcher/hashed_writes.py; a file written another way is read back, the
reading dealt round-robin over the ranks). Before anything is unpickled, the files are
checked against it: ``--resume auto`` skips a tag that fails (a torn or corrupted file, a file
swapped or added) and falls back to the previous complete one, saying so; an explicit tag that
fails is an error naming the file; if complete tags exist but none verifies, that is an error
too, never a silent restart from step 0. This guards against corruption and swapped files, not
against someone who can also rewrite the marker: DeepSpeed checkpoints are pickles, so resume
only from directories you trust. Exports are safetensors (``performer export``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from launcher.config import NON_SHAPE_MODEL_FIELDS, ConfigError, RunConfig, config_from_dict
from launcher.dist import Topology, barrier, gather_objects
from launcher.hashed_writes import DIGEST, new_hash, take_written_digests
from performer.errors import InputError

COMPLETE_MARKER = "COMPLETE"
POINTER = "latest"
TAG_PATTERN = re.compile(r"^step(\d{8})$")


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be used, with what to do about it."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); the previous one is untouched."""


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(directory: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not directory.is_dir():
        return []
    tags = [p.name for p in directory.iterdir() if TAG_PATTERN.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return sorted(tags, key=lambda tag: int(TAG_PATTERN.match(tag).group(1)))


def _file_digest(path: Path, algorithm: str = DIGEST) -> dict[str, Any]:
    digest = new_hash(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 23), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, algorithm: digest.hexdigest()}


def _tag_files(tag_directory: Path) -> list[str]:
    return sorted(
        p.relative_to(tag_directory).as_posix()
        for p in tag_directory.rglob("*")
        if p.is_file() and p.name != COMPLETE_MARKER
    )


def file_digests(
    tag_directory: Path, topology: Topology, known: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Size and digest of every file of a tag: ``known`` ones (hashed as they were written, the same
    on every rank) as given, the others read back, rank r taking files r, r + W, ... (collective)."""
    known = known or {}
    files = [name for name in _tag_files(tag_directory) if name not in known]
    mine = {
        name: _file_digest(tag_directory / name)
        for index, name in enumerate(files)
        if index % topology.world_size == topology.rank
    }
    merged: dict[str, dict[str, Any]] = dict(known)
    for share in gather_objects(mine):
        merged.update(share)
    return dict(sorted(merged.items()))


def verification_problems(tag_directory: Path, topology: Topology) -> list[str]:
    """What differs from the digests in the tag's COMPLETE marker; [] when it verifies (collective)."""
    try:
        expected = read_marker(tag_directory).get("files")
    except CheckpointError as error:
        return [str(error)]
    if not isinstance(expected, dict):
        return [f"{tag_directory / COMPLETE_MARKER} records no file digests"]
    problems = [
        f"{tag_directory / name}: not written by this checkpoint"
        for name in _tag_files(tag_directory)
        if name not in expected
    ]
    mine = []
    for index, (name, wanted) in enumerate(sorted(expected.items())):
        if index % topology.world_size != topology.rank:
            continue
        path = tag_directory / name
        if not path.is_file():
            mine.append(f"{path}: missing")
            continue
        algorithm = DIGEST if DIGEST in wanted else "sha256"  # markers written before XXH3
        found = _file_digest(path, algorithm)
        if found["bytes"] != wanted["bytes"]:
            mine.append(f"{path}: {found['bytes']} bytes, {wanted['bytes']} written (torn or truncated)")
        elif found[algorithm] != wanted.get(algorithm):
            mine.append(f"{path}: {algorithm} digest differs from the one written (corrupted or replaced)")
    return problems + sorted(p for share in gather_objects(mine) for p in share)


def resolve_resume_tag(directory: Path, resume: str | None, topology: Topology | None = None) -> str | None:
    """None (fresh start), 'auto' (newest complete tag that verifies) or an explicit tag (collective).

    'auto' returns None only when there is no complete tag at all.
    """
    topology = topology or Topology(rank=0, world_size=1, local_rank=0)
    if resume is None:
        return None
    if resume == "auto":
        tags = complete_tags(directory)
        for tag in reversed(tags):
            problems = verification_problems(directory / tag, topology)
            if not problems:
                return tag
            if topology.is_main:
                print(
                    f"checkpoint {tag} fails verification, trying the one before: {'; '.join(problems)}",
                    file=sys.stderr,
                    flush=True,
                )
        if tags:
            raise CheckpointError(
                f"none of the complete checkpoints in {directory} ({', '.join(tags)}) verifies against its "
                "COMPLETE marker; start a new train.output_dir, or restore the files from a backup"
            )
        return None
    if not (directory / resume).is_dir():
        available = ", ".join(complete_tags(directory)) or "none"
        raise CheckpointError(
            f"--resume {resume}: no checkpoint {resume!r} in {directory} (complete ones: {available})"
        )
    if not (directory / resume / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"--resume {resume}: checkpoint {resume!r} in {directory} is incomplete (no {COMPLETE_MARKER} marker: "
            "a save was interrupted); resume from another tag or with --resume auto"
        )
    problems = verification_problems(directory / resume, topology)
    if problems:
        raise CheckpointError(
            f"--resume {resume}: the checkpoint fails verification: {'; '.join(problems)}; "
            "resume from another tag or with --resume auto"
        )
    return resume


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(text)
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save(
    engine,
    directory: Path,
    step: int,
    client_state: dict[str, Any],
    topology: Topology,
    keep: int,
    config: RunConfig,
    background: bool = False,
) -> str:
    """Save on every rank, then commit on rank 0: COMPLETE marker, pointer, retention (collective).

    The COMPLETE marker is JSON: step, world size, the resolved run config and the model config,
    so a checkpoint can be checked and exported without unpickling anything. With ``background``
    rank 0 commits on a thread and the step loop goes on: the marker's fsync (which on most
    filesystems waits for the whole checkpoint to reach the disk) and the retention's deletions
    then cost it nothing. The tag counts as saved once its marker is written; the next save, and
    `finish_commit` (which the trainer calls before it exits), wait for it and raise on every rank
    if it failed. A process killed before that leaves the tag without a marker: a resume takes the
    one before.
    """
    finish_commit(directory, topology)
    tag = tag_for_step(step)
    if topology.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / tag).is_dir() and not (directory / tag / COMPLETE_MARKER).is_file():
            # The leftover of a save of this step that was cut short (killed, disk full): its files
            # would otherwise mix with the new ones and be hashed into the new marker.
            shutil.rmtree(directory / tag)
    # (DeepSpeed's save starts with a barrier: no rank writes into the tag before the removal.)
    failure = None
    try:
        engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as error:
        failure = _write_failure(error)
        if failure is None:
            raise  # not a file write: a collective failed, which has its own message
        failure = f"rank {topology.rank}: {failure}"
        barrier()  # the one DeepSpeed's save ends with, where the ranks that wrote their files wait
    # Every rank's files are written (or failed) before anyone hashes the rest or calls it complete;
    # the same gather hands every rank the digests of what each rank wrote.
    shares = gather_objects((failure, take_written_digests(engine, directory / tag)))
    _raise_if_any_failed(directory, tag, [share_failure for share_failure, _ in shares], topology)
    written = {name: digest for _, share in shares for name, digest in share.items()}
    digests = file_digests(directory / tag, topology, known=written)
    if topology.is_main:
        marker = {
            "files": digests,
            "step": step,
            "world_size": topology.world_size,
            "saved_at": time.time(),
            "run_config": config.to_dict(),
            "model_config": client_state["model_config"],
            "projection": client_state.get("projection"),
        }
        commit = _Commit(directory, tag, json.dumps(marker) + "\n", keep)
        if background:
            _pending[directory] = commit.start()
        else:
            commit.run()
    if not background:
        _raise_if_any_failed(directory, tag, gather_objects(commit.failure if topology.is_main else None), topology)
    return tag


class _Commit:
    """Rank 0's part of a save once every file is written and hashed: the marker, the pointer, the
    retention of older tags; on the caller's thread or its own."""

    def __init__(self, directory: Path, tag: str, marker: str, keep: int):
        self.directory, self.tag, self.marker, self.keep = directory, tag, marker, keep
        self.failure: str | None = None
        self.thread: threading.Thread | None = None

    def run(self) -> None:
        try:
            _write_atomically(self.directory / self.tag / COMPLETE_MARKER, self.marker)
            _write_atomically(self.directory / POINTER, self.tag + "\n")
        except OSError as error:
            self.failure = f"rank 0 committing: {error}"
            return
        for old in complete_tags(self.directory)[: -self.keep]:
            shutil.rmtree(self.directory / old, ignore_errors=True)

    def start(self) -> "_Commit":
        self.thread = threading.Thread(target=self.run, name=f"commit-{self.tag}", daemon=True)
        self.thread.start()
        return self


_pending: dict[Path, _Commit] = {}  # rank 0: the commit still running, by checkpoint directory


def finish_commit(directory: Path, topology: Topology) -> None:
    """Wait for a save's background commit; every rank raises CheckpointSaveError if it failed
    (collective; a no-op on every rank when no save was started with ``background``)."""
    commit = _pending.pop(directory, None)
    if commit is not None and commit.thread is not None:
        commit.thread.join()
    pending_anywhere = gather_objects(None if commit is None else (commit.tag, commit.failure))
    for entry in pending_anywhere:
        if entry is not None:
            _raise_if_any_failed(directory, entry[0], [entry[1]], topology)


def _write_failure(error: BaseException) -> str | None:
    """The error of a file write, or None for anything else.

    A full disk reaches Python as an OSError from open/write, or, inside torch.save's zip writer,
    as a RuntimeError that never says "space" ("basic_ios::clear: iostream error", "unexpected
    pos ..." from inline_container.cc): both are write failures.
    """
    if isinstance(error, OSError):
        return str(error)
    text = str(error)
    if any(sign in text for sign in ("iostream error", "inline_container", "file write failed", "PytorchStreamWriter")):
        return f"torch.save failed: {text.splitlines()[0][:200]}"
    return None


def _raise_if_any_failed(directory: Path, tag: str, failures: list, topology: Topology) -> None:
    """Every rank raises the same CheckpointSaveError if any rank failed (after a collective)."""
    failures = [failure for failure in failures if failure]
    if not failures:
        return
    if topology.is_main:
        # Never leave a tag that looks complete; remove the torn files to give the space back.
        (directory / tag / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(directory / tag, ignore_errors=True)
    barrier()
    previous = complete_tags(directory)
    space = f"{shutil.disk_usage(directory).free / 2**20:.0f} MB free there now"
    if previous:
        size = sum(p.stat().st_size for p in (directory / previous[-1]).rglob("*") if p.is_file())
        space += f", a checkpoint takes {size / 2**20:.0f} MB"
    kept = (
        f"the newest complete checkpoint, {previous[-1]}, is untouched"
        if previous
        else "there is no earlier checkpoint"
    )
    raise CheckpointSaveError(
        f"checkpoint {tag} could not be written to {directory} ({'; '.join(failures)}; {space}); its partial "
        f"files are removed and {kept}. Free space (or fix the filesystem), then rerun with --resume auto"
    )


def read_marker(tag_directory: Path) -> dict[str, Any]:
    marker = tag_directory / COMPLETE_MARKER
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        raise CheckpointError(f"{marker} is unreadable ({error}): the checkpoint is damaged") from error


def check_compatible(tag_directory: Path, config: RunConfig, topology: Topology, reshard: bool = False) -> bool:
    """Fail before any work when the checkpoint cannot continue this run.

    Returns True when the checkpoint holds ZeRO shards of another world size and ``reshard`` asks
    for them to be converted (``convert_to_universal``); resharding keeps the global batch.
    """
    marker = read_marker(tag_directory)
    saved = config_from_dict(marker["run_config"])
    if saved.model_fingerprint() != config.model_fingerprint():
        saved_model, model = saved.to_dict()["model"], config.to_dict()["model"]
        differing = [
            key for key in saved_model if key not in NON_SHAPE_MODEL_FIELDS and model.get(key) != saved_model[key]
        ]
        raise ConfigError(
            f"checkpoint {tag_directory.name} was trained with another model: "
            + ", ".join(
                f"model.{key} differs (saved {saved_model[key]!r}, now {model.get(key)!r})" for key in differing
            )
            + "; use the saved model settings (config.yaml in the run directory) or a new train.output_dir"
        )
    if saved.zero.stage != config.zero.stage:
        raise ConfigError(
            f"checkpoint {tag_directory.name} was saved with zero.stage={saved.zero.stage}, now {config.zero.stage}: "
            "resume with the same stage, or export it (performer export) and start from the weights"
        )
    saved_world = marker["world_size"]
    if saved_world == topology.world_size or config.zero.stage == 0:
        return False
    if not reshard:
        raise CheckpointError(
            f"checkpoint {tag_directory.name} holds ZeRO-{config.zero.stage} shards of {saved_world} rank(s), "
            f"this job has {topology.world_size}: resume with {saved_world} rank(s), or add --reshard to convert "
            "it (weights, optimizer state and data cursor carry over; keep the global batch)"
        )
    if config.zero.stage == 3 or config.zero.offload != "none":
        raise CheckpointError(
            f"--reshard supports ZeRO-1 and ZeRO-2 without offload (tested); this run has zero.stage="
            f"{config.zero.stage}, zero.offload={config.zero.offload}: resume with {saved_world} rank(s), or "
            "export it (performer export) and start from the consolidated weights"
        )
    saved_batch = saved.train.micro_batch_size * saved.train.grad_accum * saved_world
    batch = config.train.micro_batch_size * config.train.grad_accum * topology.world_size
    if saved_batch != batch:
        per_rank = saved_batch // topology.world_size
        hint = (
            f"set train.grad_accum={per_rank // config.train.micro_batch_size}"
            if per_rank * topology.world_size == saved_batch and per_rank % config.train.micro_batch_size == 0
            else "choose train.micro_batch_size and train.grad_accum"
        )
        raise ConfigError(
            f"--reshard keeps the global batch: {tag_directory.name} was trained with {saved_batch} rows per step "
            f"({saved_world} rank(s)), this job would take {batch} ({topology.world_size} rank(s) x "
            f"{config.train.micro_batch_size} x grad_accum {config.train.grad_accum}); {hint} so that "
            f"micro_batch_size x grad_accum x {topology.world_size} = {saved_batch}"
        )
    return True


UNIVERSAL_DIRECTORY = "universal"


def convert_to_universal(directory: Path, tag: str, topology: Topology) -> Path:
    """Convert a verified tag to DeepSpeed's universal format (rank 0 works; collective).

    The universal format stores each parameter's fp32 master copy and Adam moments whole, so a
    job of any world size re-partitions them exactly (``"checkpoint": {"load_universal": true}``).
    Written to ``<directory>/universal/<tag>`` (not a tag ``--resume auto`` would pick) and
    removed by ``remove_universal`` once loaded. Returns the directory to load ``tag`` from.
    """
    root = directory / UNIVERSAL_DIRECTORY
    failure = None
    if topology.is_main:
        shutil.rmtree(root, ignore_errors=True)  # a conversion cut short is redone from scratch
        try:
            _ds_to_universal(directory / tag, root / tag)
        except Exception as error:  # DeepSpeed's converter asserts; report whatever it raised
            failure = f"{type(error).__name__}: {error}"
    failures = [f for f in gather_objects(failure) if f]
    if failures:
        raise CheckpointError(
            f"--reshard: converting {tag} to a universal checkpoint failed ({failures[0]}); "
            "resume with the world size it was saved with"
        )
    return root


def _ds_to_universal(source: Path, target: Path) -> None:
    import argparse
    import contextlib

    from deepspeed.checkpoint import ds_to_universal

    arguments = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(target),
        # One worker: the converter then runs in this process instead of forking a pool from a
        # process that holds a live process group.
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # Our checkpoints carry no universal_checkpoint_info; the converter only needs its version.
        inject_missing_state=True,
    )
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines are diagnostics, not output
        ds_to_universal.main(arguments)


def remove_universal(directory: Path, topology: Topology) -> None:
    """Drop the converted copy once every rank has loaded it (collective)."""
    barrier()
    if topology.is_main:
        shutil.rmtree(directory / UNIVERSAL_DIRECTORY, ignore_errors=True)


def load(engine, directory: Path, tag: str) -> dict[str, Any]:
    """Load a complete tag into the engine (module, optimizer, scheduler); return the client state."""
    path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise CheckpointError(
            f"DeepSpeed could not load checkpoint {tag!r} from {directory}: its files are missing or unreadable"
        )
    return client_state
