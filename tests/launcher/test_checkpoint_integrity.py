"""Checkpoint integrity: every file of a tag is checked against the digests its COMPLETE marker
recorded before anything is unpickled (single process; the multi-rank path is in the job tests)."""

import json
from pathlib import Path

import pytest

from launcher.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    file_digests,
    resolve_resume_tag,
    tag_for_step,
    verification_problems,
)
from launcher.dist import Topology

ONE_RANK = Topology(rank=0, world_size=1, local_rank=0)


def _commit(directory, step, files):
    """A tag written the way checkpoint.save commits one: files, then the marker with digests."""
    tag = directory / tag_for_step(step)
    tag.mkdir(parents=True)
    for name, content in files.items():
        (tag / name).write_bytes(content)
    marker = {"step": step, "world_size": 1, "files": file_digests(tag, ONE_RANK)}
    (tag / COMPLETE_MARKER).write_text(json.dumps(marker))
    return tag


@pytest.fixture
def two_checkpoints(tmp_path):
    files = {"mp_rank_00_model_states.pt": b"weights" * 100, "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"adam" * 50}
    older = _commit(tmp_path, 4, files)
    newer = _commit(tmp_path, 8, {name: content[::-1] for name, content in files.items()})
    return tmp_path, older, newer


def test_an_intact_checkpoint_verifies_and_auto_takes_the_newest(two_checkpoints):
    directory, _, newer = two_checkpoints
    assert verification_problems(newer, ONE_RANK) == []
    assert resolve_resume_tag(directory, "auto", ONE_RANK) == newer.name


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete", "add_file", "marker_without_digests"])
def test_damage_is_named_and_auto_falls_back_to_the_previous_checkpoint(two_checkpoints, damage, capsys):
    directory, older, newer = two_checkpoints
    optimizer = newer / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if damage == "flip_byte":
        data = bytearray(optimizer.read_bytes())
        data[10] ^= 0xFF
        optimizer.write_bytes(bytes(data))
    elif damage == "truncate":
        optimizer.write_bytes(optimizer.read_bytes()[:-7])
    elif damage == "delete":
        optimizer.unlink()
    elif damage == "add_file":
        (newer / "evil.pt").write_bytes(b"not ours")
    else:
        marker = json.loads((newer / COMPLETE_MARKER).read_text())
        del marker["files"]
        (newer / COMPLETE_MARKER).write_text(json.dumps(marker))
    problems = verification_problems(newer, ONE_RANK)
    assert len(problems) == 1
    expected_word = {
        "flip_byte": "xxh3_128 digest differs",
        "truncate": "truncated",
        "delete": "missing",
        "add_file": "not written",
        "marker_without_digests": "no file digests",
    }[damage]
    assert expected_word in problems[0]
    assert resolve_resume_tag(directory, "auto", ONE_RANK) == older.name
    assert "fails verification, trying the one before" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="fails verification"):
        resolve_resume_tag(directory, newer.name, ONE_RANK)


def test_no_verifiable_checkpoint_is_an_error_not_a_restart_from_zero(two_checkpoints):
    directory, older, newer = two_checkpoints
    for tag in (older, newer):
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="none of the complete checkpoints"):
        resolve_resume_tag(directory, "auto", ONE_RANK)


def test_no_checkpoint_at_all_is_a_fresh_start_with_auto_only(tmp_path):
    assert resolve_resume_tag(tmp_path / "checkpoints", "auto", ONE_RANK) is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve_resume_tag(tmp_path / "checkpoints", "step00000004", ONE_RANK)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_file_hashed_while_torch_saves_it_has_the_digest_of_the_file_read_back(tmp_path, zip_format):
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from launcher.checkpoint import _file_digest
    from launcher.hashed_writes import HashingWriter

    # One tensor over the 1 MiB at which blocks are hashed beside the write, the rest small.
    state = {"big": torch.randn(512, 1024), "small": [torch.arange(7), {"half": torch.ones(3, dtype=torch.bfloat16)}]}
    path = tmp_path / "states.pt"
    with ThreadPoolExecutor(1) as pool, HashingWriter(path, pool) as handle:
        torch.save(state, handle, _use_new_zipfile_serialization=zip_format)
    assert handle.digest() == _file_digest(path)
    loaded = torch.load(path, weights_only=False)
    assert torch.equal(loaded["big"], state["big"]) and torch.equal(
        loaded["small"][1]["half"], state["small"][1]["half"]
    )


def test_files_hashed_as_written_are_not_read_again(tmp_path):
    tag = tmp_path / tag_for_step(3)
    tag.mkdir()
    (tag / "written.pt").write_bytes(b"states")
    (tag / "copied.py").write_bytes(b"script")
    known = {"written.pt": {"bytes": 6, "xxh3_128": "as hashed while written"}}
    digests = file_digests(tag, ONE_RANK, known=known)
    assert digests["written.pt"] == known["written.pt"]  # taken as given, not read back
    assert digests["copied.py"]["bytes"] == 6 and len(digests["copied.py"]["xxh3_128"]) == 32


def test_a_marker_written_with_sha256_digests_still_verifies_and_catches_damage(two_checkpoints):
    import hashlib

    directory, _, newer = two_checkpoints
    marker = json.loads((newer / COMPLETE_MARKER).read_text())
    for name in marker["files"]:
        content = (newer / name).read_bytes()
        marker["files"][name] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    (newer / COMPLETE_MARKER).write_text(json.dumps(marker))
    assert verification_problems(newer, ONE_RANK) == []
    optimizer = newer / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optimizer.write_bytes(optimizer.read_bytes()[::-1])
    assert "sha256 digest differs" in " ".join(verification_problems(newer, ONE_RANK))


class _WritingEngine:
    """What checkpoint.save needs of a DeepSpeed engine: files written into the tag."""

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        (Path(directory) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights" * 100)


def test_a_background_commit_is_complete_after_finish_and_its_failure_is_raised_there(tmp_path):
    from launcher.checkpoint import POINTER, CheckpointSaveError, complete_tags, finish_commit, save
    from launcher.config import load_config

    config = load_config([Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"], [])
    state = {"model_config": {}}
    directory = tmp_path / "checkpoints"
    save(_WritingEngine(), directory, 2, state, ONE_RANK, keep=3, config=config, background=True)
    finish_commit(directory, ONE_RANK)
    assert (
        complete_tags(directory) == ["step00000002"]
        and verification_problems(directory / "step00000002", ONE_RANK) == []
    )
    # The pointer cannot be replaced: the commit of step 4 fails on its thread and is reported at the finish.
    (directory / POINTER).unlink()
    (directory / POINTER).mkdir()
    save(_WritingEngine(), directory, 4, state, ONE_RANK, keep=3, config=config, background=True)
    with pytest.raises(
        CheckpointSaveError, match="checkpoint step00000004 could not be written.*step00000002, is untouched"
    ):
        finish_commit(directory, ONE_RANK)
    assert complete_tags(directory) == ["step00000002"] and not (directory / "step00000004").exists()
    finish_commit(directory, ONE_RANK)  # nothing left to wait for
