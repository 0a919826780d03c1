"""Security: untrusted bytes never reach pickle, a shell, or a YAML object constructor.

- A malicious pickle planted in a checkpoint (an extra file, or in place of a real one) is refused
  before DeepSpeed unpickles anything: its payload (create a file) never runs, on resume or export.
- Every torch.load outside the tests either uses weights_only=True or reads only files that passed
  the checkpoint verification.
- Shard paths that would run a command are refused unless explicitly allowed; nothing in the
  project starts a shell; YAML is only read with safe_load; exports hold no pickle.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from jobs import BIN, REPO, TEST_SETTINGS, launch_environment

from launcher.config import ConfigError, load_config
from performer import hf_files

PROJECT_DIRS = ("performer", "data", "launcher", "benchmarks", "examples", "slurm", "tests")


def project_python_files() -> list[Path]:
    files = [p for d in PROJECT_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 50, files  # the scan really sees the project
    return files


class Payload:
    """Unpickling this opens `path` for writing: proof that it ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(path: Path, proof: Path, size: int | None = None) -> None:
    """A torch.save file whose unpickling runs Payload. With `size`, padded to exactly that many bytes
    (so that only the sha256 can tell it from the file it replaces): a padding string to within 64
    bytes (torch aligns zip records), then a zip comment for the rest."""
    pad = 0
    while True:
        torch.save({"module": Payload(proof), "global_steps": 10**6, "pad": b"x" * pad}, path)
        data = path.read_bytes()
        if size is None or size - 64 <= len(data) <= size:
            break
        assert len(data) < size, f"the payload alone is larger than {size} bytes"
        pad += size - 64 - len(data)
    if size is not None:
        comment = size - len(data)
        assert data[-22:-18] == b"PK\x05\x06" and data[-2:] == b"\0\0"  # end of central directory, no comment
        path.write_bytes(data[:-2] + comment.to_bytes(2, "little") + b" " * comment)


def pretrain(data: Path, output_dir: Path, *settings: str, resume: str | None = None):
    overrides = [
        *TEST_SETTINGS,
        f"data.manifest={data / 'train'}",
        f"train.output_dir={output_dir}",
        "zero.stage=0",
        "eval.interval=0",
        *settings,
    ]
    command = [str(BIN / "performer"), "pretrain", "--config", str(REPO / "configs" / "tiny.yaml"), "--set", *overrides]
    command += ["--resume", resume] if resume else []
    return subprocess.run(command, cwd=REPO, env=launch_environment(), capture_output=True, text=True, timeout=300)


def test_the_payload_does_run_when_unpickled(tmp_path):
    """The test's premise: loading the planted file the way DeepSpeed does executes it."""
    for size in (None, 1_234_567):
        proof = tmp_path / f"proof{size}"
        plant(tmp_path / "evil.pt", proof, size)
        assert size is None or (tmp_path / "evil.pt").stat().st_size == size
        torch.load(tmp_path / "evil.pt", weights_only=False)
        assert proof.exists()


