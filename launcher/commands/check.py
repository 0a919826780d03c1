"""`performer check`: what is wrong with a run, its data and its checkpoints, and how to fix it.

    performer check runs/tiny                         # the run's own config.yaml
    performer check runs/tiny --config configs/tiny.yaml --set train.max_steps=900   # the next job's
    performer check --config configs/medium.yaml      # before the first job: config + data only
    performer check runs/tiny --json                  # the same report, machine-readable

One process, nothing written, the trainer's own checks reused: the config is read as
`performer pretrain` reads it; every shard of the training and held-out splits is verified as
`performer data verify` does (size, sha256, tar structure, counts; `--no-sha256` skips hashing);
the tokenizer beside the shards is matched against the manifest's fingerprint; every checkpoint
tag is listed as complete (verified against its COMPLETE marker), incomplete (a save was
interrupted) or corrupted (which file, how), with whether it can continue this config, and the
tag `--resume auto` would take; free disk space is compared with one checkpoint's size.

Exit codes: 0 healthy (warnings allowed), 1 something is wrong (each problem says how to fix
it), 2 usage error (nothing to check).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from launcher import checkpoint
from launcher.config import ConfigError, RunConfig, load_config
from launcher.dist import Topology
from performer.errors import InputError

OK, WARNING, ERROR = "ok", "warning", "error"


@dataclass
class Finding:
    area: str  # config, data, tokenizer, checkpoint, resume, disk
    status: str  # ok, warning or error
    message: str
    fix: str = ""


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)  # tag, step, status, problems, bytes
    resume_auto: str | None = None  # the tag `--resume auto` would take; None = a fresh start

    def add(self, area: str, status: str, message: str, fix: str = "") -> None:
        self.findings.append(Finding(area, status, message, fix))

    @property
    def healthy(self) -> bool:
        return all(f.status != ERROR for f in self.findings)

    def to_json(self) -> dict:
        return {
            "healthy": self.healthy,
            "findings": [asdict(f) for f in self.findings],
            "checkpoints": self.checkpoints,
            "resume_auto": self.resume_auto,
        }


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "check",
        help="report what is wrong with a run directory, config or data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run_dir", nargs="?", default=None, metavar="RUN_DIR", help="a train.output_dir (default: the config's)"
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="config file(s) as for `performer pretrain` (default: RUN_DIR/config.yaml)",
    )
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument("--no-sha256", action="store_true", help="skip hashing shards (size/structure/counts only)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=command)


# ------------------------------------------------------------------------------------- checks


def check_config(report: Report, run_dir: Path | None, paths: list[str], overrides: list[str]) -> RunConfig | None:
    if not paths and run_dir is not None and (run_dir / "config.yaml").is_file():
        paths = [str(run_dir / "config.yaml")]
    if not paths:
        report.add(
            "config",
            ERROR,
            f"no config: {run_dir}/config.yaml does not exist",
            "pass --config with the YAML file(s) the job uses",
        )
        return None
    try:
        config = load_config(paths, overrides)
    except ConfigError as error:
        report.add("config", ERROR, str(error), "edit the config (every key is documented in launcher/config.py)")
        return None
    report.add("config", OK, f"{' + '.join(paths)} validates (fingerprint {config.fingerprint()[:12]})")
    return config


def check_split(report: Report, name: str, manifest_path: Path, check_sha256: bool, config: RunConfig):
    """Verify every shard of one split; returns its manifest (or None)."""
    from data.shards import Manifest, ShardChecksumError, verify_manifest
    from data.stream import DataError, check_shard_paths

    try:
        manifest = Manifest.load(manifest_path)
    except DataError as error:
        report.add(
            "data", ERROR, f"{name} split: {error}", "build it with `performer data prepare` or fix data.manifest"
        )
        return None
    try:  # before any shard is opened: verifying a pipe: shard would run it
        check_shard_paths(
            manifest,
            allow_pipe=config.data.allow_pipe,
            allow_remote=config.data.allow_remote,
            allow_shell_characters=config.data.allow_shell_characters,
        )
    except DataError as error:
        report.add("data", ERROR, f"{name} split {manifest_path}: {error}", "fix the manifest, or allow it as said")
        return None
    try:
        good, bad = verify_manifest(manifest, check_sha256=check_sha256)
    except DataError as error:  # the split's index is missing, stale or damaged: nothing can be planned
        report.add("data", ERROR, f"{name} split {manifest_path}: {error}", "rebuild the split or restore its index")
        return None
    samples = {shard.path: shard.samples for shard in manifest.shards}
    for path, error in sorted(bad.items()):
        if isinstance(error, ShardChecksumError):
            consequence = "`performer pretrain` stops before step 1 while data.verify_sha256 is true"
        else:
            consequence = f"`performer pretrain` skips it ({samples[path]} samples lost)"
        report.add(
            "data",
            ERROR,
            f"{name} shard {path}: {error}; {consequence}",
            "restore the shard from its source or rebuild the split with `performer data shards`",
        )
    hashed = "sha256, " if check_sha256 else ""
    status = OK if not bad else ERROR
    report.add(
        "data",
        status,
        f"{name} split {manifest_path}: {len(good)} of {len(manifest.shards)} shards match "
        f"the manifest ({hashed}size, tar structure, counts); {manifest.samples} samples",
    )
    return manifest


def check_tokenizer(report: Report, manifest) -> None:
    """The tokenizer beside the shards, as the trainer and `performer export` find and check it."""
    from data.stream import DataError

    if manifest.tokenizer_fingerprint is None:
        return  # synthetic token data
    try:
        tokenizer = manifest.tokenizer()
    except DataError as error:  # damaged, or another one: say so, keep checking the rest
        report.add("tokenizer", ERROR, str(error), "copy the shards' tokenizer back beside them from the data source")
        return
    if tokenizer is None:
        report.add(
            "tokenizer",
            WARNING,
            f"no tokenizer beside the shards of {manifest.root}: `performer export` will export the model without one",
            "pass `performer export --tokenizer DIR`",
        )
        return
    report.add(
        "tokenizer", OK, f"{tokenizer.directory} matches the manifest (fingerprint {tokenizer.fingerprint[:12]})"
    )


def check_checkpoints(report: Report, run_dir: Path, config: RunConfig | None) -> None:
    directory = run_dir / "checkpoints"
    tags = (
        sorted(
            (p.name for p in directory.iterdir() if checkpoint.TAG_PATTERN.match(p.name)),
            key=lambda tag: int(checkpoint.TAG_PATTERN.match(tag).group(1)),
        )
        if directory.is_dir()
        else []
    )
    if not tags:
        report.add("checkpoint", OK, f"no checkpoints in {directory}: the next job starts at step 0")
        return
    verified = []
    for tag in tags:
        tag_directory = directory / tag
        entry = {
            "tag": tag,
            "step": int(checkpoint.TAG_PATTERN.match(tag).group(1)),
            "bytes": sum(p.stat().st_size for p in tag_directory.rglob("*") if p.is_file()),
        }
        if not (tag_directory / checkpoint.COMPLETE_MARKER).is_file():
            entry.update(status="incomplete", problems=["no COMPLETE marker: a save was interrupted"])
            report.add(
                "checkpoint",
                WARNING,
                f"{tag}: incomplete (no {checkpoint.COMPLETE_MARKER} marker: a save was "
                "interrupted); resume never takes it",
                f"delete {tag_directory} to free {entry['bytes']:,} bytes",
            )
        else:
            single = Topology(rank=0, world_size=1, local_rank=0)
            problems = checkpoint.verification_problems(tag_directory, single)
            if problems:
                entry.update(status="corrupted", problems=problems)
                report.add(
                    "checkpoint",
                    ERROR,
                    f"{tag}: corrupted: {'; '.join(problems)}",
                    f"restore the files from a backup, or delete {tag_directory} (resume falls back to "
                    "the previous complete tag)",
                )
            else:
                entry.update(status="complete", problems=[])
                verified.append(tag)
                report.add(
                    "checkpoint",
                    OK,
                    f"{tag}: complete, every file matches its COMPLETE marker ({entry['bytes']:,} bytes)",
                )
                if config is not None:
                    _check_continues(report, tag_directory, config)
        report.checkpoints.append(entry)
    complete = [e["tag"] for e in report.checkpoints if e["status"] != "incomplete"]
    report.resume_auto = verified[-1] if verified else None
    if report.resume_auto is not None:
        skipped = [tag for tag in complete if int(tag[4:]) > int(report.resume_auto[4:])]
        note = f" (skipping {', '.join(skipped)}: failed verification)" if skipped else ""
        report.add("resume", OK if not skipped else WARNING, f"--resume auto takes {report.resume_auto}{note}")
    elif complete:
        report.add(
            "resume",
            ERROR,
            f"--resume auto fails: none of the complete checkpoints ({', '.join(complete)}) verifies",
            "restore a checkpoint from a backup or start a new train.output_dir",
        )
    else:
        report.add("resume", OK, "--resume auto starts at step 0 (no complete checkpoint)")


def _check_continues(report: Report, tag_directory: Path, config: RunConfig) -> None:
    """Can this config resume from the tag (model shapes, ZeRO stage)? World sizes are the job's."""
    try:
        marker = checkpoint.read_marker(tag_directory)
        world = int(marker.get("world_size", 1))
        checkpoint.check_compatible(tag_directory, config, Topology(rank=0, world_size=world, local_rank=0))
    except InputError as error:
        report.add(
            "checkpoint",
            ERROR,
            f"{tag_directory.name} cannot continue this config: {error}",
            "resume with the saved config (config.yaml in the run directory)",
        )


