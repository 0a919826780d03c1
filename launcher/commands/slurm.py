"""`performer slurm`: an sbatch script for a config and a cluster shape, so nobody edits templates.

    performer slurm CONFIG.yaml [--config OVERLAY.yaml] [--set a.b=c ...] [--nodes N]
                    [--gpus-per-node G | --tasks-per-node T] [--partition P] [--account A]
                    [--time HH:MM:SS] [--job-name NAME] [--launcher srun|deepspeed] [--out FILE]

The config (with its overlays and overrides) is validated first, so a bad one fails here and not
in the queue. The shipped script (slurm/pretrain.sbatch, or slurm/pretrain-deepspeed.sbatch with
--launcher deepspeed) is the template: its #SBATCH header is filled in and one `set --` line
after it supplies the config and overrides as the script's arguments (more can still follow at
submission: `sbatch job.sbatch --set train.max_steps=10`). Everything else is the shipped body.
Ranks per node = GPUs per node (one rank per GPU); on CPU clusters, --tasks-per-node.
The script goes to stdout or --out; errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

from launcher.config import load_config
from performer.errors import InputError

TEMPLATES = {"srun": "pretrain.sbatch", "deepspeed": "pretrain-deepspeed.sbatch"}
SLURM_DIR = Path(__file__).resolve().parents[2] / "slurm"
# "#SBATCH --name=value", or "##SBATCH ..." (a line Slurm skips: the template's disabled options)
_DIRECTIVE = re.compile(r"^#{1,2}SBATCH\s+--([a-z-]+)(?:[=\s]\s*(\S.*?))?\s*$")


class SlurmError(InputError):
    """A problem with the request: printed as one line, exit code 2."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "slurm",
        help="render an sbatch script for a config and cluster shape",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG.yaml", help="the run's config (validated before anything is written)")
    parser.add_argument(
        "--config",
        dest="overlays",
        action="append",
        default=[],
        metavar="YAML",
        help="overlay configs layered after CONFIG, in order",
    )
    parser.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides, passed through to the trainer",
    )
    parser.add_argument("--nodes", type=int, default=1, metavar="N")
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        metavar="G",
        help="GPUs per node; one rank per GPU (0: CPU nodes, see --tasks-per-node)",
    )
    parser.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        metavar="T",
        help="ranks per node (default: --gpus-per-node, or 1 on CPU nodes)",
    )
    parser.add_argument("--partition", default=None, metavar="P")
    parser.add_argument("--account", default=None, metavar="A")
    parser.add_argument("--time", default=None, metavar="TIME", help="time limit, e.g. 04:00:00 or 2-00:00:00")
    parser.add_argument("--job-name", default=None, metavar="NAME")
    parser.add_argument(
        "--launcher",
        choices=sorted(TEMPLATES),
        default="srun",
        help="srun: one task per rank (default); deepspeed: one deepspeed --no_ssh per node",
    )
    parser.add_argument(
        "--chdir",
        default=None,
        metavar="DIR",
        help="directory the job runs in (default: the current one, which must hold the repository)",
    )
    parser.add_argument("--out", default=None, metavar="FILE", help="write the script here instead of stdout")
    parser.set_defaults(func=run)


def header_values(
    nodes: int,
    gpus_per_node: int,
    tasks_per_node: int | None,
    partition: str | None,
    account: str | None,
    time: str | None,
    job_name: str | None,
    chdir: str | None,
) -> dict:
    """#SBATCH option -> value (None: disable the template's line, if any)."""
    if nodes < 1:
        raise SlurmError(f"--nodes must be at least 1, not {nodes}")
    if gpus_per_node < 0:
        raise SlurmError(f"--gpus-per-node must be 0 (CPU) or more, not {gpus_per_node}")
    if tasks_per_node is None:
        tasks_per_node = gpus_per_node or 1
    if tasks_per_node < 1:
        raise SlurmError(f"--tasks-per-node must be at least 1, not {tasks_per_node}")
    if gpus_per_node and tasks_per_node != gpus_per_node:
        raise SlurmError(
            f"--tasks-per-node {tasks_per_node} differs from --gpus-per-node {gpus_per_node}: "
            "each rank drives the GPU its LOCAL_RANK names, so ranks per node = GPUs per node"
        )
    for name, value in (("--partition", partition), ("--account", account), ("--time", time), ("--job-name", job_name)):
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise SlurmError(f"{name} {value!r} must be one word")
    values = {
        "nodes": str(nodes),
        "ntasks-per-node": str(tasks_per_node),
        "gpus-per-node": str(gpus_per_node) if gpus_per_node else None,
    }
    for name, value in (
        ("job-name", job_name),
        ("time", time),
        ("partition", partition),
        ("account", account),
        ("chdir", chdir),
    ):
        if value is not None:
            values[name] = value
    return values


def render(template: str, values: dict, arguments: list[str], note: str) -> str:
    """The template with its #SBATCH header filled in and `arguments` as the script's first arguments."""
    lines = template.splitlines()
    header_end = max((i for i, line in enumerate(lines) if _DIRECTIVE.match(line)), default=None)
    if header_end is None:
        raise SlurmError("the template has no #SBATCH header")
    pending = dict(values)
    for index, line in enumerate(lines[: header_end + 1]):
        match = _DIRECTIVE.match(line)
        if match and match.group(1) in pending:
            value = pending.pop(match.group(1))
            # a disabled option stays as it was
            lines[index] = line if value is None else f"#SBATCH --{match.group(1)}={value}"
    added = [f"#SBATCH --{name}={value}" for name, value in pending.items() if value is not None]
    lines[header_end + 1 : header_end + 1] = [*added, "", note, "set -- " + shlex.join(arguments) + ' "$@"']
    if lines[0].startswith("#!"):
        lines.insert(1, "# Rendered by `performer slurm`; edit the command, not this file.")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    load_config([args.config, *args.overlays], args.set)
    template_path = SLURM_DIR / TEMPLATES[args.launcher]
    if not template_path.is_file():
        raise SlurmError(f"template {template_path} is missing: run performer slurm from a checkout of the project")
    if args.out is not None and Path(args.out).is_dir():
        raise SlurmError(
            f"--out {args.out} is a directory; name the script's file, e.g. {Path(args.out) / 'job.sbatch'}"
        )
    chdir = os.path.abspath(args.chdir) if args.chdir is not None else os.getcwd()
    values = header_values(
        args.nodes,
        args.gpus_per_node,
        args.tasks_per_node,
        args.partition,
        args.account,
        args.time,
        args.job_name,
        chdir,
    )
    arguments = [args.config]
    for overlay in args.overlays:
        arguments += ["--config", overlay]
    if args.set:
        arguments += ["--set", *args.set]
    note = "# The run: config and overrides (validated by performer slurm), then any given to sbatch."
    script = render(template_path.read_text(), values, arguments, note)
    if args.out is None:
        sys.stdout.write(script)
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(script)
        print(f"wrote {out}: submit with sbatch {shlex.quote(str(out))}", file=sys.stderr)
    return 0