@pytest.mark.parametrize("how", ["extra file", "replaced file"])
def test_planted_pickle_in_a_checkpoint_never_runs(prepared_data, run_copy, tmp_path, how):
    proof = tmp_path / "proof"
    tag = run_copy / "checkpoints" / "step00000004"
    if how == "extra file":
        plant(tag / "zz_evil_optim_states.pt", proof)
    else:
        victim = tag / "mp_rank_00_model_states.pt"
        plant(victim, proof, size=victim.stat().st_size)

    explicit = pretrain(prepared_data, run_copy, "train.max_steps=6", resume="step00000004")
    assert explicit.returncode == 2, explicit.stdout + explicit.stderr
    assert "fails verification" in explicit.stderr
    assert ("not written by this checkpoint" if how == "extra file" else "digest differs") in explicit.stderr

    export = subprocess.run(
        [
            str(BIN / "performer"),
            "export",
            "--checkpoint",
            str(run_copy),
            "--tag",
            "step00000004",
            "--out",
            str(tmp_path / "export"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 2 and "fails verification" in export.stderr, export.stderr

    # auto skips the tampered tag for the one before it, says so, and trains on from there.
    auto = pretrain(prepared_data, run_copy, "train.max_steps=5", resume="auto")
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert "checkpoint step00000004 fails verification, trying the one before" in auto.stderr
    assert "resumed from step00000002 at step 2" in auto.stdout + auto.stderr
    assert not proof.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_shell_anywhere_in_the_project():
    offenders = []
    for path in project_python_files():
        for call, name in _calls(ast.parse(path.read_text(), str(path))):
            shell = [k for k in call.keywords if k.arg == "shell"]
            if any(not (isinstance(k.value, ast.Constant) and k.value.value is False) for k in shell):
                offenders.append(f"{path.relative_to(REPO)}:{call.lineno}: {name}(shell=...)")
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                offenders.append(f"{path.relative_to(REPO)}:{call.lineno}: {name}")
    assert offenders == []


def test_yaml_is_only_read_with_safe_load(tmp_path):
    unsafe = {
        "yaml.load",
        "yaml.load_all",
        "yaml.unsafe_load",
        "yaml.unsafe_load_all",
        "yaml.full_load",
        "yaml.full_load_all",
        "yaml.Loader",
        "yaml.UnsafeLoader",
        "yaml.FullLoader",
    }
    offenders, safe = [], 0
    for path in project_python_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            name = ast.unparse(node) if isinstance(node, ast.Attribute) else None
            if name in unsafe:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
            safe += name == "yaml.safe_load"
            if isinstance(node, ast.ImportFrom) and node.module == "yaml":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: from yaml import ...")
    assert offenders == [] and safe >= 2
    # And the config reader really refuses YAML's object constructors.
    proof = tmp_path / "proof"
    (tmp_path / "evil.yaml").write_text(f"seed: !!python/object/apply:os.system ['touch {proof}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([tmp_path / "evil.yaml"])
    assert not proof.exists()


def test_every_torch_load_is_weights_only_or_behind_verification():
    """Outside the tests, torch.load either refuses code (weights_only=True) or reads a checkpoint that
    resolve_resume_tag verified against its COMPLETE marker first (the export of a ZeRO-0 tag)."""
    behind_verification = {("launcher/commands/export.py", "consolidated_state_dict")}
    found = set()
    for path in project_python_files():
        relative = path.relative_to(REPO).as_posix()
        if relative.startswith("tests/"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Module))]:
            for call, name in _calls(function):
                if name != "torch.load":
                    continue
                weights_only = [k for k in call.keywords if k.arg == "weights_only"]
                if (
                    weights_only
                    and isinstance(weights_only[0].value, ast.Constant)
                    and weights_only[0].value.value is True
                ):
                    continue
                found.add((relative, getattr(function, "name", "<module>")))
    assert found <= behind_verification | {(r, "<module>") for r, _ in behind_verification}, found
    # ...and the export resolves (verifies) the tag before it calls that function.
    source = (REPO / "launcher" / "commands" / "export.py").read_text()
    assert source.index("resolve_resume_tag(checkpoint_dir") < source.index("state_dict = consolidated_state_dict(")


def test_pipe_shards_are_refused_by_the_trainer(prepared_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train").mkdir()
    raw = json.loads((prepared_data / "train" / "manifest.json").read_text())
    proof = tmp_path / "proof"
    raw["shards"][0]["path"] = f"pipe:touch {proof}; cat {prepared_data / 'train' / raw['shards'][0]['path']}"
    (data / "train" / "manifest.json").write_text(json.dumps(raw))
    (data / "tokenizer").symlink_to(prepared_data / "tokenizer")
    completed = pretrain(data, tmp_path / "run")
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "is a pipe: command; set data.allow_pipe=true" in completed.stderr
    assert not proof.exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_checking_a_manifest_never_runs_its_pipe_shards(prepared_data, trained_run, tmp_path):
    """Verifying a pipe: shard means running it: `performer data verify`, `data inspect` and
    `performer check` refuse it as training does, unless allowed."""
    proof = tmp_path / "proof"
    shutil.copytree(prepared_data, tmp_path / "data")
    raw = json.loads((tmp_path / "data" / "train" / "manifest.json").read_text())
    shard = tmp_path / "data" / "train" / raw["shards"][0]["path"]
    raw["shards"][0]["path"] = f"pipe:touch {proof}; cat {shard}"
    (tmp_path / "data" / "train" / "manifest.json").write_text(json.dumps(raw))
    for command in (
        ["data", "verify", str(tmp_path / "data" / "train")],
        ["data", "inspect", str(tmp_path / "data" / "train")],
        ["check", str(trained_run), "--set", f"data.manifest={tmp_path / 'data' / 'train'}"],
    ):
        completed = subprocess.run([str(BIN / "performer"), *command], capture_output=True, text=True, timeout=300)
        output = completed.stdout + completed.stderr  # the error line (data verify/inspect) or the report (check)
        assert completed.returncode in (1, 2) and "is a pipe: command" in output, output
        assert not proof.exists(), command
    # Explicitly allowed, the same manifest verifies (and the command does run: it is a pipe).
    allowed = subprocess.run(
        [str(BIN / "performer"), "data", "verify", "--allow-pipe", str(tmp_path / "data" / "train")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert proof.exists()


def test_a_real_export_holds_no_pickle(trained_run, tmp_path):
    out = tmp_path / "export"
    completed = subprocess.run(
        [str(BIN / "performer"), "export", "--checkpoint", str(trained_run), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"model.safetensors", "config.json"}
    # The only code is transformers' remote code, exactly as performer/hf_files.py writes it (run
    # only under trust_remote_code=True; performer itself never imports it).
    expected_code = tmp_path / "expected-code"
    expected_code.mkdir()
    hf_files.write_remote_code(expected_code)
    for path in files:
        head = path.read_bytes()[:4]
        # pickle protocol 2+ starts with 0x80; torch.save writes a zip (PK) holding a pickle.
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", f"{path} looks like a pickle / torch.save"
        assert path.suffix in {".safetensors", ".json", ".md", ".model", ".vocab", ".py"}, path
        if path.suffix == ".json":
            json.loads(path.read_text())
        if path.suffix == ".py":
            assert path.parent == out and path.read_bytes() == (expected_code / path.name).read_bytes(), path
    assert {p.name for p in files if p.suffix == ".py"} == {p.name for p in expected_code.iterdir()}
    from safetensors.torch import load_file

    assert len(load_file(out / "model.safetensors")) > 0
