"""Every command against a catalogue of bad inputs: one line naming the input, exit 2, no traceback,
nothing written (issue 20: fail fast and clearly).

Each row of CATALOGUE is (command, input, damage): it builds a damaged copy of a real input (the
session's prepared data, trained run, export) in the test's own directory, runs the command, and
asserts

- the exit code: 2 (bad input), or 1 for a command whose job is to report damage (`performer
  check`, `performer data verify` on a bad shard);
- no Python traceback anywhere in the output;
- exit 2: exactly one `error: ...` line per rank (`[rank N] error: ...` under a launcher), the same
  on every rank, naming the input; exit 1: the input named in the report;
- nothing written: the test directory, the shared data, run and export have the same files,
  sizes and mtimes before and after.

Cases run in-process (`launcher.__main__.main`, `launcher.pretrain.main`) where the command is a
plain function, with the trainer's `init_distributed` replaced by a tripwire: an input the trainer
checks before any work must stop it before the process group forms. Rows marked "cli" run the
`performer` console script, "module" `python -m launcher.pretrain` (or `python -m launcher`),
"ranks" two `python -m launcher.pretrain` processes with the environment a launcher gives its
ranks (RANK, WORLD_SIZE, MASTER_ADDR/PORT: each rank's exit code and output are seen), and
"deepspeed" the deepspeed launcher on 2 ranks (its exit code; it ends the other ranks once one
has failed, so a slower rank may be stopped before it prints). PERFORMER_CATALOGUE_VIA=subprocess
runs every row through its real entry point. A new command or input joins the table: `test_every_command_is_in
_the_catalogue` fails until it does.

PERFORMER_CATALOGUE_RECORD=FILE appends one JSON line per row (exit code, traceback, files
written, the error line, paths under the test directory shown as …); `python
tests/reliability/test_bad_inputs.py FILE` prints the counts and the table of docs/reliability.md
from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launcher"))  # jobs.py, also when run as a script
from jobs import BIN, REPO, TEST_SETTINGS, free_port, launch_environment  # noqa: E402

TINY = str(REPO / "configs" / "tiny.yaml")
CORPUS = Path(textwrap.__file__).read_text()  # real text, enough for a 400-piece tokenizer in 0.1 s
# Bytes that are neither UTF-8, YAML, JSON, a tar nor a SentencePiece model.
GARBAGE = b"\xff\xfe\x00\x9c" + random.Random(20).randbytes(4092)
RUN_SETTINGS = ["train.max_steps=6", "checkpoint.interval=2", "eval.interval=0", "zero.stage=0"]  # as trained_run
TRACEBACK = "Traceback (most recent call last)"
ERROR_LINE = re.compile(r"^(?:\[rank (\d+)\] )?error: (.*)$")


# ------------------------------------------------------------------------------------ damage


def missing(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garbage(path: Path) -> None:
    path.write_bytes(GARBAGE)


def truncated(size: int) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(path.read_bytes()[:size])


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def json_list(path: Path) -> None:
    path.write_text("[1, 2, 3]\n")


def fields_missing(path: Path) -> None:
    """Right format and version, nothing else: a manifest of the wrong shape."""
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({"format": raw["format"], "version": raw["version"]}))


# ------------------------------------------------------------------------------------ inputs


@dataclass
class Shared:
    data: Path
    run: Path
    export: Path
    other_tokenizer: Path


class Workspace:
    """One case's directory; private copies of the shared inputs, made on first use."""

    def __init__(self, root: Path, shared: Shared):
        self.root, self.shared = root, shared
        (root / "cwd").mkdir()  # the commands' working directory: anything written relative shows

    @cached_property
    def data(self) -> Path:
        return Path(shutil.copytree(self.shared.data, self.root / "data"))

    @cached_property
    def run(self) -> Path:
        """The trained run (checkpoints step00000002, step00000004); its config reads the shared data."""
        return Path(shutil.copytree(self.shared.run, self.root / "run"))

    @cached_property
    def relocated_run(self) -> Path:
        """The trained run with its data moved to the private copy (config.yaml and every marker)."""
        run, manifest = self.run, str(self.data / "train")
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["data"]["manifest"] = manifest
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        for marker in run.glob("checkpoints/step*/COMPLETE"):
            raw = json.loads(marker.read_text())
            raw["run_config"]["data"]["manifest"] = manifest
            marker.write_text(json.dumps(raw))
        return run

    @property
    def run_data(self) -> Path:
        """The private data copy, with the private run reading it: damage here is what the run sees."""
        assert self.relocated_run.is_dir()
        return self.data

    @cached_property
    def export(self) -> Path:
        return Path(shutil.copytree(self.shared.export, self.root / "export"))

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def other_tokenizer(self, directory: Path) -> None:
        for source in self.shared.other_tokenizer.iterdir():
            shutil.copy(source, directory / source.name)

    def pretrain(
        self,
        *settings: str,
        configs: tuple = (),
        data: Path | None = None,
        out: Path | None = None,
        resume: str | None = None,
        config: str = TINY,
    ) -> list[str]:
        data = data if data is not None else self.shared.data
        out = out if out is not None else self.root / "out"
        argv = ["pretrain", "--config", str(config)]
        for config in configs:
            argv += ["--config", str(config)]
        argv += ["--set", *TEST_SETTINGS, f"data.manifest={data / 'train'}", f"train.output_dir={out}", *settings]
        return argv + (["--resume", resume] if resume else [])


