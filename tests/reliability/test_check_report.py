"""`performer check` on a healthy and on a damaged run directory (a real trained run, real shards)."""

from __future__ import annotations

import json
import subprocess
from collections import namedtuple
from pathlib import Path

from jobs import BIN, REPO

from data.shards import Manifest
from launcher.checkpoint import resolve_resume_tag
from launcher.commands import check


def performer_check(*arguments: str) -> tuple[int, str, str]:
    completed = subprocess.run(
        [str(BIN / "performer"), "check", *arguments], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    return completed.returncode, completed.stdout, completed.stderr


def test_healthy_run_directory(run_copy):
    code, out, err = performer_check(str(run_copy))
    assert code == 0, out + err
    assert out.strip().splitlines()[-1] == "healthy"
    for expected in (
        "OK   config: ",
        "OK   data: train split",
        "OK   data: heldout split",
        "OK   tokenizer: ",
        "OK   checkpoint: step00000002: complete",
        "OK   checkpoint: step00000004: complete",
        "OK   resume: --resume auto takes step00000004",
        "OK   disk: ",
    ):
        assert expected in out, out
    code, out, _ = performer_check(str(run_copy), "--json")
    report = json.loads(out)
    assert code == 0 and report["healthy"] and report["resume_auto"] == "step00000004"
    assert [(c["tag"], c["status"]) for c in report["checkpoints"]] == [
        ("step00000002", "complete"),
        ("step00000004", "complete"),
    ]


def test_damaged_run_directory_names_every_problem_and_its_fix(run_copy, data_copy):
    checkpoints = run_copy / "checkpoints"
    # A checkpoint file corrupted in place (same size), and a save that never finished.
    victim = checkpoints / "step00000004" / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (checkpoints / "step00000006").mkdir()
    (checkpoints / "step00000006" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    # Data: one truncated shard, one whose manifest sha256 is wrong, a tokenizer that is not the shards'.
    root = data_copy / "train"
    manifest = Manifest.load(root)
    truncated, mismatched = manifest.shards[2].path, manifest.shards[6].path
    (root / truncated).write_bytes((root / truncated).read_bytes()[:1000])
    raw = json.loads((root / "manifest.json").read_text())
    raw["shards"][6]["sha256"] = "0" * 64
    raw["tokenizer_fingerprint"] = "f" * 64
    (root / "manifest.json").write_text(json.dumps(raw))

    arguments = [str(run_copy), "--set", f"data.manifest={root}", "model.d_model=32"]
    code, out, err = performer_check(*arguments)
    assert code == 1, out + err
    assert out.strip().splitlines()[-1].startswith("6 problem(s), 2 warning(s)"), out
    expected = [
        f"FAIL data: train shard {truncated}: size 1000 bytes",
        "`performer pretrain` skips it (8 samples lost)",
        f"FAIL data: train shard {mismatched}: sha256 ",
        "stops before step 1 while data.verify_sha256 is true",
        "FAIL data: train split",
        "7 of 9 shards match",
        "FAIL tokenizer: ",
        "is not the one the shards of",
        "FAIL checkpoint: step00000002 cannot continue this config: "
        "checkpoint step00000002 was trained with another model",
        "FAIL checkpoint: step00000004: corrupted: ",
        "mp_rank_00_model_states.pt: xxh3_128 digest differs",
        "WARN checkpoint: step00000006: incomplete",
        "WARN resume: --resume auto takes step00000002 (skipping step00000004: failed verification)",
        "fix: restore the shard from its source",
        "fix: restore the files from a backup",
    ]
    for line in expected:
        assert line in out, (line, out)

    code, out, _ = performer_check(*arguments, "--json")
    report = json.loads(out)
    assert code == 1 and not report["healthy"]
    assert {c["tag"]: c["status"] for c in report["checkpoints"]} == {
        "step00000002": "complete",
        "step00000004": "corrupted",
        "step00000006": "incomplete",
    }
    # The tag it names is the one the trainer's --resume auto takes.
    assert report["resume_auto"] == resolve_resume_tag(checkpoints, "auto") == "step00000002"


def test_disk_too_small_for_the_next_checkpoint_is_a_problem(run_copy, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(check.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    report = check.run_checks(run_copy, [], [])
    disk = [f for f in report.findings if f.area == "disk"]
    assert not report.healthy and disk[0].status == "error" and "the next save fails" in disk[0].message


def test_usage_errors_exit_2(tmp_path):
    assert performer_check()[0] == 2
    code, _, err = performer_check(str(tmp_path / "missing"))
    assert code == 2 and "is not a directory" in err
    code, out, _ = performer_check(str(tmp_path))  # a directory without config.yaml
    assert code == 1 and "FAIL config: no config" in out and "fix: pass --config" in out


def test_a_mixture_checks_every_source_and_that_they_share_a_tokenizer(data_copy, tmp_path):
    import shutil

    config = REPO / "configs" / "tiny.yaml"
    sources = (
        f"data.sources=[{{manifest: {data_copy / 'train'}, weight: 2, name: web}}, "
        f"{{manifest: {data_copy / 'heldout'}, weight: 1, name: code}}]"
    )
    report = check.run_checks(None, [str(config)], [sources, f"train.output_dir={tmp_path / 'run'}"])
    lines = check.format_report(report)
    assert "OK   data: train source web" in lines and "OK   data: train source code" in lines, lines
    assert "different tokenizers" not in lines
    # A third source written with another tokenizer: named, with the fix.
    other = Path(shutil.copytree(data_copy / "heldout", tmp_path / "other" / "heldout"))
    raw = json.loads((other / "manifest.json").read_text())
    raw["tokenizer_fingerprint"] = "f" * 64
    (other / "manifest.json").write_text(json.dumps(raw))
    three = sources[:-1] + f", {{manifest: {other}, name: other}}]"
    report = check.run_checks(None, [str(config)], [three, f"train.output_dir={tmp_path / 'run'}"])
    lines = check.format_report(report)
    assert not report.healthy and "different tokenizers (train source web" in lines, lines
    assert "performer data prepare --tokenizer DIR" in lines