def check_disk(report: Report, run_dir: Path) -> None:
    sizes = [e["bytes"] for e in report.checkpoints if e["status"] == "complete"]
    existing = run_dir if run_dir.exists() else next((p for p in run_dir.parents if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    if not sizes:
        report.add("disk", OK, f"{free / 2**30:.1f} GiB free under {existing}")
        return
    needed = max(sizes)  # a save writes a whole new tag before retention deletes an old one
    if free < needed:
        report.add(
            "disk",
            ERROR,
            f"{free / 2**30:.2f} GiB free under {existing}, one checkpoint takes "
            f"{needed / 2**30:.2f} GiB: the next save fails",
            "free space, lower checkpoint.keep, or move train.output_dir",
        )
    else:
        report.add(
            "disk",
            OK,
            f"{free / 2**30:.1f} GiB free under {existing}: room for {free // needed} more "
            f"checkpoint(s) of {needed / 2**20:.1f} MiB",
        )


def run_checks(
    run_dir: Path | None, config_paths: list[str], overrides: list[str], check_sha256: bool = True
) -> Report:
    from launcher.streams import eval_manifest_path

    report = Report()
    config = check_config(report, run_dir, config_paths, overrides)
    if config is not None:
        sources, fingerprints = config.data.sources or [None], {}
        for i, source in enumerate(sources):
            name = "train" if source is None else f"train source {source.name or i} ({source.manifest})"
            manifest = check_split(
                report,
                name,
                Path(config.data.train_manifest if source is None else source.manifest),
                check_sha256,
                config,
            )
            if manifest is not None:
                check_tokenizer(report, manifest)
                fingerprints.setdefault(manifest.tokenizer_fingerprint, name)
        if len(fingerprints) > 1:
            report.add(
                "data",
                ERROR,
                f"the mixture's sources were written with different tokenizers ({', '.join(fingerprints.values())})",
                "prepare every source with one tokenizer: `performer data prepare --tokenizer DIR`",
            )
        heldout = eval_manifest_path(config)
        if heldout is not None:
            check_split(report, "heldout", heldout, check_sha256, config)
        run_dir = run_dir or Path(config.train.output_dir)
    if run_dir is not None:
        check_checkpoints(report, run_dir, config)
        check_disk(report, run_dir)
    return report


def format_report(report: Report) -> str:
    labels = {OK: "OK  ", WARNING: "WARN", ERROR: "FAIL"}
    lines = []
    for finding in report.findings:
        lines.append(f"{labels[finding.status]} {finding.area}: {finding.message}")
        if finding.fix and finding.status != OK:
            lines.append(f"     fix: {finding.fix}")
    errors = sum(f.status == ERROR for f in report.findings)
    warnings = sum(f.status == WARNING for f in report.findings)
    lines.append(
        "healthy" + (f" ({warnings} warning(s))" if warnings else "")
        if report.healthy
        else f"{errors} problem(s), {warnings} warning(s)"
    )
    return "\n".join(lines)


def command(args) -> int:
    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is None and not args.config:
        raise InputError("nothing to check: give a run directory, --config, or both")
    if run_dir is not None and not run_dir.is_dir():
        raise InputError(f"RUN_DIR {run_dir} is not a directory; give a train.output_dir")
    report = run_checks(run_dir, args.config, args.set, check_sha256=not args.no_sha256)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 0 if report.healthy else 1