# ------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Case:
    command: str  # as typed after `performer`
    input: str  # what is bad
    damage: str  # how
    build: Callable[[Workspace], tuple[list[str], str]]  # -> performer argv, the text naming the input
    via: str = "inproc"  # inproc | cli | module | ranks | deepspeed
    exit: int = 2
    env: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        via = "" if self.via == "inproc" else f" [{self.via}]"
        return f"{self.command}: {self.input} {self.damage}{via}"


def damaged(
    path_of: Callable[[Workspace], Path],
    damage: Callable[[Path], None],
    argv_of: Callable[[Workspace], list[str]],
    name_of: Callable[[Workspace], object] | None = None,
):
    """A builder: damage `path_of(w)`, run `argv_of(w)`; the message must name `name_of(w)` (default: the path)."""

    def build(w: Workspace) -> tuple[list[str], str]:
        path = path_of(w)
        damage(path)
        return argv_of(w), str(name_of(w) if name_of else path)

    return build


def pretrain_config(content: str | bytes, name: str | None = None) -> Callable:
    """pretrain with an overlay config holding `content`; the message names `name` or the file."""

    def build(w: Workspace) -> tuple[list[str], str]:
        overlay = w.file("overlay.yaml", content)
        return w.pretrain(configs=(overlay,)), name or str(overlay)

    return build


def pretrain_data(target: str, damage: Callable[[Path], None], name: str | None = None) -> Callable:
    """pretrain on the private data copy with `target` (relative to it) damaged."""
    return damaged(
        lambda w: w.data / target,
        damage,
        lambda w: w.pretrain(data=w.data),
        (lambda w: w.data / name) if name else None,
    )


def pretrain_resume(damage: Callable[[Path], None] | None, target: str, resume: str, name: str, *settings) -> Callable:
    def build(w: Workspace) -> tuple[list[str], str]:
        if damage is not None:
            damage(w.run / target)
        return w.pretrain(*RUN_SETTINGS, *settings, out=w.run, resume=resume), name

    return build


def every_shard(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(split: Path) -> None:
        for shard in split.glob("*.tar"):
            damage(shard)

    return apply


def other_tokenizer_beside(w: Workspace) -> Path:
    w.other_tokenizer(w.data / "tokenizer")
    return w.data / "tokenizer"


def export_argv(w: Workspace, *extra: str, out: Path | None = None) -> list[str]:
    return ["export", "--checkpoint", str(w.relocated_run), "--out", str(out or w.root / "exported"), *extra]


def generate_argv(w: Workspace, *extra: str, model: Path | None = None) -> list[str]:
    return ["generate", "--model", str(model or w.export), "--prompt", "def f(x):", "--max-new-tokens", "2", *extra]


def corpus(w: Workspace) -> Path:
    return w.file("corpus.txt", CORPUS)


def prepare_argv(
    w: Workspace, *extra: str, source: str = "files", paths: str | None = None, out: Path | None = None
) -> list[str]:
    return [
        "data",
        "prepare",
        "--source",
        source,
        "--paths",
        paths or str(corpus(w)),
        "--out",
        str(out or w.root / "prepared"),
        "--vocab-size",
        "400",
        "--num-sentinels",
        "20",
        "--workers",
        "1",
        *extra,
    ]


def slurm_argv(w: Workspace, *extra: str, config: str = TINY, out: Path | None = None) -> list[str]:
    return ["slurm", config, "--out", str(out or w.root / "job.sbatch"), *extra]


MANIFEST = "train/manifest.json"
TOKENIZER_MODEL = "tokenizer/tokenizer.model"

CATALOGUE: list[Case] = [
    # ---- pretrain: config
    Case(
        "pretrain",
        "--config",
        "missing",
        lambda w: (w.pretrain(config=w.root / "nope.yaml"), str(w.root / "nope.yaml")),
        via="cli",
    ),
    Case("pretrain", "--config", "a directory", lambda w: (w.pretrain(configs=(w.root,)), str(w.root))),
    Case("pretrain", "--config", "empty", pretrain_config("")),
    Case("pretrain", "--config", "garbage bytes", pretrain_config(GARBAGE)),
    Case("pretrain", "--config", "not a mapping", pretrain_config("- 1\n- 2\n")),
    Case(
        "pretrain",
        "--config",
        "wrong type at a key",
        pretrain_config("train:\n  grad_accum: two\n", "train.grad_accum"),
    ),
    Case("pretrain", "--config", "unknown key", pretrain_config("train:\n  max_stepz: 5\n", "train.max_stepz")),
    Case("pretrain", "--set", "without =", lambda w: (w.pretrain("train.max_steps"), "train.max_steps")),
    Case("pretrain", "--set", "value not YAML", lambda w: (w.pretrain("train.max_steps=[8"), "train.max_steps")),
    Case("pretrain", "--reshard", "without --resume", lambda w: (w.pretrain() + ["--reshard"], "--reshard")),
    Case(
        "pretrain",
        "PERFORMER_FAULTS",
        "garbage",
        lambda w: (w.pretrain(), "PERFORMER_FAULTS"),
        env={"PERFORMER_FAULTS": "explode@soon"},
    ),
    Case("pretrain", "train.output_dir", "a file", lambda w: (w.pretrain(out=w.file("out", "x")), str(w.root / "out"))),
    # ---- pretrain: data
    Case("pretrain", "data.manifest", "missing", pretrain_data("train", missing), via="module"),
    Case("pretrain", "data.manifest", "empty", pretrain_data(MANIFEST, empty)),
    Case("pretrain", "data.manifest", "garbage bytes", pretrain_data(MANIFEST, garbage)),
    Case("pretrain", "data.manifest", "truncated JSON", pretrain_data(MANIFEST, cut_in_half)),
    Case("pretrain", "data.manifest", "a JSON list", pretrain_data(MANIFEST, json_list)),
    Case("pretrain", "data.manifest", "fields missing", pretrain_data(MANIFEST, fields_missing)),
    Case("pretrain", "held-out manifest", "garbage bytes", pretrain_data("heldout/manifest.json", garbage)),
    Case(
        "pretrain",
        "data.eval_manifest",
        "missing",
        lambda w: (w.pretrain(f"data.eval_manifest={w.root / 'nowhere'}"), str(w.root / "nowhere")),
    ),
    Case(
        "pretrain", "shards", "every one truncated", pretrain_data("train", every_shard(truncated(1000))), via="module"
    ),
    Case("pretrain", "tokenizer.model", "missing", pretrain_data(TOKENIZER_MODEL, missing, "tokenizer")),
    Case("pretrain", "tokenizer.model", "empty", pretrain_data(TOKENIZER_MODEL, empty, "tokenizer")),
    Case(
        "pretrain",
        "tokenizer.model",
        "truncated to 1000 bytes",
        pretrain_data(TOKENIZER_MODEL, truncated(1000), "tokenizer"),
        via="module",
    ),
    Case("pretrain", "tokenizer.model", "garbage bytes", pretrain_data(TOKENIZER_MODEL, garbage, "tokenizer")),
    Case(
        "pretrain", "tokenizer.json", "garbage bytes", pretrain_data("tokenizer/tokenizer.json", garbage, "tokenizer")
    ),
    Case(
        "pretrain",
        "tokenizer",
        "another tokenizer (fingerprint)",
        damaged(
            lambda w: w.data / "tokenizer", lambda p: None, lambda w: w.pretrain(data=w.data), other_tokenizer_beside
        ),
    ),
    # ---- pretrain on 2 ranks: every rank says the same line and exits 2, and so does the launcher
    Case("pretrain", "data.manifest", "missing", pretrain_data("train", missing), via="ranks"),
    Case(
        "pretrain",
        "tokenizer.model",
        "truncated to 1000 bytes",
        pretrain_data(TOKENIZER_MODEL, truncated(1000), "tokenizer"),
        via="ranks",
    ),
    Case("pretrain", "data.manifest", "missing", pretrain_data("train", missing), via="deepspeed"),
    Case(
        "pretrain",
        "tokenizer.model",
        "truncated to 1000 bytes",
        pretrain_data(TOKENIZER_MODEL, truncated(1000), "tokenizer"),
        via="deepspeed",
    ),
    # ---- pretrain: checkpoints (checked after the process group forms: verification is shared out)
    Case(
        "pretrain", "--resume TAG", "missing", pretrain_resume(None, "", "step00000042", "step00000042"), via="module"
    ),
    Case(
        "pretrain",
        "--resume TAG",
        "incomplete (no COMPLETE)",
        pretrain_resume(missing, "checkpoints/step00000004/COMPLETE", "step00000004", "step00000004"),
        via="module",
    ),
    Case(
        "pretrain",
        "COMPLETE marker",
        "garbage bytes",
        pretrain_resume(garbage, "checkpoints/step00000004/COMPLETE", "step00000004", "step00000004/COMPLETE"),
        via="module",
    ),
    Case(
        "pretrain",
        "checkpoint",
        "a file truncated",
        pretrain_resume(
            truncated(1000),
            "checkpoints/step00000004/mp_rank_00_model_states.pt",
            "step00000004",
            "mp_rank_00_model_states.pt",
        ),
        via="module",
    ),
    Case(
        "pretrain",
        "checkpoint",
        "another model's",
        pretrain_resume(None, "", "auto", "step00000004", "model.d_model=32"),
        via="module",
    ),
    # ---- export
    Case(
        "export",
        "--checkpoint",
        "missing",
        lambda w: (
            ["export", "--checkpoint", str(w.root / "no-run"), "--out", str(w.root / "exported")],
            str(w.root / "no-run"),
        ),
        via="cli",
    ),
    Case("export", "--tag", "missing", lambda w: (export_argv(w, "--tag", "step00000042"), "step00000042")),
    Case(
        "export",
        "COMPLETE marker",
        "garbage bytes",
        damaged(
            lambda w: w.relocated_run / "checkpoints/step00000004/COMPLETE",
            garbage,
            lambda w: export_argv(w, "--tag", "step00000004"),
        ),
    ),
    Case(
        "export",
        "checkpoint",
        "a file truncated",
        damaged(
            lambda w: w.relocated_run / "checkpoints/step00000004/mp_rank_00_model_states.pt",
            truncated(1000),
            lambda w: export_argv(w, "--tag", "step00000004"),
        ),
    ),
    Case(
        "export",
        "tokenizer.model",
        "truncated to 1000 bytes",
        damaged(lambda w: w.run_data / TOKENIZER_MODEL, truncated(1000), export_argv, lambda w: w.data / "tokenizer"),
    ),
    Case(
        "export",
        "tokenizer",
        "another tokenizer (fingerprint)",
        damaged(lambda w: w.run_data / "tokenizer", lambda p: None, export_argv, other_tokenizer_beside),
    ),
    Case(
        "export",
        "--tokenizer",
        "missing",
        lambda w: (export_argv(w, "--tokenizer", str(w.root / "no-tokenizer")), str(w.root / "no-tokenizer")),
    ),
    Case("export", "data.manifest", "missing", damaged(lambda w: w.run_data / "train", missing, export_argv)),
    Case(
        "export", "--out", "a file", lambda w: (export_argv(w, out=w.file("exported", "x")), str(w.root / "exported"))
    ),
    # ---- generate
    Case(
        "generate",
        "--model",
        "missing",
        lambda w: (["generate", "--model", str(w.root / "no-export"), "--prompt", "x"], str(w.root / "no-export")),
        via="cli",
    ),
    Case("generate", "--model", "a training run", lambda w: (generate_argv(w, model=w.run), str(w.run))),
    Case(
        "generate", "config.json", "garbage bytes", damaged(lambda w: w.export / "config.json", garbage, generate_argv)
    ),
    Case(
        "generate", "config.json", "a JSON list", damaged(lambda w: w.export / "config.json", json_list, generate_argv)
    ),
    Case(
        "generate",
        "model.safetensors",
        "missing",
        damaged(lambda w: w.export / "model.safetensors", missing, generate_argv, lambda w: "model.safetensors"),
    ),
    Case(
        "generate",
        "model.safetensors",
        "truncated",
        damaged(lambda w: w.export / "model.safetensors", cut_in_half, generate_argv),
    ),
    Case(
        "generate",
        "tokenizer.model",
        "truncated to 1000 bytes",
        damaged(lambda w: w.export / TOKENIZER_MODEL, truncated(1000), generate_argv, lambda w: w.export / "tokenizer"),
    ),
    Case(
        "generate", "--max-new-tokens", "0", lambda w: (generate_argv(w, "--max-new-tokens", "0"), "--max-new-tokens")
    ),
    # ---- data prepare / tokenizer / shards
    Case(
        "data prepare",
        "--paths",
        "matching nothing",
        lambda w: (prepare_argv(w, paths=str(w.root / "corpus" / "*.txt")), str(w.root / "corpus" / "*.txt")),
        via="cli",
    ),
    Case(
        "data prepare",
        "--paths",
        "a JSONL file of garbage",
        lambda w: (
            prepare_argv(w, source="jsonl", paths=str(w.file("corpus.jsonl", GARBAGE))),
            str(w.root / "corpus.jsonl"),
        ),
    ),
    Case(
        "data prepare",
        "--out",
        "a file",
        lambda w: (prepare_argv(w, out=w.file("prepared", "x")), str(w.root / "prepared")),
    ),
    Case("data prepare", "--vocab-size", "too small", lambda w: (prepare_argv(w, "--vocab-size", "100"), "vocab")),
    Case(
        "data prepare", "--heldout-fraction", "1.5", lambda w: (prepare_argv(w, "--heldout-fraction", "1.5"), "heldout")
    ),
    Case("data prepare", "--heldout-fraction", "0", lambda w: (prepare_argv(w, "--heldout-fraction", "0"), "heldout")),
    Case(
        "data tokenizer",
        "--paths",
        "matching nothing",
        lambda w: (
            [
                "data",
                "tokenizer",
                "--source",
                "files",
                "--paths",
                str(w.root / "none" / "*.py"),
                "--out",
                str(w.root / "tok"),
            ],
            str(w.root / "none" / "*.py"),
        ),
    ),
    Case(
        "data shards",
        "--tokenizer",
        "missing",
        lambda w: (
            [
                "data",
                "shards",
                "--tokenizer",
                str(w.root / "no-tokenizer"),
                "--source",
                "files",
                "--paths",
                str(corpus(w)),
                "--out",
                str(w.root / "shards"),
            ],
            str(w.root / "no-tokenizer"),
        ),
    ),
    Case(
        "data shards",
        "tokenizer.model",
        "truncated to 1000 bytes",
        damaged(
            lambda w: w.data / TOKENIZER_MODEL,
            truncated(1000),
            lambda w: [
                "data",
                "shards",
                "--tokenizer",
                str(w.data / "tokenizer"),
                "--source",
                "files",
                "--paths",
                str(corpus(w)),
                "--out",
                str(w.root / "shards"),
            ],
            lambda w: w.data / "tokenizer",
        ),
    ),
    # ---- data verify / inspect / sample
    Case(
        "data verify",
        "manifest",
        "missing",
        lambda w: (["data", "verify", str(w.root / "nowhere")], str(w.root / "nowhere")),
        via="cli",
    ),
    Case(
        "data verify",
        "manifest",
        "empty",
        damaged(lambda w: w.data / MANIFEST, empty, lambda w: ["data", "verify", str(w.data / "train")]),
    ),
    Case(
        "data verify",
        "manifest",
        "garbage bytes",
        damaged(lambda w: w.data / MANIFEST, garbage, lambda w: ["data", "verify", str(w.data / "train")]),
    ),
    Case(
        "data verify",
        "manifest",
        "truncated JSON",
        damaged(lambda w: w.data / MANIFEST, cut_in_half, lambda w: ["data", "verify", str(w.data / MANIFEST)]),
    ),
    Case(
        "data verify",
        "manifest",
        "a JSON list",
        damaged(lambda w: w.data / MANIFEST, json_list, lambda w: ["data", "verify", str(w.data / "train")]),
    ),
    Case(
        "data verify",
        "manifest",
        "fields missing",
        damaged(lambda w: w.data / MANIFEST, fields_missing, lambda w: ["data", "verify", str(w.data / "train")]),
    ),
    Case(
        "data verify",
        "shard",
        "truncated (reported)",
        damaged(
            lambda w: w.data / "train" / "train-p00000-000000.tar",
            truncated(1000),
            lambda w: ["data", "verify", str(w.data / "train")],
            lambda w: "train-p00000-000000.tar",
        ),
        exit=1,
    ),
    Case(
        "data inspect",
        "manifest",
        "missing",
        lambda w: (["data", "inspect", str(w.root / "nowhere")], str(w.root / "nowhere")),
    ),
    Case(
        "data inspect",
        "manifest",
        "garbage bytes",
        damaged(lambda w: w.data / MANIFEST, garbage, lambda w: ["data", "inspect", str(w.data / "train")]),
    ),
    Case(
        "data inspect",
        "tokenizer.model",
        "truncated to 1000 bytes",
        damaged(
            lambda w: w.data / TOKENIZER_MODEL,
            truncated(1000),
            lambda w: ["data", "inspect", str(w.data / "train")],
            lambda w: w.data / "tokenizer",
        ),
    ),
    Case(
        "data inspect",
        "tokenizer",
        "another tokenizer (fingerprint)",
        damaged(
            lambda w: w.data / "tokenizer",
            lambda p: None,
            lambda w: ["data", "inspect", str(w.data / "train")],
            other_tokenizer_beside,
        ),
    ),
    Case(
        "data sample",
        "manifest",
        "garbage bytes",
        damaged(lambda w: w.data / MANIFEST, garbage, lambda w: ["data", "sample", str(w.data / "train")]),
    ),
    Case(
        "data sample",
        "tokenizer.model",
        "garbage bytes",
        damaged(
            lambda w: w.data / TOKENIZER_MODEL,
            garbage,
            lambda w: ["data", "sample", str(w.data / "train")],
            lambda w: w.data / "tokenizer",
        ),
    ),
    # ---- slurm
    Case(
        "slurm",
        "CONFIG",
        "missing",
        lambda w: (slurm_argv(w, config=str(w.root / "nope.yaml")), str(w.root / "nope.yaml")),
        via="cli",
    ),
    Case(
        "slurm",
        "CONFIG",
        "garbage bytes",
        lambda w: (slurm_argv(w, config=str(w.file("job.yaml", GARBAGE))), str(w.root / "job.yaml")),
    ),
    Case("slurm", "--set", "unknown key", lambda w: (slurm_argv(w, "--set", "train.max_stepz=3"), "train.max_stepz")),
    Case("slurm", "--nodes", "0", lambda w: (slurm_argv(w, "--nodes", "0"), "--nodes")),
    Case("slurm", "--time", "two words", lambda w: (slurm_argv(w, "--time", "1 day"), "--time")),
    Case(
        "slurm",
        "--tasks-per-node",
        "not the GPUs per node",
        lambda w: (slurm_argv(w, "--gpus-per-node", "8", "--tasks-per-node", "4"), "--tasks-per-node"),
    ),
    Case("slurm", "--out", "a directory", lambda w: (slurm_argv(w, out=w.root), str(w.root))),
    # ---- doctor (a failing doctor ends its process: always a subprocess)
    Case("doctor", "--timeout", "negative", lambda w: (["doctor", "--timeout", "-1"], "--timeout"), via="module"),
    Case("doctor", "--size-mb", "0", lambda w: (["doctor", "--size-mb", "0"], "--size-mb"), via="cli"),
    Case("doctor", "--repeats", "0", lambda w: (["doctor", "--repeats", "0"], "--repeats"), via="cli"),
    # ---- check: usage errors exit 2; damage in the run is its report (exit 1)
    Case(
        "check", "RUN_DIR", "missing", lambda w: (["check", str(w.root / "no-run")], str(w.root / "no-run")), via="cli"
    ),
    Case("check", "RUN_DIR", "a file", lambda w: (["check", str(w.file("run", "x"))], str(w.root / "run"))),
    Case(
        "check",
        "config.yaml",
        "garbage bytes (reported)",
        damaged(lambda w: w.run / "config.yaml", garbage, lambda w: ["check", str(w.run)]),
        exit=1,
    ),
    Case(
        "check",
        "data.manifest",
        "a JSON list (reported)",
        damaged(
            lambda w: w.run_data / MANIFEST,
            json_list,
            lambda w: ["check", str(w.relocated_run)],
            lambda w: w.data / "train",
        ),
        exit=1,
    ),
    Case(
        "check",
        "tokenizer.model",
        "truncated to 1000 bytes (reported)",
        damaged(
            lambda w: w.run_data / TOKENIZER_MODEL,
            truncated(1000),
            lambda w: ["check", str(w.relocated_run)],
            lambda w: w.data / "tokenizer",
        ),
        exit=1,
    ),
    Case(
        "check",
        "COMPLETE marker",
        "garbage bytes (reported)",
        damaged(lambda w: w.run / "checkpoints/step00000004/COMPLETE", garbage, lambda w: ["check", str(w.run)]),
        exit=1,
    ),
]


# ------------------------------------------------------------------------------------ running


@dataclass
class Outcome:
    code: int
    output: str  # stdout + stderr
    stderr: str
    rank_codes: list[int] | None = None  # via="ranks": each rank's


def tree(*roots: Path) -> dict[str, tuple]:
    """Every file and directory under `roots`: (size, mtime) -- what "nothing written" compares."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            stat = path.lstat()
            found[str(path)] = ("dir" if path.is_dir() else stat.st_size, stat.st_mtime_ns)
    return found


def _tripwire(*_args, **_kwargs):
    raise AssertionError("the trainer started its process group before rejecting a bad input")


def run_in_process(argv: list[str], capfd, monkeypatch) -> Outcome:
    """The command as the interpreter would run it: an escaping exception prints its traceback, exit 1."""
    import launcher.pretrain
    from launcher.__main__ import main

    monkeypatch.setattr(launcher.pretrain, "init_distributed", _tripwire)
    capfd.readouterr()
    try:
        code = launcher.pretrain.main(argv[1:]) if argv[0] == "pretrain" else main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except Exception:  # noqa: BLE001 - what Python would print
        traceback.print_exc()
        code = 1
    captured = capfd.readouterr()
    return Outcome(int(code or 0), captured.out + captured.err, captured.err)


def command_line(case: Case, argv: list[str]) -> list[str]:
    via = case.via if case.via != "inproc" else "cli"
    if via == "deepspeed":
        return [
            str(BIN / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "launcher.pretrain",
            *argv[1:],
        ]
    if via == "module":
        return (
            [sys.executable, "-m", "launcher.pretrain", *argv[1:]]
            if argv[0] == "pretrain"
            else [sys.executable, "-m", "launcher", *argv]
        )
    return [str(BIN / "performer"), *argv]


def run_subprocess(case: Case, argv: list[str], cwd: Path) -> Outcome:
    completed = subprocess.run(
        command_line(case, argv),
        cwd=cwd,
        env=launch_environment(**case.env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return Outcome(completed.returncode, completed.stdout + completed.stderr, completed.stderr)


def run_ranks(case: Case, argv: list[str], cwd: Path, ranks: int = 2) -> Outcome:
    """`ranks` trainer processes placed as a launcher places them; each one's exit code is kept."""
    place = {"WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "launcher.pretrain", *argv[1:]],
            cwd=cwd,
            env=launch_environment(**case.env, **place, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(ranks)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    codes = [process.returncode for process in processes]
    stderr = "".join(err for _, err in outputs)
    return Outcome(max(codes), "".join(out + err for out, err in outputs), stderr, codes)


def in_process(case: Case) -> bool:
    return case.via == "inproc" and os.environ.get("PERFORMER_CATALOGUE_VIA") != "subprocess"


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer trained on other text: another run's, with its own fingerprint."""
    from data.tokenizer import TokenizerConfig, train_tokenizer

    out = tmp_path_factory.mktemp("other-tokenizer")
    train_tokenizer([CORPUS], TokenizerConfig(vocab_size=400, num_sentinels=20, sample_lines=1000, num_threads=1), out)
    return out


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory) -> Path:
    from launcher.commands.export import export_checkpoint

    return export_checkpoint(trained_run, tmp_path_factory.mktemp("exported") / "export")


@pytest.fixture
def shared(prepared_data, trained_run, exported, other_tokenizer) -> Shared:
    return Shared(prepared_data, trained_run, exported, other_tokenizer)


# ------------------------------------------------------------------------------------ the tests


def error_lines(stderr: str) -> list[tuple[str | None, str]]:
    return [(m.group(1), m.group(2)) for m in map(ERROR_LINE.match, stderr.splitlines()) if m]


def record(case: Case, outcome: Outcome, wrote: list[str], name: str, root: Path) -> None:
    path = os.environ.get("PERFORMER_CATALOGUE_RECORD")
    lines = error_lines(outcome.stderr)
    message = lines[0][1] if lines else (outcome.output.strip().splitlines() or [""])[-1]
    if case.exit != 2:  # a report: the line that names the input
        message = next((line for line in outcome.output.splitlines() if name in line), message)
    message = message.replace(str(root), "…")
    print(f"CATALOGUE {case.id} | exit {outcome.code} | {message}")
    if path:
        with open(path, "a") as handle:
            handle.write(
                json.dumps(
                    {
                        "id": case.id,
                        "command": case.command,
                        "input": case.input,
                        "damage": case.damage,
                        "via": case.via,
                        "expected": case.exit,
                        "exit": outcome.code,
                        "traceback": TRACEBACK in outcome.output,
                        "wrote": wrote,
                        "named": name in outcome.output,
                        "message": message,
                    }
                )
                + "\n"
            )


@pytest.mark.parametrize("case", CATALOGUE, ids=lambda case: case.id)
def test_bad_input_fails_fast_and_clearly(case: Case, shared: Shared, tmp_path, capfd, monkeypatch):
    w = Workspace(tmp_path, shared)
    argv, name = case.build(w)
    watched = (tmp_path, shared.data, shared.run, shared.export)
    before = tree(*watched)
    if in_process(case):
        monkeypatch.chdir(w.root / "cwd")
        for key, value in case.env.items():
            monkeypatch.setenv(key, value)
        outcome = run_in_process(argv, capfd, monkeypatch)
    elif case.via == "ranks":
        outcome = run_ranks(case, argv, w.root / "cwd")
    else:
        outcome = run_subprocess(case, argv, w.root / "cwd")
    after = tree(*watched)
    wrote = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    record(case, outcome, wrote, name, tmp_path)

    assert TRACEBACK not in outcome.output, outcome.output[-4000:]
    assert outcome.code == case.exit, outcome.output[-4000:]
    if case.exit == 2:
        lines = error_lines(outcome.stderr)
        assert len({message for _, message in lines}) == 1, outcome.stderr[-4000:]  # one message, on every rank
        ranks = [rank for rank, _ in lines]
        if case.via == "ranks":
            assert outcome.rank_codes == [2, 2] and ranks == ["0", "1"], outcome.stderr[-4000:]
        elif case.via == "deepspeed":  # rank 0, rank 1 or both, once each
            assert ranks and len(set(ranks)) == len(ranks) and None not in ranks, outcome.stderr[-4000:]
        else:
            assert ranks == [None], outcome.stderr[-4000:]
        assert name in lines[0][1], (name, lines[0][1])
    else:
        assert name in outcome.output, (name, outcome.output[-4000:])
    assert wrote == [], wrote


def test_every_command_is_in_the_catalogue():
    """New commands join the table, each with at least one row through its real entry point."""
    from launcher.__main__ import build_parser

    commands = set()
    for action in build_parser()._subparsers._group_actions:
        for name, parser in action.choices.items():
            nested = [a for a in parser._actions if a.dest == "data_command"]
            commands |= {f"{name} {sub}" for sub in nested[0].choices} if nested else {name}
    covered = {case.command for case in CATALOGUE}
    real = {case.command for case in CATALOGUE if case.via != "inproc"}
    # `data sample` and `data shards` read what `data inspect` and `data prepare` read; their own
    # rows run in-process.
    assert commands - covered == set()
    assert commands - real <= {"data sample", "data shards", "data tokenizer", "data inspect"}


def test_debug_shows_the_traceback_of_a_bad_input_and_still_exits_2(tmp_path, capsys, monkeypatch):
    from launcher.__main__ import main

    monkeypatch.setenv("PERFORMER_DEBUG", "1")
    assert main(["data", "verify", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert TRACEBACK in err and "DataError" in err, err
    assert err.splitlines()[-1].startswith("error: no shard manifest at "), err


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch):
    """A bug is not a bad input: nothing catches it, so Python prints its traceback (exit 1)."""
    import launcher.commands.slurm
    from launcher.__main__ import main

    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(launcher.commands.slurm, "run", bug)
    with pytest.raises(ZeroDivisionError):
        main(["slurm", TINY])


def test_the_rank_prefix_comes_from_the_launchers_environment():
    from launcher.errors import launched_rank

    assert launched_rank({}) is None
    assert launched_rank({"RANK": "0", "WORLD_SIZE": "1"}) is None  # one process: no prefix
    assert launched_rank({"RANK": "1", "WORLD_SIZE": "2"}) == 1
    assert launched_rank({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}) == 3
    assert launched_rank({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8"}) == 5


def catalogue_table(lines: list[dict]) -> str:
    """The counts and the markdown table of docs/reliability.md from PERFORMER_CATALOGUE_RECORD lines."""
    counts = (
        f"{len(lines)} (command, bad input) pairs: {sum(line['traceback'] for line in lines)} printed a "
        f"traceback, {sum(line['exit'] != line['expected'] for line in lines)} exited with another code than "
        f"expected, {sum(bool(line['wrote']) for line in lines)} wrote files, "
        f"{sum(not line['named'] for line in lines)} did not name the input"
    )
    rows = ["| Command | Input | Damage | Exit | Message |", "|---|---|---|---:|---|"]
    for line in lines:
        via = f" ({line['via']})" if line["via"] != "inproc" else ""
        message = line["message"].replace("|", "\\|")
        rows.append(f"| `{line['command']}`{via} | `{line['input']}` | {line['damage']} | {line['exit']} | {message} |")
    return counts + "\n\n" + "\n".join(rows)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        print(catalogue_table([json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines()]))
